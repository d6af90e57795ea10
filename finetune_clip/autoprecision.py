"""Which precision to extract in, measured on this machine: ``--precision auto``, ``--precision int8`` and
``cli.py bench``.

The fastest path depends on the CPU far more than on its flags (bf16 ran 0.19x, 3.4x and 0.58x fp32 on three CPUs,
two with the same avx512_bf16 flag), so each path is timed on the machine, on a calibration batch of the job's own
images and captions, held to fp32's features, and the measurements are kept in a per-machine record (FFTW's
"wisdom") that later jobs read at once. Every one-time cost counts against the job: quantizing, exporting, and the
calibration itself, which a short job does not repay.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import backends, onnx_int8
from . import model as model_mod
from .atomic import replacing

FLICKR_IMAGES, FLICKR_CAPTIONS = 31_783, 158_915
WORDS = ("a man woman dog child girl boy in the red blue shirt is running on grass beach street with two "
         "people playing sitting near water ball black white young standing front of building").split()


def flickr_like_captions(n: int, seed: int = 0) -> list[str]:
    """Word counts like Flickr30k's captions (mean about 12.3, sd about 5.3, a tail past 40)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.rint(rng.gamma(5.4, 2.28, n)), 3, 70).astype(int)
    return [" ".join(rng.choice(WORDS, k)) + " ." for k in lengths]


def best_of(fn, repeat=3) -> float:
    fn()  # warm-up: first calls pay for allocation and kernel selection
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def gemm_rates() -> dict:
    """fp32 matrix-multiply rates (GFLOP/s) on the trunk's own shape (64 images x 50 tokens through the
    MLP), in the layouts at hand: ``F.linear`` with an [out, in] weight (what nn.Linear runs), numpy,
    and plain ``a @ b``. The best of them is the ceiling the trunks are measured against."""
    x, w = torch.randn(3200, 768), torch.randn(3072, 768)
    wt = w.T.contiguous()
    xn, wn = x.numpy(), wt.numpy()
    flop = 2 * 3200 * 768 * 3072
    return {name: flop / best_of(fn, 10) / 1e9 for name, fn in
            (("F.linear", lambda: torch.nn.functional.linear(x, w)), ("numpy", lambda: xn @ wn),
             ("a @ b", lambda: x @ wt))}


# In the order they are calibrated: fp32 first (every path is held to it), int8-fbgemm before bf16 (where bf16 has no
# fast kernels it then stops at its first slice, behind int8: see time_trunk).
PATHS = {"cpu": ("fp32", "int8-fbgemm", "bf16", "int8-ort"), "cuda": ("fp32", "bf16", "fp16")}
BUILT_ONCE = ("int8-ort",)  # one-time export of about a minute per model, kept on disk: later a load of a second
LONG_JOB_S = 15 * 60     # fp32 projection above which a path that costs a minute first is worth calibrating
FAITHFUL = 0.999         # min cosine to fp32 features, on both trunks, over the calibration batch
CAL_IMAGES, CAL_CAPTIONS = 8, 128
# A first job is worth calibrating when a path REPAY times fp32's speed (about what int8 reaches on the CPU kinds
# measured) would save more than the calibration costs: when its fp32 time is at least WORTH calibrations. Where no
# path beats fp32, such a job runs up to a third slower, once per machine: the record decides later jobs.
REPAY = 1.5
WORTH = REPAY / (REPAY - 1)
# What calibrating costs, measured on an AVX2-only CPU: about CAL_PASSES times fp32's projected time for the
# calibration batch, plus CAL_EXTRA_S (quantizing, casting).
CAL_PASSES, CAL_EXTRA_S = 8, 4.0


class PrecisionError(RuntimeError):
    """No path that may be taken is faithful on this machine; the message names each one's reason."""


def cpu_name_and_flags() -> tuple[str, list[str]]:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform
        return platform.processor() or "unknown CPU", []
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "unknown")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    return name, sorted(set(flags))


# Raised when a change moves the paths' speeds, so that records measured before are measured again (5: the torchao
# path removed, MLP activations out of place again).
PATHS_REVISION = 5


def machine(device: str = "cpu") -> dict:
    """What a measurement depends on; a record made under anything else is not trusted."""
    name, flags = cpu_name_and_flags()
    m = {"cpu": name, "flags_sha256": hashlib.sha256(" ".join(flags).encode()).hexdigest()[:16],
         "threads": torch.get_num_threads(), "torch": torch.__version__, "device": device, "paths": PATHS_REVISION}
    if device == "cuda":
        m["gpu"] = torch.cuda.get_device_name()
    return m


def isa_flags() -> str:
    """The flags that matter for these kernels, for people to read (the record keys on all of them)."""
    flags = cpu_name_and_flags()[1]
    return " ".join(f for f in flags if f.startswith(("avx2", "avx512", "amx", "avx_vnni", "fma"))) or "none listed"


def model_id(loaded) -> str:
    """What a measurement's model is: architecture, weights, and the config's hash for a config file."""
    return f"{loaded.arch}|{loaded.pretrained}|{model_mod.text_sha256(loaded.config)}"


def record_key(device: str, model: str) -> str:
    return json.dumps({"machine": machine(device), "model": model}, sort_keys=True)


def record_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "finetune-clip-flickr30k" / "precision-record.json"


def read_record(key: str) -> tuple[dict, str]:
    """(this machine's measured paths, a note when the record was ignored). Never trusts a damaged record."""
    path = record_path()
    if not path.exists():
        return {}, ""
    try:
        record = json.loads(path.read_text())
        entries = record["entries"]
        if record.get("version") != 1 or not isinstance(entries, dict):
            raise ValueError("unknown layout")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return {}, f"the precision record {path} is damaged ({str(exc)[:60]}); ignored, measuring again"
    if key in entries:
        return entries[key], ""
    return {}, (f"the precision record {path} holds no measurement for this CPU, thread count, torch, model "
                "and version of this tool's paths; measuring them")


def write_record(key: str, paths: dict) -> None:
    path = record_path()
    try:
        record = json.loads(path.read_text())
        assert record.get("version") == 1 and isinstance(record["entries"], dict)
    except Exception:  # noqa: BLE001 - a damaged record is replaced
        record = {"version": 1, "entries": {}}
    record["entries"][key] = paths
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True))


def _timed(fn, n: int, device: str) -> tuple[float, torch.Tensor]:
    """(seconds, result) of ``fn(n)``."""
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn(n)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


SLICE_SLACK = 2.0  # how much slower on a slice a path may read before it stops there (time_trunk, measure_path)


def first_slice(n: int) -> int:
    """How many of a calibration batch's n items every path is timed on first: a sixteenth, at least 2 (2 of the 8
    images, 8 of the 128 captions)."""
    return min(n, max(2, n // 16))


def time_trunk(run, n: int, device: str, fastest_first=None, can_win=None) -> tuple[float, torch.Tensor, float]:
    """(seconds, features, seconds on the first slice) of one trunk on the first n items of the calibration batch
    (``run(k)``: its first k).

    Every path is timed on the first slice, fp32 included. A path that runs there under half the rate of the fastest
    path measured before it on this trunk (``fastest_first``: that path's seconds on the same slice; fp32 is the
    first) stops at that slice: it cannot make its path win, and timing it on the whole batch would only cost the job
    (bf16 on CPUs without native bf16 kernels runs at 0.1-0.7x fp32). The
    comparison is with the same items, never with a rate on the whole batch: small batches run slower per item, and
    against fp32's whole-batch rate a slice of short captions read int8-fbgemm's text, which wins on the whole batch,
    slower than fp32. Half leaves room for the noise of one short timing. So does a path that ``can_win`` (given
    the slice's seconds) says cannot win the job (measure_path). Otherwise it is timed once on the whole batch;
    measure_paths times it again where another path's rate comes close (time_again_where_close).
    """
    first = first_slice(n)
    first_s, feats = _timed(run, first, device)
    if first == n or (fastest_first is not None and first_s > SLICE_SLACK * fastest_first) or \
            (can_win is not None and not can_win(first_s)):
        return first_s, feats, first_s
    seconds, feats = _timed(run, n, device)
    return seconds, feats, first_s


def _runners(q, px: torch.Tensor, tokens: torch.Tensor, text_batch: int, device: str) -> tuple:
    """``run(k)`` for each trunk of the prepared model ``q``: features of its first k images, or first k captions."""
    return (lambda k: model_mod.image_features(q, px[:k]).float().cpu(),
            lambda k: model_mod.encode_window(q, tokens[:k], text_batch, device).cpu())


def measure_path(model, name: str, device: str, pixels, tokens, text_batch: int, reference=None, fastest_first=None,
                 prepared=None, job=None, best=None):
    """(measurement, the prepared model, its features): rates for both trunks, one-time setup, fidelity against
    fp32's features (``reference``); ``fastest_first``, the fastest first-slice seconds measured before on each trunk
    (see time_trunk); ``prepared``, (this path already prepared and run, its setup seconds): neither prepared nor
    warmed up again; ``job``, (images, captions) being calibrated for, and ``best``, the measurement of the path
    that projects it shortest so far.

    With a job, the text trunk stops at its slice where the job, projected from this path's image rate and its text
    slice, takes more than SLICE_SLACK times as long as with the best path: then it cannot win this job. Its text is
    projected as the best path's, scaled by the two paths' seconds on the same slice. The same slack as time_trunk's:
    a slice's rate can read a path up to about 1.7x slow against the whole batch, times one timing's noise."""
    warm = prepared is not None
    if prepared is None:
        # Every path prepares a copy: prepare rewrites the model it is given (attention as two Linear layers, in fp32
        # too), and the next path, int8-ort's export above all, must start from open_clip's own modules, as extract's
        # does. The copy shares the weights (model.sharing_copy) and is not a cost of the path (extract prepares the
        # model it loaded), so it is not timed.
        own = model_mod.sharing_copy(model)
        t0 = time.perf_counter()
        q = backends.prepare(own, name, device)
        prepared = q, time.perf_counter() - t0
    q, setup = prepared
    build = getattr(q, "int8_build_s", 0.0)  # int8-ort's export, once per model (kept on disk)
    setup -= build
    run_image, run_text = _runners(q, pixels.to(device), tokens, text_batch, device)
    with torch.no_grad():
        if not warm:  # first calls pay for allocation and kernel choice
            run_image(2)
            run_text(8)
        t_img, f_img, first_img = time_trunk(run_image, len(pixels), device,
                                             None if fastest_first is None else fastest_first[0])

        def can_win(first_s):
            n_images, n_captions = job
            text_s = n_captions / best["caption_rate"] * first_s / best["first_slice_s"][1]
            mine = setup + build + n_images * t_img / len(f_img) + text_s
            return mine <= SLICE_SLACK * projected_s(best, n_images, n_captions)
        t_txt, f_txt, first_txt = time_trunk(run_text, len(tokens), device,
                                             None if fastest_first is None else fastest_first[1],
                                             None if job is None else can_win)
    feats, n_img, n_txt = {"image": f_img, "text": f_txt}, len(f_img), len(f_txt)
    if reference is not None:  # a trunk timed on a slice of the batch is compared on that slice
        reference = {"image": reference["image"][:n_img], "text": reference["text"][:n_txt]}
    m = {"image_rate": n_img / t_img, "caption_rate": caption_rate(tokens[:n_txt], t_txt, text_batch),
         "setup_s": setup, "build_s": build, "timed_on": [n_img, n_txt], "first_slice_s": [first_img, first_txt],
         "cos_image": 1.0, "cos_text": 1.0, "struck": ""}
    if not all(bool(torch.isfinite(f).all()) for f in feats.values()):
        m["struck"] = "non-finite features on the calibration batch"
    elif reference is not None:
        cos = torch.nn.functional.cosine_similarity
        m["cos_image"] = float(cos(feats["image"], reference["image"]).min())
        m["cos_text"] = float(cos(feats["text"], reference["text"]).min())
        if min(m["cos_image"], m["cos_text"]) < FAITHFUL:
            m["struck"] = f"min cosine {min(m['cos_image'], m['cos_text']):.5f} < {FAITHFUL} to fp32"
    return m, q, feats


def caption_rate(tokens: torch.Tensor, seconds: float, batch: int) -> float:
    """Captions a second in extraction's sorted windows, from ``seconds`` for these tokens (see window_factor)."""
    return len(tokens) / seconds * window_factor(tokens, batch)


def window_factor(tokens: torch.Tensor, batch: int, window: int = 2048) -> float:
    """How much faster captions run in extraction's sorted windows than in the calibration batch.

    Both sort by length and pad each batch to its longest caption; a window of 2,048 makes
    tighter batches than 128 captions do. Counted in padded positions, with the window's
    lengths drawn from the calibration captions' own distribution.
    """
    def padded(lengths):
        return sum(lengths[s:s + batch].max() * len(lengths[s:s + batch]) for s in range(0, len(lengths), batch))
    lengths = np.sort(tokens.argmax(-1).numpy() + 1)
    full = np.sort(np.quantile(lengths, np.linspace(0, 1, window), method="inverted_cdf"))
    return float((padded(lengths) / len(lengths)) / (padded(full) / window))


def first_reason(exc: Exception) -> str:
    """The line of an exception's message that says why: a compiler's failure opens with "backend='inductor'
    raised:" and names its reason on the next line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return next((line for line in lines if not line.endswith(":")), lines[0] if lines else type(exc).__name__)


def measure_paths(model, names, device: str, pixels, tokens, text_batch: int, fp32=None, job=None) -> tuple[dict, dict]:
    """(measurements, prepared models) for fp32 and then ``names``, each against fp32's features; ``fp32``: (fp32
    already prepared, its setup seconds); ``job``, (images, captions) of the job being calibrated for (see
    measure_path; `cli.py bench` measures every path whole, for any job).

    A path that cannot run here is struck, with its reason, never chosen. Each trunk of a path is timed against the
    fastest faithful path before it on the same first slice (time_trunk), so the order of ``names`` (PATHS: int8
    before bf16) only decides how soon a slow path stops, never which path wins.
    """
    measured, prepared = {}, {}
    measured["fp32"], prepared["fp32"], ref = measure_path(model, "fp32", device, pixels, tokens, text_batch,
                                                           prepared=fp32)
    for name in names:
        fastest = [min(m["first_slice_s"][trunk] for m in measured.values() if not m["struck"]) for trunk in (0, 1)]
        best = None if job is None else measured[choose(measured, *job)[0]]
        try:
            measured[name], prepared[name], _ = measure_path(model, name, device, pixels, tokens, text_batch, ref,
                                                             fastest, job=job, best=best)
        except Exception as exc:  # noqa: BLE001
            measured[name] = {"image_rate": 1e-9, "caption_rate": 1e-9, "setup_s": 0.0, "cos_image": 0.0,
                              "cos_text": 0.0, "struck": f"failed: {first_reason(exc)[:80]}"}
    time_again_where_close(measured, prepared, device, pixels, tokens, text_batch)
    return measured, prepared


CLOSE = 1.25  # one timing on a shared 2-core machine can read 20% slow (never fast): rates within this may swap


def time_again_where_close(measured: dict, prepared: dict, device: str, pixels, tokens, text_batch: int) -> None:
    """On each trunk, where two or more faithful paths timed on the whole batch come within CLOSE of the fastest, time
    each of those once more and keep its faster timing: only there could one timing's noise change which path wins.
    Elsewhere one timing decides, and a second for every path would only lengthen the calibration."""
    for trunk, (rate, n) in enumerate((("image_rate", len(pixels)), ("caption_rate", len(tokens)))):
        whole = {k: m[rate] for k, m in measured.items() if not m["struck"] and m["timed_on"][trunk] == n}
        close = [k for k, r in whole.items() if r * CLOSE >= max(whole.values(), default=0.0)]
        for k in close if len(close) > 1 else []:
            run = _runners(prepared[k], pixels.to(device), tokens, text_batch, device)[trunk]
            with torch.no_grad():
                seconds, _ = _timed(run, n, device)
            again = caption_rate(tokens, seconds, text_batch) if trunk else n / seconds
            measured[k][rate] = max(measured[k][rate], again)


def projected_s(m: dict, n_images: int, n_captions: int) -> float:
    return m["setup_s"] + m.get("build_s", 0.0) + n_images / m["image_rate"] + n_captions / m["caption_rate"]


def slow_to_start(model) -> tuple:
    """The paths whose one-time cost is about a minute: int8-ort until its files are built."""
    return () if onnx_int8.built(model) else BUILT_ONCE


def _built_now(paths: dict, model) -> dict:
    """The record's measurements with int8-ort's build counted only where its files are not on disk."""
    if "int8-ort" not in paths:
        return paths
    ort = dict(paths["int8-ort"])
    if onnx_int8.built(model):
        ort["build_s"] = 0.0
    elif not ort.get("build_s"):
        return {k: v for k, v in paths.items() if k != "int8-ort"}  # its build was never timed: measure again
    return {**paths, "int8-ort": ort}


def _keep_build(recorded: dict, measured: dict) -> dict:
    """The record to write: the new measurements, keeping a one-time build measured earlier where it was reused now."""
    merged = {**recorded, **measured}
    for name in BUILT_ONCE:
        if name in measured and not measured[name].get("build_s") and recorded.get(name, {}).get("build_s"):
            merged[name] = {**measured[name], "build_s": recorded[name]["build_s"]}
    return merged


def choose(paths: dict, n_images: int, n_captions: int) -> tuple[str, float]:
    """The measured, faithful path with the shortest projected job (one-time costs included)."""
    ok = {k: projected_s(m, n_images, n_captions) for k, m in paths.items() if not m["struck"]}
    if not ok:
        raise PrecisionError("no path is faithful here: " + "; ".join(f"{k} {m['struck']}" for k, m in paths.items()))
    best = min(ok, key=ok.get)
    return best, ok[best]


def describe(name: str, paths: dict, n_images: int, n_captions: int) -> str:
    m, ref = paths[name], paths["fp32"]
    if name == "fp32":
        return f"fp32 ({projected_s(m, n_images, n_captions):.0f} s projected; exact)"
    return (f"{name} (image {m['image_rate'] / ref['image_rate']:.2f}x, "
            f"text {m['caption_rate'] / ref['caption_rate']:.2f}x fp32, "
            f"min cosine {m['cos_image']:.5f} / {m['cos_text']:.5f}; {projected_s(m, n_images, n_captions):.0f} s"
            f" projected against {projected_s(ref, n_images, n_captions):.0f} s fp32, {m['setup_s']:.0f} s of it "
            "one-time)")


def auto_precision(model, device: str, pixels, tokens, n_images: int, n_captions: int, model_id: str,
                   text_batch: int = 64, log=None, among: tuple | None = None) -> tuple[str, object, str]:
    """(precision, its prepared model or None, the one line that says what was taken and why).

    ``among``: the paths it may take (default: every path of the device, for ``--precision auto``; the int8 backends
    for ``--precision int8``). fp32 is measured whatever, as the reference every path is held to.

    With a record for this machine and model, it decides at once. Without one, a job of at most 24 calibration
    batches (WORTH times CAL_PASSES) takes the first path it may (fp32 for auto) at once: too short to repay
    calibrating, whatever the machine's speed. A larger one times fp32 on a tiny batch first, and decides the same
    way if that says it is still too short. Otherwise every path is measured on the calibration batch (the job's own
    images and captions), struck if it is not faithful, and the record is written; the calibration's cost counts
    against the job.
    """
    asked = "auto" if among is None else "int8"
    allowed = list(PATHS[device]) if among is None else ["fp32", *among]
    fallback = "fp32" if among is None else among[0]
    key = record_key(device, model_id)
    paths, note = read_record(key)
    if note and log is not None:
        print(f"note: {note}", file=log)
    # Whether int8-ort's files are on disk costs a hash of the weights (a second for ViT-B/32): asked only where the
    # record holds int8-ort. A path that costs a minute first is left out of a short job, unless already built.
    recorded, paths = paths, _built_now(paths, model) if device == "cpu" else paths
    long_job = "fp32" in paths and projected_s(paths["fp32"], n_images, n_captions) > LONG_JOB_S
    wanted = [p for p in allowed if long_job or p not in BUILT_ONCE or paths.get(p, {}).get("build_s") == 0.0]
    if all(p in paths for p in wanted):
        best = _best(paths, wanted, among, n_images, n_captions)
        return best, None, f"precision {asked}: {describe(best, paths, n_images, n_captions)}; from {record_path()}"
    others = "the other paths" if among is None else "which int8 path is faster"
    short = WORTH * CAL_PASSES
    if n_images <= short * len(pixels) and n_captions <= short * len(tokens):
        # Shorter on any machine than WORTH calibrations (each runs these pixels and tokens about CAL_PASSES times,
        # plus CAL_EXTRA_S): nothing needs timing to know it.
        return fallback, None, (f"precision {asked}: {fallback} (a short job, {n_images} images and {n_captions} "
                                f"captions: measuring {others} would cost more than it could save)")
    t0 = time.perf_counter()
    tiny, fp32, _ = measure_path(model, "fp32", device, pixels[:2], tokens[:32], text_batch)
    t32 = projected_s(tiny, n_images, n_captions)
    calibration = CAL_PASSES * (len(pixels) / tiny["image_rate"] + len(tokens) / tiny["caption_rate"]) + CAL_EXTRA_S
    if t32 < WORTH * calibration:
        return fallback, None, (f"precision {asked}: {fallback} (a short job, {t32:.0f} s projected in fp32: "
                                f"measuring {others} would cost about {calibration:.0f} s)")
    slow = slow_to_start(model) if device == "cpu" else ()
    wanted = allowed if t32 > LONG_JOB_S else [p for p in allowed if p not in slow]
    measured, prepared = measure_paths(model, wanted[1:], device, pixels, tokens, text_batch,
                                       (fp32, tiny["setup_s"]), (n_images, n_captions))  # fp32 as for the tiny
    write_record(key, _keep_build(recorded, measured))
    now = _built_now(measured, model) if device == "cpu" else measured  # a build done while calibrating is paid
    best = _best(now, wanted, among, n_images, n_captions)
    spent = time.perf_counter() - t0
    struck = "; ".join(f"{k} struck: {m['struck']}" for k, m in measured.items() if m["struck"])
    return best, prepared[best], (f"precision {asked}: {describe(best, now, n_images, n_captions)}; calibrated in "
                                  f"{spent:.0f} s" + (f" ({struck})" if struck else "") + f"; kept in {record_path()}")


def _best(paths: dict, wanted: list, among: tuple | None, n_images: int, n_captions: int) -> str:
    """The fastest faithful path for the job among those wanted (and, for int8, among the int8 backends)."""
    candidates = {k: m for k, m in paths.items() if k in wanted and (among is None or k in among)}
    try:
        return choose(candidates, n_images, n_captions)[0]
    except PrecisionError as exc:
        raise PrecisionError(f"{exc} (min cosine to fp32 at least {FAITHFUL} on both trunks); use --precision fp32 "
                             "(exact) or auto") from None


def machine_check(model, tokenizer, device: str, model_id: str, job: tuple[int, int] | None, text_batch: int,
                  compiled: bool = False, out=None) -> str:
    """`cli.py bench`: the GEMM ceiling, every path's rates, fidelity and one-time costs, a projection
    for the named collection, and a last line 'recommended: ...'. Fills the record auto reads."""
    out = out or sys.stdout
    name, _ = cpu_name_and_flags()
    print(f"machine: {name}; flags: {isa_flags()}; {torch.get_num_threads()} threads; torch {torch.__version__}"
          f" (its CPU kernels: {torch.backends.cpu.get_cpu_capability()})"
          + (f"; GPU {torch.cuda.get_device_name()}" if device == "cuda" else ""), file=out)
    if device == "cpu":
        rates = gemm_rates()
        print("GEMM ceiling (fp32): " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()) + " GFLOP/s", file=out)
    gen = torch.Generator().manual_seed(0)
    size = model.visual.image_size if isinstance(model.visual.image_size, int) else model.visual.image_size[0]
    pixels = torch.randn(CAL_IMAGES, 3, size, size, generator=gen)
    tokens = tokenizer(flickr_like_captions(CAL_CAPTIONS))
    slow = slow_to_start(model) if device == "cpu" else ()
    paths = [p for p in PATHS[device] if compiled or p not in slow]
    measured, _ = measure_paths(model, paths[1:], device, pixels, tokens, text_batch)
    key = record_key(device, model_id)
    write_record(key, _keep_build(read_record(key)[0], measured))
    n_img, n_cap = job or (FLICKR_IMAGES, FLICKR_CAPTIONS)
    where = "this collection" if job else "a Flickr30k-sized job"
    print(f"\n{'path':12} {'img/s':>8} {'cap/s':>8} {'vs fp32 (img/text)':>19} {'min cosine (img/text)':>22} "
          f"{'one-time':>9} {'projected, ' + where:>34}", file=out)
    f = measured["fp32"]
    now = _built_now(measured, model) if device == "cpu" else measured  # what an extract from now on pays
    for p, m in measured.items():
        if m["struck"].startswith("failed"):
            print(f"{p:12} {m['struck']}", file=out)
            continue
        proj = projected_s(now[p], n_img, n_cap)
        print(f"{p:12} {m['image_rate']:8.1f} {m['caption_rate']:8.0f} "
              f"{m['image_rate'] / f['image_rate']:9.2f}x/{m['caption_rate'] / f['caption_rate']:.2f}x "
              f"{m['cos_image']:13.5f}/{m['cos_text']:.5f} {m['setup_s']:8.1f}s {proj / 60:33.1f} min"
              + (f"  (exported once in {m['build_s']:.0f} s, kept)" if m.get("build_s") else "")
              + ("  (timed and compared on a slice of the batch: under half the rate of a faster path there)"
                 if m.get("timed_on", [CAL_IMAGES, CAL_CAPTIONS]) != [CAL_IMAGES, CAL_CAPTIONS] else "")
              + (f"  (struck: {m['struck']})" if m["struck"] else ""), file=out)
    if not compiled and "int8-ort" in slow:
        print("int8-ort not measured: exporting it takes about a minute, once for this model; "
              "`cli.py bench --compiled` builds it and keeps it", file=out)
    best, seconds = choose(now, n_img, n_cap)
    line = (f"recommended: --precision {best}, projected {seconds / 60:.1f} min for {where} "
            f"({n_img} images, {n_cap} captions)")
    print(line, file=out)
    return best
