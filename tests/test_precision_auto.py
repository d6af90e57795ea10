"""--precision auto and `cli.py bench`: measured on this machine, recorded per machine, never trusted when stale.

These tests never guess how fast the machine is: they check what auto decides from the rates it
measured (or from a record the test writes), not which path wins here.
"""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from finetune_clip import autoprecision, backends, cache, cli, extract
from finetune_clip import model as model_mod

from conftest import SMALL_CLIP, make_synthetic_cache

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def record_home(tmp_path, monkeypatch):
    """Every test starts as a first-time user: an empty $XDG_CACHE_HOME of its own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg"


@pytest.fixture(scope="module")
def small():
    """The project's small CLIP architecture, random init (fast), with a calibration batch."""
    loaded = model_mod.load_model(str(SMALL_CLIP[0]), "none")
    model_mod.take_heads(loaded.model)
    pixels = torch.randn(autoprecision.CAL_IMAGES, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    tokens = loaded.tokenizer(autoprecision.flickr_like_captions(autoprecision.CAL_CAPTIONS))
    return loaded, pixels, tokens


def run_auto(small, n_images, n_captions, log=None):
    loaded, pixels, tokens = small
    return autoprecision.auto_precision(loaded.model, "cpu", pixels, tokens, n_images, n_captions, "small-test", 64,
                                        log or io.StringIO())


def test_a_short_job_takes_fp32_without_calibrating(small, record_home, monkeypatch):
    """Up to 24 calibration batches (8 images, 128 captions: shorter than 3 calibrations, which a path at 1.5x fp32
    would not repay) nothing is timed; one image more, fp32 is timed on a tiny batch (2 images) before anything
    else is."""
    timed = []
    real = autoprecision.measure_path
    monkeypatch.setattr(autoprecision, "measure_path", lambda *a, **k: timed.append(len(a[3])) or real(*a, **k))
    assert autoprecision.WORTH * autoprecision.CAL_PASSES == 24
    precision, prepared, line = run_auto(small, 24 * 8, 24 * 128)
    assert precision == "fp32" and prepared is None and timed == []
    assert line.startswith("precision auto: fp32 (a short job")
    run_auto(small, 24 * 8 + 1, 24 * 128)
    assert timed[0] == 2
    assert not autoprecision.record_path().exists() or len(timed) > 1  # a record only where the paths were calibrated


def test_a_long_job_calibrates_every_path_records_it_and_the_next_run_decides_at_once(small, monkeypatch):
    monkeypatch.setattr(autoprecision, "LONG_JOB_S", float("inf"))  # leave int8-ort's minute-long export out
    precision, _, line = run_auto(small, 10_000_000, 50_000_000)
    record = json.loads(autoprecision.record_path().read_text())
    (entry,) = record["entries"].values()
    assert set(entry) == {"fp32", "bf16", "int8-fbgemm"}
    faithful = {k: v for k, v in entry.items() if not v["struck"]}
    best = min(faithful, key=lambda k: autoprecision.projected_s(faithful[k], 10_000_000, 50_000_000))
    assert precision == best and "calibrated in" in line
    for m in entry.values():
        assert m["struck"] or min(m["cos_image"], m["cos_text"]) >= autoprecision.FAITHFUL

    def no_measuring(*args, **kwargs):
        raise AssertionError("the record should have decided")
    monkeypatch.setattr(autoprecision, "measure_path", no_measuring)
    again, prepared, line = run_auto(small, 10_000_000, 50_000_000)
    assert again == precision and prepared is None and "from " in line


def test_int8_takes_the_fastest_faithful_int8_backend_never_another_path(small, monkeypatch):
    """`--precision int8` measures the int8 backends against fp32 and takes the one the job runs fastest with, even
    where fp32 or bf16 would be faster (a width-128 toy: fp32 may well be); a short job takes int8-fbgemm, which needs
    no export, without timing anything."""
    loaded, pixels, tokens = small

    def run(n_images, n_captions):
        return autoprecision.auto_precision(loaded.model, "cpu", pixels, tokens, n_images, n_captions, "int8-test",
                                            64, io.StringIO(), among=backends.INT8)
    precision, prepared, line = run(24 * 8, 24 * 128)
    assert (precision, prepared) == ("int8-fbgemm", None) and line.startswith("precision int8: int8-fbgemm (a short")
    precision, prepared, line = run(10_000_000, 50_000_000)  # long: int8-ort's export is measured too
    (entry,) = json.loads(autoprecision.record_path().read_text())["entries"].values()
    assert set(entry) == {"fp32", *backends.INT8}
    int8 = {k: autoprecision.projected_s(entry[k], 10_000_000, 50_000_000) for k in backends.INT8
            if not entry[k]["struck"]}
    assert precision == min(int8, key=int8.get) and line.startswith(f"precision int8: {precision} (")
    assert (type(prepared.visual).__name__ == "OnnxTrunk") == (precision == "int8-ort")  # the path it prepared
    for name in backends.INT8:  # a record where neither is faithful: one line that names each one's reason
        entry[name]["struck"] = "min cosine 0.98 < 0.999 to fp32"
    autoprecision.write_record(autoprecision.record_key("cpu", "int8-test"), entry)
    with pytest.raises(autoprecision.PrecisionError, match="int8-fbgemm min cosine 0.98.*use --precision fp32"):
        run(10_000_000, 50_000_000)


def test_calibrating_leaves_the_callers_model_as_open_clip_built_it(small):
    """prepare rewrites the model it is given (attention as two Linear layers, fp32 included). Calibration prepares
    copies: the paths after fp32, and extract afterwards, start from open_clip's own modules (int8-ort's export keys
    on their names, and writes MultiheadAttention blocks out by hand)."""
    _, pixels, tokens = small
    model = model_mod.load_model(str(SMALL_CLIP[0]), "none").model
    model_mod.take_heads(model)
    before = {name: type(m) for name, m in model.named_modules()}
    assert torch.nn.MultiheadAttention in before.values()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    _, prepared = autoprecision.measure_paths(model, ["int8-fbgemm", "bf16"], "cpu", pixels[:2], tokens[:8], 64)
    assert {name: type(m) for name, m in model.named_modules()} == before
    assert model_mod.LinearSelfAttention in {type(m) for m in prepared["fp32"].modules()}
    # The copies share the caller's weights (model.sharing_copy) and leave them as they were: bf16's cast too.
    after = model.state_dict()
    assert after.keys() == weights.keys()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in weights.items())
    assert prepared["bf16"].transformer.resblocks[0].mlp.c_fc.weight.dtype == torch.bfloat16
    mlp = "transformer.resblocks.0.mlp.c_fc.weight"
    assert prepared["fp32"].state_dict()[mlp].data_ptr() == after[mlp].data_ptr()


def test_a_path_with_non_finite_features_is_struck_with_its_reason(small, monkeypatch):
    monkeypatch.setattr(autoprecision, "LONG_JOB_S", float("inf"))
    prepare = backends.prepare

    def broken_bf16(model, precision, device):
        q = prepare(model, precision, device)
        if precision == "bf16":
            with torch.no_grad():
                q.visual.ln_post.weight.fill_(float("nan"))
        return q
    monkeypatch.setattr(backends, "prepare", broken_bf16)
    precision, _, line = run_auto(small, 10_000_000, 50_000_000)
    entry = next(iter(json.loads(autoprecision.record_path().read_text())["entries"].values()))
    assert entry["bf16"]["struck"] == "non-finite features on the calibration batch"
    assert precision != "bf16" and "bf16 struck: non-finite" in line


def test_a_path_that_fails_to_prepare_is_struck_with_the_line_that_says_why(small, monkeypatch):
    """A compiler's failure opens with "backend='inductor' raised:"; the reason, one line, is what the record and
    the bench show."""
    monkeypatch.setattr(autoprecision, "LONG_JOB_S", float("inf"))
    prepare = backends.prepare

    def failing_int8_fbgemm(model, precision, device):
        if precision == "int8-fbgemm":
            raise RuntimeError("backend='inductor' raised:\nCppCompileError: C++ compile error\n\nCommand:\ng++ x.cpp")
        return prepare(model, precision, device)
    monkeypatch.setattr(backends, "prepare", failing_int8_fbgemm)
    run_auto(small, 10_000_000, 50_000_000)
    entry = next(iter(json.loads(autoprecision.record_path().read_text())["entries"].values()))
    assert entry["int8-fbgemm"]["struck"] == "failed: CppCompileError: C++ compile error"
    assert autoprecision.first_reason(ValueError("one line")) == "one line"
    assert autoprecision.first_reason(KeyError()) == "KeyError"


@pytest.mark.parametrize("n, per_item, expected_calls", [(8, 3.0, [2]), (8, 1.5, [2, 8]), (8, None, [2, 8]),
                                                       (128, 3.0, [8]), (128, 1.5, [8, 128]), (128, None, [8, 128]),
                                                       (2, None, [2])])
def test_a_trunk_under_half_fp32s_rate_on_the_same_first_slice_is_timed_on_that_slice_alone(monkeypatch, n, per_item,
                                                                                            expected_calls):
    """On a clock the test drives: fp32 took 1 s an item on the first slice (a sixteenth, at least 2: 2 of 8 items,
    8 of 128); a path at 3 s an item stops after that slice (features of those items); one at 1.5 s an item goes
    on to one timing of the whole batch; fp32 itself (no fp32 to compare with) is timed on the slice, which later
    paths are compared on, and on the whole batch. A batch no larger than its slice (auto's tiny 2 images) is timed
    once."""
    clock, calls = [0.0], []

    class FakeTime:
        @staticmethod
        def perf_counter():
            return clock[0]
    monkeypatch.setattr(autoprecision, "time", FakeTime)

    def run(k):
        calls.append(k)
        clock[0] += k * (per_item or 1.0)
        return torch.arange(k)
    first = expected_calls[0]
    seconds, feats, first_s = autoprecision.time_trunk(run, n, "cpu", None if per_item is None else first * 1.0)
    assert calls == expected_calls and first_s == pytest.approx(first * (per_item or 1.0))
    assert len(feats) == expected_calls[-1] and seconds == pytest.approx(expected_calls[-1] * (per_item or 1.0))


def drive_clock(monkeypatch, seconds):
    """Calibration timed by the test: every ``autoprecision._timed`` of n items by the path being measured reads
    ``seconds(path, n)`` (the features are still computed); prepare is watched to know which path that is."""
    current = []
    real_prepare, real_timed = backends.prepare, autoprecision._timed

    def prepare(model, name, *args, **kwargs):
        current.append(name)
        return real_prepare(model, name, *args, **kwargs)
    monkeypatch.setattr(backends, "prepare", prepare)
    monkeypatch.setattr(autoprecision, "_timed",
                        lambda fn, n, device: (seconds(current[-1], n), real_timed(fn, n, device)[1]))


@pytest.mark.parametrize("slice_per_item, stops", [(1.2, False), (2.5, True)])
def test_a_path_is_compared_with_fp32_on_the_same_slice_not_with_fp32s_whole_batch_rate(small, monkeypatch,
                                                                                       slice_per_item, stops):
    """Small batches run slower per item. As the test times them, fp32 takes 1 s an item on the first slice and
    0.5 s an item on the whole batch; a path at 1.2 s an item on the slice (0.4 on the whole batch) wins, and is
    timed on the whole batch (against fp32's whole-batch rate it would read 0.42x and stop); one at 2.5 s an item
    on the slice stops there."""
    loaded, pixels, tokens = small
    tokens = tokens[:48]  # slices of 2 images and 3 captions, whole batches of 8 and 48: each size tells its call
    per_item = {"fp32": (1.0, 0.5), "bf16": (slice_per_item, 0.4)}  # (on the first slice, on the whole batch)
    drive_clock(monkeypatch, lambda path, n: n * per_item[path][n in (len(pixels), len(tokens))])
    measured, _ = autoprecision.measure_paths(loaded.model, ["bf16"], "cpu", pixels, tokens, 64)
    assert measured["fp32"]["first_slice_s"] == pytest.approx([2.0, 3.0])
    assert (measured["bf16"]["timed_on"] != [len(pixels), len(tokens)]) == stops


@pytest.mark.parametrize("bf16_slice_per_item, stops", [(0.7, False), (0.9, True)])
def test_a_path_is_held_to_the_fastest_path_before_it_not_only_to_fp32(small, monkeypatch, bf16_slice_per_item,
                                                                       stops):
    """As on a Xeon without AMX: int8-fbgemm (measured before bf16) at 0.4 s an item on the first slice against fp32's
    1 s. bf16 at 0.9 s an item there is faster than fp32 but under half int8's rate: it stops at the slice. At 0.7 s
    it is within half of int8's rate and is timed on the whole batch."""
    loaded, pixels, tokens = small
    tokens = tokens[:48]
    per_item = {"fp32": 1.0, "int8-fbgemm": 0.4, "bf16": bf16_slice_per_item}
    drive_clock(monkeypatch, lambda path, n: n * per_item[path])
    measured, _ = autoprecision.measure_paths(loaded.model, ["int8-fbgemm", "bf16"], "cpu", pixels, tokens, 64)
    assert measured["int8-fbgemm"]["timed_on"] == [len(pixels), len(tokens)]
    assert (measured["bf16"]["timed_on"] == [2, 3]) == stops
    assert autoprecision.PATHS["cpu"].index("int8-fbgemm") < autoprecision.PATHS["cpu"].index("bf16")


@pytest.mark.parametrize("job, bf16_image_per_item, text_stops", [(None, 3.0, False), ((1000, 100), 3.0, True),
                                                                  ((1000, 100), 0.6, False)])
def test_a_path_whose_images_alone_lose_the_job_stops_its_text_at_the_slice(small, monkeypatch, job,
                                                                            bf16_image_per_item, text_stops):
    """As on a Xeon without AMX: int8-fbgemm at 0.4 s an item on both trunks, bf16's text slice at 0.7 s an item,
    within the 2x of time_trunk. Calibrating for a job of 1,000 images and 100 captions, bf16 at 3 s an image
    projects 3,000 s of images alone against int8-fbgemm's whole job of about 440 s: it cannot win, and its text
    stops at the slice. At 0.6 s an image (about 670 s against 440) it might, and its text runs the whole batch, as
    it does wherever no job is given (`cli.py bench`)."""
    loaded, pixels, tokens = small
    tokens = tokens[:48]  # slices of 2 images and 3 captions: a size of 3 or 48 is text
    per_item = {"fp32": (1.0, 1.0), "int8-fbgemm": (0.4, 0.4), "bf16": (bf16_image_per_item, 0.7)}
    drive_clock(monkeypatch, lambda path, n: n * per_item[path][n in (3, len(tokens))])
    measured, _ = autoprecision.measure_paths(loaded.model, ["int8-fbgemm", "bf16"], "cpu", pixels, tokens, 64, job=job)
    assert measured["int8-fbgemm"]["timed_on"] == [len(pixels), len(tokens)]
    assert measured["bf16"]["timed_on"][1] == (3 if text_stops else len(tokens))
    assert measured["bf16"]["timed_on"][0] == (2 if bf16_image_per_item > 0.8 else len(pixels))


@pytest.mark.parametrize("int8_image_rate, timed_again", [(2.2, [("image", "fp32"), ("image", "int8-fbgemm")]),
                                                          (4.0, [])])
def test_a_trunk_is_timed_again_only_where_paths_come_close(monkeypatch, int8_image_rate, timed_again):
    """Each path is timed once on the whole batch; where two or more faithful paths on a trunk come within CLOSE
    (1.25x) of its fastest, each of those is timed once more and keeps the faster reading. fp32 at 2 images/s and
    int8-fbgemm at 2.2 (1.1x) are timed again on images, and read 2.5 and 2.75 now; at 4.0 (2x) nothing is. Text (4x)
    is never close, and bf16, stopped at its slice, and a path struck are never timed again."""
    def entry(image_rate, caption_rate, timed_on=(8, 128), struck=""):
        return {"image_rate": image_rate, "caption_rate": caption_rate, "timed_on": list(timed_on), "struck": struck}
    measured = {"fp32": entry(2.0, 10.0), "int8-fbgemm": entry(int8_image_rate, 40.0),
                "bf16": entry(2.1, 11.0, timed_on=(2, 8)), "int8-ort": entry(2.3, 39.0, struck="min cosine")}
    calls = []
    monkeypatch.setattr(autoprecision, "_runners", lambda q, *args: (("image", q), ("text", q)))

    def timed(run, n, device):
        calls.append(run)
        return n / 2.5 if run[1] == "fp32" else n / 2.75, None
    monkeypatch.setattr(autoprecision, "_timed", timed)
    autoprecision.time_again_where_close(measured, {k: k for k in measured}, "cpu", torch.zeros(8, 3, 2, 2),
                                         torch.zeros(128, 77, dtype=torch.long), 64)
    assert calls == timed_again
    if timed_again:
        assert measured["fp32"]["image_rate"] == pytest.approx(2.5)
        assert measured["int8-fbgemm"]["image_rate"] == pytest.approx(2.75)
    assert measured["fp32"]["caption_rate"] == 10.0 and measured["bf16"]["image_rate"] == 2.1


def test_a_path_already_prepared_and_run_is_not_warmed_up_again(small, monkeypatch):
    """auto's fp32 has been prepared and run for its tiny timing: its calibration starts with the timed first slice
    (2 images), where a path prepared afresh first runs 2 images untimed."""
    loaded, pixels, tokens = small
    sizes = []
    real = model_mod.image_features
    monkeypatch.setattr(model_mod, "image_features", lambda q, px: sizes.append(len(px)) or real(q, px))
    _, q, _ = autoprecision.measure_path(loaded.model, "fp32", "cpu", pixels, tokens[:16], 64)
    assert sizes == [2, 2, 8]
    sizes.clear()
    autoprecision.measure_path(loaded.model, "fp32", "cpu", pixels, tokens[:16], 64, prepared=(q, 0.0))
    assert sizes == [2, 8]


def test_auto_prepares_fp32_once_for_its_tiny_timing_and_its_calibration(small, monkeypatch):
    monkeypatch.setattr(autoprecision, "LONG_JOB_S", float("inf"))
    prepared = []
    real_prepare = backends.prepare

    def prepare(model, name, *args, **kwargs):
        prepared.append(name)
        return real_prepare(model, name, *args, **kwargs)
    monkeypatch.setattr(backends, "prepare", prepare)
    run_auto(small, 10_000_000, 50_000_000)
    assert prepared.count("fp32") == 1 and "int8-fbgemm" in prepared


@pytest.mark.parametrize("damage", ["broken json", "other machine", "other torch", "older paths"])
def test_a_damaged_or_stale_record_is_ignored_with_a_note(small, monkeypatch, damage):
    monkeypatch.setattr(autoprecision, "LONG_JOB_S", float("inf"))
    path = autoprecision.record_path()
    path.parent.mkdir(parents=True)
    fake = {"fp32": {"image_rate": 1.0, "caption_rate": 1.0, "setup_s": 0.0, "cos_image": 1.0, "cos_text": 1.0,
                     "struck": ""}}
    fake["bf16"] = fake["int8-fbgemm"] = {**fake["fp32"], "image_rate": 1000.0, "caption_rate": 1000.0}
    key = json.loads(autoprecision.record_key("cpu", "small-test"))
    if damage == "broken json":
        path.write_text('{"version": 1, "entries": {')
    else:  # "older paths": measured before a change that moved the paths' speeds
        field, value = {"other machine": ("cpu", "something else"), "other torch": ("torch", "something else"),
                        "older paths": ("paths", autoprecision.PATHS_REVISION - 1)}[damage]
        key["machine"][field] = value
        path.write_text(json.dumps({"version": 1, "entries": {json.dumps(key, sort_keys=True): fake}}))
    log = io.StringIO()
    precision, _, line = run_auto(small, 10_000_000, 50_000_000, log)
    assert "measuring" in log.getvalue() and "calibrated in" in line  # measured, not read
    entries = json.loads(path.read_text())["entries"]
    assert autoprecision.record_key("cpu", "small-test") in entries


def test_extract_auto_records_the_concrete_precision_and_a_resume_keeps_it(shapes, tmp_path):
    annotations, images = shapes
    path = tmp_path / "auto.h5"
    settings = extract.ExtractSettings(annotations=annotations, images=images, cache=path, model=str(SMALL_CLIP[0]),
                                       pretrained="none", precision="auto", workers=0)
    log = io.StringIO()
    extract.extract(settings, log=log)
    assert "precision auto: fp32 (a short job" in log.getvalue()
    assert cache.read_attrs(path)["precision"] == "fp32"
    # A partial cache started in another precision is resumed in that precision, whatever auto would pick.
    partial = make_synthetic_cache(tmp_path / "partial.h5")
    import h5py
    with h5py.File(partial, "r+") as f:
        f.attrs["precision"] = "int8-fbgemm"
    resumed = extract._choose_precision(extract.ExtractSettings(annotations=annotations, images=images,
                                                                cache=partial, precision="auto"),
                                        None, [], None, None, io.StringIO())
    assert resumed[0] == "int8-fbgemm" and "was started with" in resumed[2]


def test_int8_fbgemm_is_faithful_on_the_real_architecture(extracted, reference_model):
    """torch.ao's fbgemm int8 against fp32 on a random-init ViT-B/32."""
    import copy
    loaded = reference_model
    m = copy.deepcopy(loaded.model)
    model_mod.take_heads(m)
    q = backends.prepare(copy.deepcopy(m), "int8-fbgemm", "cpu")
    px = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    tokens = loaded.tokenizer(["a dog runs on the beach", "two people sit near the water ."])
    cos = torch.nn.functional.cosine_similarity
    assert float(cos(model_mod.image_features(q, px), model_mod.image_features(m, px)).min()) > 0.99
    with torch.no_grad():
        a, b = model_mod.text_features(q, tokens), model_mod.text_features(m, tokens)
    assert float(cos(a, b).min()) > 0.99 and np.isfinite(a.numpy()).all()
    # The last block's out_proj and MLP run at one position per image or caption: they stay fp32, the rest is int8
    # (in the text trunk, the attention's input projection only where activations take their full range).
    dynamic = {name for name, module in q.named_modules() if isinstance(module, backends.Int8Linear)}
    for trunk in ("visual.transformer", "transformer"):
        assert not any(name.startswith(f"{trunk}.resblocks.11.") and ".in_proj" not in name for name in dynamic)
        assert f"{trunk}.resblocks.10.mlp.c_fc" in dynamic
    assert "visual.transformer.resblocks.11.attn.in_proj" in dynamic
    assert ("transformer.resblocks.0.attn.in_proj" in dynamic) == backends.fbgemm_full_range()
    assert "transformer.resblocks.0.attn.out_proj" not in dynamic
    full = backends.fbgemm_full_range()
    assert all(module.reduce_range != full for name, module in q.named_modules() if name in dynamic)


@pytest.mark.parametrize("full_range", [False, True])
def test_int8_linear_is_what_torch_ao_quantize_dynamic_builds_to_the_bit(full_range):
    """Int8Linear packs its weights once, where torch.ao's nnqd.Linear packs a placeholder first: the same quantized
    weights and the same kernel, so the same output to the bit (one process, one thread count), 7-bit activations
    as torch.ao's own forward and 8-bit as its kernel with reduce_range off."""
    import warnings

    import torch.ao.nn.quantized.dynamic as nnqd
    from torch.ao.quantization import per_channel_dynamic_qconfig
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(40, 96, generator=gen) * torch.rand(40, 1, generator=gen))
    x = torch.randn(7, 5, 96, generator=gen) * 3
    linear.qconfig = per_channel_dynamic_qconfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = nnqd.Linear.from_float(linear)
        ours = backends.Int8Linear(linear, full_range)
        want = (torch.ops.quantized.linear_dynamic(x, theirs._packed_params._packed_params, reduce_range=False)
                if full_range else theirs(x))
        assert torch.equal(torch.ops.quantized.linear_unpack(ours.packed)[0].int_repr(),
                           theirs.weight().int_repr())
    assert torch.equal(ours(x), want)
    assert not torch.equal(ours(x), backends.Int8Linear(linear, not full_range)(x))  # the range is its own


def test_fbgemm_takes_full_range_activations_only_where_its_products_do_not_saturate():
    """fbgemm_full_range measures the kernel: on fbgemm's AVX2 and plain AVX-512 kernels (FBGEMM_ENABLE_INSTRUCTIONS
    holds it to them) a product of full-range activations saturates its 16-bit pair sums, and int8-fbgemm keeps
    7-bit activations; on this CPU's own kernels it answers as it measures. Each in a fresh process."""
    code = "from finetune_clip import backends; print(backends.fbgemm_full_range())"

    def ask(isa):  # the three processes run side by side
        env = {k: v for k, v in os.environ.items() if k != "FBGEMM_ENABLE_INSTRUCTIONS"}
        if isa:
            env["FBGEMM_ENABLE_INSTRUCTIONS"] = isa
        return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    answers = {isa: ask(isa) for isa in ("AVX2", "AVX512", "")}
    answers = {isa: proc.communicate(timeout=300)[0].strip() for isa, proc in answers.items()}
    assert answers == {"AVX2": "False", "AVX512": "False", "": str(backends.fbgemm_full_range())}


def test_bench_ends_with_the_recommendation_and_fills_the_record(shapes, monkeypatch):
    annotations, images = shapes
    r = CliRunner().invoke(cli.cli, ["bench", "--model", str(SMALL_CLIP[0]), "--pretrained", "none",
                                     "--annotations", str(annotations), "--images", str(images)])
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert lines[0].startswith("model: ") and lines[1].startswith("machine: ") and "GEMM ceiling" in lines[2]
    assert lines[-1].startswith("recommended: --precision ") and "24 images, 120 captions" in lines[-1]
    for path in ("fp32", "bf16", "int8-fbgemm"):
        assert any(ln.startswith(path + " ") for ln in lines), path
    assert autoprecision.record_path().exists()
