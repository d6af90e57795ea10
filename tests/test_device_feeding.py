"""Feeding a GPU, tested on the CPU: defaults chosen from the device, captions tokenized in the workers,
JPEGs decoded in batches on the device with PIL as the fallback, and writes that overlap the trunks.

The device decoding runs here with device="cpu" (torchvision decodes with libjpeg-turbo): the same code
as on a GPU, less nvJPEG itself. benchmarks/gpu_check.py measures that part on a GPU.
"""
import io
import shutil
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from PIL import Image

from finetune_clip import cache, extract, jpeg
from finetune_clip import model as model_mod

from conftest import ROOT, SMALL_CLIP

SMALL = str(SMALL_CLIP[0])  # the small architecture, random init: fast


def settings_for(annotations, images, path, **kw):
    return extract.ExtractSettings(annotations=annotations, images=images, cache=path, model=SMALL,
                                   pretrained="none", workers=0, batch_size=8, text_batch_size=16, **kw)


def cosines(x, y):
    return (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)


# ---------------------------------------------------------------- defaults

def test_defaults_come_from_the_device_and_the_cores():
    assert extract.defaults_for("cpu", 16) == extract.CPU_DEFAULTS == extract.defaults_for("cpu", 2)
    gpu = extract.defaults_for("cuda", 16)
    assert gpu == dict(workers=15, batch_size=256, text_batch_size=1024, text_window=16384)
    assert extract.defaults_for("cuda", 1)["workers"] == 1 and extract.defaults_for("cuda:1", 96)["workers"] == 32


def test_what_the_user_sets_is_kept_and_the_rest_is_chosen(monkeypatch):
    monkeypatch.setattr(extract, "_room_for_batches", lambda: (None, ""))
    monkeypatch.setattr(jpeg, "decodes_on", lambda device: None)  # as a GPU with nvJPEG would
    base = extract.ExtractSettings(annotations=None, images=None, cache=ROOT / "never.h5")
    cpu = extract.resolve(base)
    assert (cpu.workers, cpu.batch_size, cpu.text_batch_size, cpu.text_window, cpu.decode) == (1, 64, 64, 2048, "cpu")
    gpu = extract.resolve(replace(base, device="cuda", batch_size=32, workers=3, decode="cpu"))
    assert (gpu.workers, gpu.batch_size, gpu.text_batch_size, gpu.decode) == (3, 32, 1024, "cpu")
    assert extract.resolve(replace(base, device="cuda")).decode == "device"


def test_a_device_that_cannot_decode_jpegs_leaves_them_to_pil_or_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(extract, "_room_for_batches", lambda: (None, ""))
    assert jpeg.decodes_on("cpu") is None
    monkeypatch.setattr(jpeg, "decodes_on", lambda device: "RuntimeError: not compiled with nvJPEG")
    base = extract.ExtractSettings(annotations=None, images=None, cache=ROOT / "never.h5", device="cuda")
    assert extract.resolve(base).decode == "cpu"
    with pytest.raises(extract.ExtractError, match=r"--decode device: torchvision cannot decode JPEGs on cuda here "
                                                   r"\(RuntimeError: not compiled with nvJPEG\); use --decode cpu"):
        extract.resolve(replace(base, decode="device"))


def test_workers_that_cannot_fit_are_cut_when_chosen_and_refused_when_given(monkeypatch):
    monkeypatch.setattr(jpeg, "decodes_on", lambda device: None)
    base = extract.ExtractSettings(annotations=None, images=None, cache=ROOT / "never.h5", device="cuda")
    per_worker = extract.PREFETCH * 256 * (200 << 10)
    monkeypatch.setattr(extract, "_room_for_batches", lambda: (3 * per_worker, "/dev/shm (shared memory)"))
    monkeypatch.setattr(extract, "_cores", lambda: 16)
    assert extract.resolve(base, world=1).workers == 3  # chosen for the user: cut to what fits
    assert extract.resolve(replace(base, batch_size=4096)).workers == 0  # not one fits: the main process decodes
    with pytest.raises(extract.ExtractError, match=r"^8 worker\(s\) x 4 batches of 256 images keep about .* but "
                                                   r"/dev/shm \(shared memory\) has .*; use fewer --workers"):
        extract.resolve(replace(base, workers=8))


def test_a_worker_dead_of_a_bus_error_is_named_as_shared_memory():
    line = extract._worker_death("DataLoader worker (pid 77) is killed by signal: Bus error. It is possible that "
                                 "dataloader's workers are out of shared memory.", ROOT / "c.h5")
    assert "pid 77" in line and "out of shared memory in /dev/shm" in line and "run the same command again" in line


# ---------------------------------------------------------------- tokenizing in the workers

def test_workers_tokenize_exactly_as_open_clip(shapes):
    annotations, _ = shapes
    loaded = model_mod.load_model("ViT-B-32", "none")
    captions = pd.read_csv(annotations)["caption"].to_numpy(dtype=object)
    captions[3] = " ".join(["a brown dog jumps over a wooden fence"] * 12)  # truncated at 77 tokens
    windows = extract.batches(len(captions), 50)
    ds = extract._CaptionWindows(loaded.tokenizer, captions, windows)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=[[k] for k in range(len(windows))],
                                         collate_fn=extract._first, num_workers=2)
    got = list(loader)
    assert [g[0] for g in got] == [s for s, _ in windows]
    assert torch.equal(torch.cat([g[1] for g in got]), loaded.tokenizer(list(captions)))
    assert sum(g[2] for g in got) == 1


# ---------------------------------------------------------------- decoding on the device

@pytest.fixture(scope="module")
def odd_images(shapes, tmp_path_factory):
    """The shapes set, with every kind of image the device must leave to PIL, and broken ones."""
    annotations, images = shapes
    root = tmp_path_factory.mktemp("odd") / "images"
    shutil.copytree(images, root)
    names = list(dict.fromkeys(pd.read_csv(annotations)["image"]))
    im = Image.open(root / names[2]).convert("RGB")
    im.convert("CMYK").save(root / names[2], "JPEG")                    # CMYK JPEG
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(root / names[3]).save(root / names[3], "JPEG", exif=exif)  # rotated by its EXIF tag
    Image.open(root / names[4]).convert("L").save(root / names[4], "JPEG")  # greyscale: the device decodes it
    Image.open(root / names[5]).save(root / names[5], "PNG")              # a PNG named .jpg
    raw = (root / names[9]).read_bytes()
    (root / names[9]).write_bytes(raw[: len(raw) // 2])                    # cut short: no end marker
    (root / names[10]).write_text("<html>not an image</html>")
    (root / names[11]).unlink()
    return annotations, root, names


def test_plain_jpegs_go_to_the_device_and_everything_else_to_pil(odd_images):
    _, root, names = odd_images
    kinds = [jpeg.plain_jpeg((root / n).read_bytes()) if (root / n).exists() else None for n in names[:12]]
    assert kinds == [True, True, False, False, True, False, True, True, True, False, False, None]


def test_device_decoding_agrees_with_pil_and_fails_the_same_rows(odd_images, tmp_path):
    annotations, root, names = odd_images
    caches = {}
    for decode in ("cpu", "device"):
        extract.extract(settings_for(annotations, root, tmp_path / f"{decode}.h5", decode=decode), log=io.StringIO())
        caches[decode] = cache.load(tmp_path / f"{decode}.h5")
    a, b = caches["cpu"], caches["device"]
    assert np.array_equal(a.image_ok, b.image_ok) and list(a.image_error) == list(b.image_error)
    assert (~a.image_ok).sum() == 3 and a.image_error[9].startswith(("truncated", "corrupt"))
    ok = a.image_ok
    assert cosines(a.image_features[ok], b.image_features[ok]).min() > 0.9999
    for row in (2, 3, 5):  # CMYK, EXIF-rotated, PNG: PIL decoded them in both runs
        np.testing.assert_allclose(b.image_features[row], a.image_features[row], rtol=1e-5, atol=1e-5)
    assert np.array_equal(a.text_features, b.text_features)
    assert b.attrs["image_decode"] == "device" and a.attrs["image_decode"] == "pil"


def test_a_batch_the_device_cannot_decode_falls_back_image_by_image(odd_images, tmp_path, monkeypatch):
    annotations, root, names = odd_images
    reference = tmp_path / "ref.h5"
    extract.extract(settings_for(annotations, root, reference, decode="device"), log=io.StringIO())
    real, calls = torchvision.io.decode_jpeg, []
    bad = (root / names[6]).read_bytes()

    def decode_jpeg(data, *args, **kwargs):  # the batched call always fails; one image fails alone too
        calls.append(isinstance(data, list))
        if isinstance(data, list) or bytes(data.numpy()) == bad:
            raise RuntimeError("nvjpeg: the decoder refused the batch")
        return real(data, *args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode_jpeg)
    path = tmp_path / "fallback.h5"
    extract.extract(settings_for(annotations, root, path, decode="device"), log=io.StringIO())
    assert any(calls) and not all(calls)  # batches were tried, then single images
    a, b = cache.load(reference), cache.load(path)
    assert np.array_equal(a.image_ok, b.image_ok) and list(a.image_error) == list(b.image_error)
    rest = a.image_ok.copy()
    rest[6] = False
    np.testing.assert_array_equal(b.image_features[rest], a.image_features[rest])  # the same pixels, the same batches
    pil = tmp_path / "pil.h5"
    extract.extract(settings_for(annotations, root, pil, decode="cpu"), log=io.StringIO())
    np.testing.assert_allclose(b.image_features[6], cache.load(pil).image_features[6], rtol=1e-5, atol=1e-5)


def test_a_cache_keeps_the_decoding_it_was_started_with(odd_images, tmp_path):
    annotations, root, _ = odd_images
    path = tmp_path / "c.h5"
    extract.extract(settings_for(annotations, root, path, decode="cpu"), log=io.StringIO())
    with pytest.raises(cache.CacheError, match="image_decode='pil' \\(wanted 'device'\\)"):
        extract.extract(settings_for(annotations, root, path, decode="device"), log=io.StringIO())


def test_a_cache_made_before_image_decode_existed_keeps_its_fingerprint(synthetic_cache):
    import h5py
    with h5py.File(synthetic_cache, "r+") as f:
        assert "image_decode" not in f.attrs and f.attrs["fingerprint"] == cache.fingerprint(f)
        f.attrs["image_decode"] = "pil"
        assert cache.fingerprint(f) != f.attrs["fingerprint"]  # where it is stored, it counts
        del f.attrs["image_decode"]
    assert cache.load(synthetic_cache).image_ok.all()
    assert cache.mismatch({}, {"image_decode": "pil"}) == [] and cache.mismatch({}, {"image_decode": "device"})


def test_the_preprocess_spec_is_open_clips_or_nothing():
    loaded = model_mod.load_model("ViT-B-32", "none")
    spec = jpeg.Preprocess.of(loaded.preprocess)
    assert spec.resize == 224 and spec.crop == (224, 224) and spec.mean[0] == pytest.approx(0.48145466)
    assert jpeg.Preprocess.of(torchvision.transforms.Compose([torchvision.transforms.ToTensor()])) is None
    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    raw = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    ours = spec(jpeg.decode([raw], "cpu"))[0]
    pil = loaded.preprocess(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    levels = ((ours - pil) * torch.tensor(spec.std).view(3, 1, 1) * 255).abs()
    # PIL rounds to 8 bits between its horizontal and vertical passes, this code once at the end: on white
    # noise (the hardest case) a few 8-bit levels at worst, a fraction of one on average.
    assert levels.max() <= 6.01 and levels.mean() < 0.5, (levels.max(), levels.mean())
