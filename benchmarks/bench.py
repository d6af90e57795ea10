"""`make bench`: each speed figure beside its reference, as a ratio (the budgets in docs/performance.md).

Timings use a random-init ViT-B/32 (speed does not depend on the weights) and
synthetic inputs, so the bench runs offline. Nothing here is asserted.
"""
from __future__ import annotations

import copy
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from finetune_clip import backends, cache, extract, metrics, onnx_int8, probe, worlds
from finetune_clip import model as model_mod
from finetune_clip.cli import SMALL_CLIP
from finetune_clip.autoprecision import (FLICKR_CAPTIONS, FLICKR_IMAGES, best_of, cpu_name_and_flags,
                                         flickr_like_captions, gemm_rates, isa_flags)

ROOT = Path(__file__).resolve().parents[1]
# Probes retrained per cache for the recall rows. Retraining alone moves R@K by 0.6-1.9 pp (standard deviation, fp32
# cache); 6 seeds left +-1.3 to +-2.2 pp intervals that could not settle a 1 pp budget, 30 seeds about +-0.6.
SEEDS = tuple(range(30))
# More galleries of the test split's size (another draw of the same world) for the recall rows with the same heads:
# one gallery of 1,000 images left +-0.7 to +-1.0 pp intervals there (int8-ort, bf16), and 1 + 15 took int8-ort's to
# +-0.16 and +-0.22 pp (an AMX Xeon, 24 minutes for the recall rows of int8-fbgemm, int8-ort and bf16).
GALLERIES = 15


def block_flops(width: int, hidden: int, n: int, queries: int) -> float:
    """Forward FLOPs (2 per multiply-add) of one transformer block on n positions, queries at ``queries`` of them:
    keys and values at every position; queries, attention output, out_proj and MLP at the queries alone (the
    trunks' last block computes only the class token or the EOT, see model.last_block_at)."""
    return 2.0 * (n * 2 * width * width + queries * (2 * width * width + 2 * width * hidden) + 2 * queries * n * width)


def text_flops(model, tokens: torch.Tensor, batch_size: int) -> float:
    """Forward FLOPs the bucketed text trunk runs on ``tokens`` (padding to each batch's longest included)."""
    width = model.ln_final.normalized_shape[0]
    layers, hidden = len(model.transformer.resblocks), model.transformer.resblocks[0].mlp.c_fc.out_features
    lengths = torch.sort(tokens.argmax(-1) + 1).values
    total = 0.0
    for s in range(0, len(lengths), batch_size):
        n, b = int(lengths[s:s + batch_size].max()), len(lengths[s:s + batch_size])
        total += b * ((layers - 1) * block_flops(width, hidden, n, n) + block_flops(width, hidden, n, 1))
    return total


def model_flops_per_image(model) -> float:
    """Analytic forward FLOPs a ViT image trunk runs per image (2 per multiply-add): patch embedding, the
    transformer's linear layers, attention scores and mixing, the last block at the class token alone. ViT-B/32 at
    224 px: about 8.2 GFLOP (8.8 with the last block at every token, as open_clip's forward runs it).
    (torch's FlopCounterMode misses the fused attention fast path, so it undercounts.)"""
    v = model.visual
    width, grid = v.conv1.out_channels, v.grid_size[0]
    tokens, patch = grid * grid + 1, v.conv1.kernel_size[0]
    layers, hidden = len(v.transformer.resblocks), v.transformer.resblocks[0].mlp.c_fc.out_features
    return ((layers - 1) * block_flops(width, hidden, tokens, tokens) + block_flops(width, hidden, tokens, 1)
            + 2.0 * (tokens - 1) * 3 * patch * patch * width)


def fp32_trunk_rows() -> tuple:
    """(rows, model, pixels, tokens, text batch, fp32 rates): the GEMM ceiling and the fp32 trunks against it, against
    open_clip's `encode_text` at 77 tokens, and against open_clip's forwards with the last block at every position."""
    torch.manual_seed(0)
    loaded = model_mod.load_model("ViT-B-32", "none")
    ref = copy.deepcopy(loaded.model)
    model = loaded.model
    model_mod.take_heads(model)
    # The trunks timed as extraction runs them (model.prepare); the int8 rows start from open_clip's own modules, as
    # extract's int8 paths do.
    fp32 = backends.prepare(copy.deepcopy(model), "fp32", "cpu")
    rates = gemm_rates()
    ceiling = max(rates.values())
    rows = [("GEMM ceiling (best layout)", ", ".join(f"{k} {v:.0f}" for k, v in rates.items()) + " GFLOP/s",
             f"{ceiling:.0f}", "GFLOP/s")]
    settings = extract.resolve(extract.ExtractSettings(annotations=Path("."), images=Path("."), cache=Path(".")))
    tokens = loaded.tokenizer(flickr_like_captions(settings.text_window))
    px = torch.randn(64, 3, 224, 224)
    text, cap_rate = text_rows(fp32, ref, tokens, settings.text_batch_size, ceiling)
    image, img_rate = image_rows(fp32, px, ceiling)
    rows += text + image + last_block_rows(fp32, px[:8], loaded.tokenizer(flickr_like_captions(4096, seed=1)),
                                           settings.text_batch_size)
    return rows, model, px, tokens, settings.text_batch_size, (img_rate, cap_rate)


def flickr_row(name: str, i_rate: float, c_rate: float, extra: float = 0.0) -> tuple:
    minutes = (FLICKR_IMAGES / i_rate + FLICKR_CAPTIONS / c_rate + extra) / 60
    return (f"projected Flickr30k extract, {name}", f"{FLICKR_IMAGES / i_rate / 60:.1f} min images + "
            f"{FLICKR_CAPTIONS / c_rate / 60:.1f} min captions" + (f" + {extra:.0f} s to set up" if extra else ""),
            f"{minutes:.0f} min", "<= 40 min" if name == "fp32" else "<= 20 min")


def header() -> str:
    return (f"{cpu_name_and_flags()[0]} (flags: {isa_flags()}); torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}")


def main() -> None:
    print(header())
    rows, model, px, tokens, batch, (img_rate, cap_rate) = fp32_trunk_rows()
    others, alternative_rates = int8_alternative_rows(model, px, tokens, batch, (img_rate, cap_rate))
    rows += others + ort_weight_rows(model, px, tokens, batch, (img_rate, cap_rate))
    rows += [bf16_row(model, px[:8])] + probe_rows(img_rate, cap_rate)
    for name, (i_rate, c_rate, extra) in (("fp32", (img_rate, cap_rate, 0.0)), *alternative_rates.items()):
        rows.append(flickr_row(name, i_rate, c_rate, extra))
    rows += [memory_row()] + int8_recall_rows() + auto_rows() + decode_recall_rows()
    print_rows(rows)


def print_rows(rows: list) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"\n{'figure':{width}}  {'measured':>10}  {'budget':>20}  detail")
    for name, detail, ratio, budget in rows:
        print(f"{name:{width}}  {ratio:>10}  {budget:>20}  {detail}")


class _Whole(torch.nn.Module):
    """A trunk behind a forward of its own, so that model.text_features runs open_clip's transformer whole."""

    def __init__(self, trunk: torch.nn.Module):
        super().__init__()
        self.trunk = trunk

    def forward(self, *args, **kwargs):
        return self.trunk(*args, **kwargs)


def last_block_rows(model, px, tokens, batch_size: int, rounds: int = 16) -> list:
    """Each fp32 trunk as extraction runs it (its last block at the class token or the EOT alone) against open_clip's
    forward (the last block at every position), timed in alternation round by round so that a noisy machine's
    drift cancels: the median of the paired ratios, with their quartiles."""
    import random
    import statistics
    whole = copy.deepcopy(model)
    whole.transformer = _Whole(whole.transformer)
    n = len(tokens) // rounds
    runs = {"image": (lambda r: model_mod.image_features(model, px), lambda r: whole.visual(px)),
            "text": (lambda r: model_mod.encode_window(model, tokens[r * n:(r + 1) * n], batch_size, "cpu"),
                     lambda r: model_mod.encode_window(whole, tokens[r * n:(r + 1) * n], batch_size, "cpu"))}
    rng, rows = random.Random(0), []
    with torch.no_grad():
        for trunk, (ours, theirs) in runs.items():
            a, b = ours(0), theirs(0)  # warm-up, and the two computations compared
            diff = float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())
            ratios = []
            for r in range(rounds):
                seconds = {}
                for fn in rng.sample([ours, theirs], 2):
                    t = time.perf_counter()
                    fn(r)
                    seconds[fn] = time.perf_counter() - t
                ratios.append(seconds[theirs] / seconds[ours])
            q1, med, q3 = statistics.quantiles(ratios, n=4)
            what = (f"{len(px)} images" if trunk == "image" else
                    f"{n} Flickr-length captions, sorted, batch {batch_size}")
            rows.append((f"{trunk}: last block at the {'class token' if trunk == 'image' else 'EOT'} alone vs "
                         "open_clip's forward", f"median of {rounds} paired ratios, quartiles {q1:.2f}-{q3:.2f}; "
                         f"{what} a round; features differ by {diff:.1e} (relative)", f"{med:.2f}x", "> 1x"))
    return rows


def text_rows(model, ref, tokens, batch_size: int, ceiling: float) -> tuple[list, float]:
    """Bucketed pre-projection text vs encode_text on the full 77-token context, and vs the ceiling."""
    t_b = best_of(lambda: model_mod.encode_window(model, tokens, batch_size, "cpu"), 1)
    sample = tokens[:256]  # the reference is slow; its rate does not depend on the captions

    def full():
        with torch.no_grad():
            for s in range(0, len(sample), batch_size):
                ref.encode_text(sample[s:s + batch_size])
    t_f = best_of(full, 1) * len(tokens) / len(sample)
    cap_rate = len(tokens) / t_b
    # Why the default text batch is small: within one window, bigger batches span more lengths (more padding).
    t_256 = best_of(lambda: model_mod.encode_window(model, tokens, 256, "cpu"), 1)
    gflops = text_flops(model, tokens, batch_size) / t_b / 1e9
    return [("text: bucketed vs encode_text@77", f"{cap_rate:.0f} vs {len(tokens) / t_f:.0f} cap/s "
             f"(batch {batch_size}, window {len(tokens)})", f"{t_f / t_b:.2f}x", ">= 6x"),
            (f"text: batch {batch_size} vs 256 (default check)", f"{cap_rate:.0f} vs {len(tokens) / t_256:.0f} "
             "cap/s", f"{t_256 / t_b:.2f}x", "> 1x"),
            ("text fp32 vs GEMM ceiling", f"{gflops:.0f} of {ceiling:.0f} GFLOP/s, counting the padding it runs",
             f"{gflops / ceiling:.0%}", "")], cap_rate


def image_rows(model, px, ceiling: float) -> tuple[list, float]:
    """Images/s against the ceiling, counted in model FLOPs."""
    flops = model_flops_per_image(model)
    img_rate = len(px) / best_of(lambda: model_mod.image_features(model, px), 2)
    bound = ceiling * 1e9 / flops
    return [("image fp32 vs GEMM ceiling", f"{img_rate:.2f} vs {bound:.2f} img/s ({flops / 1e9:.2f} GFLOP/img)",
             f"{img_rate / bound:.0%}", ">= 85%")], img_rate


def against_fp32(q, model, px, tokens, batch_size: int) -> tuple:
    """(images/s, captions/s, min image cosine, min text cosine) of a quantized copy, against fp32 features."""
    cos = torch.nn.functional.cosine_similarity
    img_rate = len(px) / best_of(lambda: model_mod.image_features(q, px), 1)
    cap_rate = len(tokens) / best_of(lambda: model_mod.encode_window(q, tokens, batch_size, "cpu"), 1)
    ci = cos(model_mod.image_features(q, px[:16]), model_mod.image_features(model, px[:16])).min()
    ct = cos(model_mod.encode_window(q, tokens[:256], batch_size, "cpu"),
             model_mod.encode_window(model, tokens[:256], batch_size, "cpu")).min()
    return img_rate, cap_rate, float(ci), float(ct)


def int8_alternative_rows(model, px, tokens, batch_size: int, fp32_rates) -> tuple[list, tuple]:
    """The int8 paths against fp32 on both trunks: int8-fbgemm and int8-ort (what those precisions run), and torch.ao's
    quantize_dynamic on every linear layer with its own 7-bit activations (faster, less faithful on text: why
    int8-fbgemm keeps some of the text trunk's attention in fp32).
    Returns the rows and {path: (images/s, captions/s, one-time seconds)} for int8-fbgemm and int8-ort."""
    import warnings
    t0 = time.perf_counter()
    ours = backends.quantize_int8_fbgemm(copy.deepcopy(model))
    setup = {"int8-fbgemm": time.perf_counter() - t0}
    t0 = time.perf_counter()
    ort = backends.prepare(copy.deepcopy(model), "int8-ort", "cpu")
    setup["int8-ort"] = time.perf_counter() - t0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantize_dynamic and its quantized tensors warn that they are deprecated
        every = torch.ao.quantization.quantize_dynamic(model_mod.linear_attention(copy.deepcopy(model)),
                                                       {torch.nn.Linear}, dtype=torch.qint8)
        rows, rates = [], {}
        for name, q in (("int8-fbgemm", ours), ("int8-ort", ort), ("not taken: quantize_dynamic, every linear", every)):
            img_rate, cap_rate, ci, ct = against_fp32(q, model, px, tokens, batch_size)
            if name in setup:
                rates[name] = (img_rate, cap_rate, setup[name])
            rows.append((f"int8 {name}", f"image {img_rate / fp32_rates[0]:.2f}x, text "
                         f"{cap_rate / fp32_rates[1]:.2f}x fp32; min cosine {ci:.5f} / {ct:.5f}",
                         f"{img_rate / fp32_rates[0]:.2f}x / {cap_rate / fp32_rates[1]:.2f}x",
                         ">= 1.5x both" if name in setup else ""))
    rows.append(("int8-ort one-time setup", ort.int8_kernels, f"{setup['int8-ort']:.0f} s",
                 "once per model and machine"))
    return rows, rates


def ort_weight_variants(model: torch.nn.Module, folder: Path) -> dict:
    """{label: int8-ort copy of ``model``} for each weight type `quantize_dynamic` offers, exported once into
    ``folder``."""
    onnx_int8._export(model, folder)
    out = {}
    shipped = onnx_int8.signed_weights_exact()
    for label, signed, reduce_range in ((f"unsigned 8-bit{'' if shipped else ' (shipped here)'}", False, False),
                                        ("signed 7-bit (reduce_range)", True, True),
                                        (f"signed 8-bit{' (shipped here)' if shipped else ''}", True, False)):
        sub = folder / label.split(" (")[0].replace(" ", "-")
        sub.mkdir()
        onnx_int8._quantize(folder, sub, signed, reduce_range)
        q = copy.deepcopy(model)
        q.visual, q.transformer = (onnx_int8.OnnxTrunk(sub / name, torch.get_num_threads()) for name in onnx_int8.FILES)
        out[label] = q
    return out


def ort_weight_rows(model, px, tokens, batch_size: int, fp32_rates) -> list:
    """Why int8-ort's weights are 8-bit at full range, signed where that is exact: each weight type `quantize_dynamic`
    offers, on both trunks, against fp32 (speed and min cosine). Without VNNI, signed weights take faster u8 x s8
    kernels whose 16-bit pair sums overflow at full range, and reduce_range keeps them in range at the cost of a bit;
    with VNNI the pairs sum into 32 bits and signed 8-bit weights are exact (onnx_int8.signed_weights_exact)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, q in ort_weight_variants(model, Path(tmp)).items():
            img_rate, cap_rate, ci, ct = against_fp32(q, model, px, tokens, batch_size)
            rows.append((f"int8-ort weights: {label}", f"image {img_rate / fp32_rates[0]:.2f}x, text "
                         f"{cap_rate / fp32_rates[1]:.2f}x fp32; min cosine {ci:.5f} / {ct:.5f}",
                         f"{ct:.5f}", ">= 0.999 text cosine"))
    return rows


def weight_rows() -> list:
    """`python bench.py --weights`: int8-ort's weight types (ort_weight_rows) beside int8-fbgemm, each against fp32
    as extract runs it, on 32 random images and 512 Flickr-like captions (random-init ViT-B/32): minutes, where the
    full bench takes half an hour or more."""
    torch.manual_seed(0)
    loaded = model_mod.load_model("ViT-B-32", "none")
    model = loaded.model
    model_mod.take_heads(model)
    batch = extract.resolve(extract.ExtractSettings(annotations=Path("."), images=Path("."),
                                                    cache=Path("."))).text_batch_size
    tokens, px = loaded.tokenizer(flickr_like_captions(512)), torch.randn(32, 3, 224, 224)
    fp32, fbgemm = (backends.prepare(model_mod.sharing_copy(model), p, "cpu") for p in ("fp32", "int8-fbgemm"))
    rates = against_fp32(fp32, model, px, tokens, batch)[:2]
    img_rate, cap_rate, ci, ct = against_fp32(fbgemm, model, px, tokens, batch)
    ratio = f"image {img_rate / rates[0]:.2f}x, text {cap_rate / rates[1]:.2f}x fp32"
    return [("int8-fbgemm, as extract runs it", f"{ratio}; min cosine {ci:.5f} / {ct:.5f}", f"{ct:.5f}",
             ">= 0.999 text cosine")] + ort_weight_rows(model, px, tokens, batch, rates)


def bf16_row(model, px) -> tuple:
    """bf16 trunk weights: speed and agreement with fp32 (fast only where the CPU has native bf16), both as extraction
    runs them."""
    m16, m32 = (backends.prepare(copy.deepcopy(model), p, "cpu") for p in ("bf16", "fp32"))
    t16 = best_of(lambda: model_mod.image_features(m16, px), 1)
    t32 = best_of(lambda: model_mod.image_features(m32, px), 1)
    cos = torch.nn.functional.cosine_similarity(model_mod.image_features(m16, px),
                                                model_mod.image_features(m32, px)).min()
    return ("image bf16 vs fp32", f"{len(px) / t16:.2f} vs {len(px) / t32:.2f} img/s, min cosine {cos:.5f}",
            f"{t32 / t16:.2f}x", ">= 2x where native")


def int8_recall_rows(n_images: int = 10_000, seeds=SEEDS, paths=("int8-fbgemm", "int8-ort"),
                     galleries: int = GALLERIES) -> list:
    """What int8 costs in recall on a model that has learned: the demo's world (ShapesCLIP, 10,000 images, so a
    test split of 1,000 images and 5,000 captions, as Flickr30k's), largest |change| of R@1/5/10 both ways. Two
    ways: the same heads on fp32 vs int8 features (what int8 does), on the test split and ``galleries`` more
    galleries of its size; and probes retrained on each cache with the same seeds, paired (what a user sees). A
    test split of 300 images (3,000 in all) could not resolve 1 pp, nor could one of 1,000 for the same heads."""
    rows, seconds = recall_change_rows({p: {"precision": p} for p in ("fp32", *paths)}, n_images, seeds, galleries)
    return rows + [(f"ShapesCLIP extract, {path} vs fp32", f"{seconds[path]:.0f} vs {seconds['fp32']:.0f} s for "
                    f"{n_images} images (a 128-wide toy: speed is measured at ViT-B/32 widths)",
                    f"{seconds['fp32'] / seconds[path]:.2f}x", "") for path in paths]


def decode_recall_rows(n_images: int = 10_000, seeds=SEEDS, galleries: int = GALLERIES) -> list:
    """What decoding JPEGs on the device (jpeg.py) costs, against PIL: min cosine on random-init ViT-B/32 over
    Flickr-like JPEGs, and the recall change on ShapesCLIP (its target world: JPEGs of 96-200 px, resized to 64),
    measured as int8_recall_rows measures int8's. On a CPU this runs the same code with libjpeg-turbo decoding, so
    it measures the resize and rounding; nvJPEG's own decoding differs a little more, and only benchmarks/gpu_check.py
    measures that."""
    import flickr_like
    rows, _ = recall_change_rows({"cpu": {"decode": "cpu"}, "device": {"decode": "device"}}, n_images, seeds,
                                 galleries)
    with tempfile.TemporaryDirectory() as tmp:
        ann = flickr_like.make(Path(tmp), 64)
        feats = {}
        for decode in ("cpu", "device"):
            extract.extract(extract.ExtractSettings(annotations=ann, images=ann.parent / "images",
                                                    cache=Path(tmp) / f"{decode}.h5", pretrained="none",
                                                    decode=decode), log=open(os.devnull, "w"))
            feats[decode] = torch.from_numpy(cache.load(Path(tmp) / f"{decode}.h5").image_features)
    cos = float(torch.nn.functional.cosine_similarity(feats["cpu"], feats["device"]).min())
    return [("decode on the device vs PIL: min cosine, image features", "random-init ViT-B/32, 64 Flickr-like "
             "JPEGs (500x375), decoded by libjpeg-turbo on this CPU", f"{cos:.6f}", ">= 0.999")] + rows


def recall_change_rows(variants: dict, n_images: int, seeds, galleries: int = 0) -> tuple[list, dict]:
    """Recall of ShapesCLIP on its target world for each variant of the extract settings, against the first.

    Returns rows (largest |change| of R@1/5/10 both ways: the same heads, zero-shot and probed on the first
    variant's cache, over the test split and ``galleries`` more galleries of its size cut from a second draw of the
    world, which no probe trains on; probes retrained on each cache, paired by seed) and each variant's extract
    seconds on the first world.
    """
    import io
    config, weights = SMALL_CLIP
    keys = [(d, k) for d in ("text_to_image", "image_to_text") for k in ("R@1", "R@5", "R@10")]
    names, caches, retrained, seconds, more = list(variants), {}, {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        def run(ann, kwargs, path):
            extract.extract(extract.ExtractSettings(annotations=ann, images=ann.parent / "images", cache=path,
                                                    model=str(config), pretrained=str(weights), **kwargs),
                            log=io.StringIO())
            return cache.load(path)

        ann = worlds.make_dataset(Path(tmp) / "target", "target", n_images=n_images, seed=0)
        for name, kwargs in variants.items():
            t0 = time.perf_counter()
            caches[name] = c = run(ann, kwargs, Path(tmp) / f"{name}.h5")
            seconds[name] = time.perf_counter() - t0
            runs = []
            for seed in seeds:
                probe.train(c, probe.ProbeSettings(seed=seed), Path(tmp) / f"{name}{seed}.pt", log=io.StringIO())
                runs.append(probe.evaluate(c, "test", Path(tmp) / f"{name}{seed}.pt")["probe"])
            retrained[name] = np.array([[r[d][k] for d, k in keys] for r in runs])  # seeds x keys
        first = names[0]
        test = {name: c.split("test") for name, c in caches.items()}
        size = test[first].n_images
        if galleries:
            ann = worlds.make_dataset(Path(tmp) / "more", "target", n_images=galleries * size, seed=1)
            more = {name: cut_galleries(run(ann, kwargs, Path(tmp) / f"{name}.more.h5").split("all"), size)
                    for name, kwargs in variants.items()}
        heads = {"zero-shot": probe.Heads.from_cache(caches[first]),
                 "probed": probe.load_checkpoint(Path(tmp) / f"{first}{seeds[0]}.pt")[0]}
        where = f"ShapesCLIP, {n_images} target-world images, test split"
        fixed = where + (f" and {galleries} more galleries of {size} images" if galleries else "")
        rows = []
        if len(seeds) > 1:  # what retraining alone moves, against which a retrained change must be read
            spread = retrained[first].std(0, ddof=1)
            rows.append((f"retraining noise on the {first} cache", where + f", R@1/5/10 both ways, standard deviation "
                         f"over seeds {list(seeds)}", f"{spread.min():.2f}-{spread.max():.2f} pp", ""))
        for name in names[1:]:
            pairs = [(test[first], test[name]), *zip(more.get(first, []), more.get(name, []))]
            same = {kind: paired_change(h, pairs) for kind, h in heads.items()}
            # Probes retrained with the same seed on each cache, paired: the change's mean over seeds, and twice its
            # standard error. Retraining alone moves R@K by 0.6-1.9 pp between seeds (fp32, 30 seeds), so a change
            # is resolved only where its interval is narrower than the budget.
            diff = retrained[name] - retrained[first]
            k = int(np.abs(diff.mean(0)).argmax())
            sem = diff[:, k].std(ddof=1) / np.sqrt(len(seeds)) if len(seeds) > 1 else float("nan")
            rows += [(f"{name} recall change, zero-shot heads", fixed + f", {same['zero-shot'][1]}, paired over the "
                      "queries: change +- 2 standard errors", same["zero-shot"][0], "<= 1 pp"),
                     (f"{name} recall change, same probed heads", fixed + f" (probe seed {seeds[0]}), "
                      f"{same['probed'][1]}, paired over the queries", same["probed"][0], "<= 1 pp"),
                     (f"{name} recall change, probes retrained", where + f", {'/'.join(keys[k])}, paired over "
                      f"seeds {list(seeds)}: mean +- 2 standard errors",
                      f"{diff[:, k].mean():+.2f} +- {2 * sem:.2f} pp", "<= 1 pp")]
    return rows, seconds


def cut_galleries(view: cache.SplitView, size: int) -> list:
    """``view`` cut into consecutive galleries of ``size`` images, each with its own captions, re-indexed from 0. A
    last gallery short of ``size`` is left out: recall depends on how many items a query is ranked among."""
    out = []
    for start in range(0, view.n_images - size + 1, size):
        caps = np.flatnonzero((view.text_image_index >= start) & (view.text_image_index < start + size))
        out.append(cache.SplitView(name=f"{view.name}[{start}:{start + size}]",
                                   image_rows=view.image_rows[start:start + size], caption_rows=view.caption_rows[caps],
                                   image_features=view.image_features[start:start + size],
                                   text_features=view.text_features[caps],
                                   text_image_index=view.text_image_index[caps] - start))
    return out


def paired_change(heads, pairs) -> tuple[str, str]:
    """The largest change of R@1/5/10 (either way) from the features of each pair's first split view to its second's
    under the same heads, +- twice its standard error over the queries, paired: (that change, which recall it is).
    Each pair is a gallery (a query is ranked within its own), and the queries of all of them are pooled. With the
    same heads the change is all the features' doing, but a gallery of 1,000 images turns 1 image into 0.1 pp; the
    interval says which changes that sampling resolves."""
    def hits(view):
        with torch.no_grad():
            img, txt = heads.embed(view)
        t2i, i2t = metrics.ranks(img, txt, torch.from_numpy(view.text_image_index))
        return {(d, k): (r <= k).double() for d, r in (("text_to_image", t2i), ("image_to_text", i2t))
                for k in metrics.KS}
    diffs = {}
    for a, b in pairs:
        ha, hb = hits(a), hits(b)
        for key in ha:
            diffs.setdefault(key, []).append((hb[key] - ha[key]) * 100)
    diffs = {key: torch.cat(d) for key, d in diffs.items()}
    key = max(diffs, key=lambda key: abs(float(diffs[key].mean())))
    d = diffs[key]
    return f"{float(d.mean()):+.2f} +- {2 * float(d.std()) / len(d) ** 0.5:.2f} pp", f"{key[0]}/R@{key[1]}"


def auto_rows(sizes=(96, 1024), small_pairs: int = 3) -> list:
    """--precision auto against fp32, end to end: each a fresh process from start to sealed cache, random-init
    ViT-B/32, 5 captions an image. As a first-time user meets it (an empty $XDG_CACHE_HOME, nothing compiled or
    exported) for every size; and for the largest, once more after `cli.py bench --compiled` has measured every
    path and kept int8-ort's export (the bench itself not counted): what every later job on that machine sees.
    A small job (under 200 images) runs ``small_pairs`` pairs, alternating which goes first, and reports the median
    ratio: whole runs of the same command differ by several seconds from noise alone on a shared 2-core machine."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(n, "first time") for n in sizes] + [(max(sizes), "after cli.py bench --compiled")]
        for n, when in runs:
            ann = Path(tmp) / f"w{n}" / "annotations.csv"
            if not ann.exists():
                worlds.make_dataset(ann.parent, "source", n_images=n, size=224)
            pairs = small_pairs if n < 200 else 1
            took, line = {"fp32": [], "auto": []}, ""
            for k in range(pairs):
                env = {**os.environ, "XDG_CACHE_HOME": f"{tmp}/xdg_{n}_{when[0]}_{k}"}
                if when != "first time":
                    subprocess.run([sys.executable, str(ROOT / "cli.py"), "bench", "--model", "ViT-B-32",
                                    "--pretrained", "none",
                                    "--compiled"], capture_output=True, text=True, env=env, check=True)
                for precision in ("fp32", "auto")[::1 if k % 2 == 0 else -1]:
                    cmd = [sys.executable, str(ROOT / "cli.py"), "extract", "--annotations", str(ann), "--images",
                           str(ann.parent / "images"), "--cache", f"{tmp}/{n}_{when[0]}_{k}_{precision}.h5",
                           "--pretrained", "none", "--precision", precision]
                    t0 = time.perf_counter()
                    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
                    took[precision].append(time.perf_counter() - t0)
                    if precision == "auto":
                        line = next(ln for ln in out.stderr.splitlines() if ln.startswith("precision auto"))
            ratios = [f / a for f, a in zip(took["fp32"], took["auto"])]
            k = int(np.argsort(ratios)[len(ratios) // 2])  # the median pair
            seconds = f"{took['auto'][k]:.0f} vs {took['fp32'][k]:.0f} s" + (
                f" (median of {pairs} alternated pairs: {', '.join(f'{r:.2f}x' for r in ratios)})" if pairs > 1 else "")
            # What auto took and why, and what calibrating cost, without the record's path.
            why = line.split("; from ")[0].split("; kept in ")[0]
            rows.append((f"auto vs fp32 end to end, {n} images, {when}", f"{seconds}; {why}",
                         f"{ratios[k]:.2f}x", "never < 0.91x" if n < 200 else ">= 1.5x where a path pays"))
    return rows


def probe_rows(img_rate: float, cap_rate: float) -> list:
    n_img, n_cap = 25_426, 127_130
    rng = np.random.default_rng(0)
    idx = np.repeat(np.arange(n_img), 5)
    x_img = torch.from_numpy(rng.standard_normal((n_img, 768), dtype=np.float32))
    x_txt = torch.from_numpy(rng.standard_normal((n_cap, 512), dtype=np.float32))
    settings = probe.ProbeSettings()
    init = probe.Heads(torch.randn(768, 512) / 28, torch.randn(512, 512) / 23, torch.tensor(4.6))
    heads = probe.Heads(*(t.clone().requires_grad_(True)
                          for t in (init.visual_proj, init.text_projection, init.logit_scale)))
    opt = torch.optim.AdamW([heads.visual_proj, heads.text_projection, heads.logit_scale], lr=settings.lr)
    sampler = probe.CaptionSampler(idx, n_img)
    gen = torch.Generator().manual_seed(0)
    t_epoch = best_of(lambda: probe._train_epoch(heads, init, opt, x_img, x_txt, sampler, settings, gen), 2)
    trunk_epoch = n_img / img_rate + n_img / cap_rate  # one image and one caption per image, through the trunks
    view = cache.SplitView("test", np.arange(1000), np.arange(5000), x_img[:1000].numpy(), x_txt[:5000].numpy(),
                           idx[:5000])
    t_eval = best_of(lambda: probe.evaluate_heads(init, view), 3)
    return [("probe epoch, Flickr-sized cache", f"{t_epoch:.2f} s (budget 3 s) vs {trunk_epoch / 60:.0f} min with "
             "the trunks", f"{trunk_epoch / t_epoch:.0f}x", ">= 500x, <= 3 s"),
            ("eval, 1,000-image split", f"{t_eval * 1000:.0f} ms (5,000 captions)", f"{t_eval:.2f} s", "<= 1 s")]


def memory_row() -> tuple:
    """Peak RSS of two real extract runs, one 4x the other: flat means streaming works. 120 images and more: a run of
    30 is one partial batch of each kind, before malloc's heap has met every size a run needs."""
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (120, 480):
            ann = worlds.make_dataset(Path(tmp) / f"d{n}", "source", n_images=n, size=64)
            code = ("import resource, sys; from pathlib import Path; from finetune_clip import cli, extract\n"
                    "cli.keep_freed_memory()\n"  # as the command line runs it
                    f"extract.extract(extract.ExtractSettings(annotations=Path(r'{ann}'), images=Path(r'{ann.parent}')"
                    f" / 'images', cache=Path(r'{tmp}') / 'c{n}.h5', pretrained='none', workers=1),"
                    " log=open('/dev/null', 'w'))\n"
                    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            peaks[n] = int(out.stdout.split()[-1]) / 1024
    return ("extract peak memory, 120 vs 480 images", f"{peaks[120]:.0f} vs {peaks[480]:.0f} MiB",
            f"{peaks[480] / peaks[120]:.2f}x", "flat (~1.0x)")


def part_main(which: str) -> None:
    """`python bench.py --precision`: the auto rows and the recall rows of int8-fbgemm, int8-ort and bf16 (auto
    takes bf16 where it measures fastest, as on an AMX Xeon), without the rest of the bench (an hour on AVX2);
    `--decode`: decoding on the device against PIL (fidelity and recall); `--trunks`: the fp32 trunks'
    rows and their Flickr30k projection (a few minutes); `--weights`: int8-ort's weight types (weight_rows)."""
    print(header())
    if which == "--trunks":
        rows, *_, (img_rate, cap_rate) = fp32_trunk_rows()
        rows.append(flickr_row("fp32", img_rate, cap_rate))
    elif which == "--precision":
        rows = auto_rows() + int8_recall_rows(paths=("int8-fbgemm", "int8-ort", "bf16"))
    elif which == "--weights":
        rows = weight_rows()
    else:
        rows = decode_recall_rows()
    print_rows(rows)


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    from finetune_clip import cli
    cli.keep_freed_memory()  # as `cli.py` does, so the trunks are timed as extraction runs them
    part = [a for a in sys.argv[1:] if a in ("--precision", "--decode", "--trunks", "--weights")]
    part_main(part[0]) if part else main()
