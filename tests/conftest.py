"""Tiny offline fixtures: a generated captioned-shapes set, a random-init ViT-B/32, synthetic caches."""
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune_clip import cache, cli, worlds  # noqa: E402  (a checkout not installed: the package beside tests/)

# The suite never reads or writes the user's ~/.cache: the per-machine precision record and int8-ort's exported
# trunks live under $XDG_CACHE_HOME, for the tests a folder of this run's own (tests that need an empty one set theirs).
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="finetune-clip-tests-xdg-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """24 generated images (64 px) with 5 captions each, split 80/10/10: (annotations CSV, image root)."""
    root = tmp_path_factory.mktemp("shapes")
    annotations = worlds.make_dataset(root, "source", n_images=24, seed=3, size=64)
    return annotations, root / "images"


@pytest.fixture(scope="session")
def extracted(shapes, tmp_path_factory):
    """The shapes set extracted once with a seeded random-init ViT-B/32 (the real architecture)."""
    from finetune_clip import extract
    annotations, images = shapes
    path = tmp_path_factory.mktemp("cache") / "shapes.h5"
    settings = extract.ExtractSettings(annotations=annotations, images=images, cache=path, pretrained="none",
                                       seed=0, workers=0, batch_size=8, text_batch_size=16)
    extract.extract(settings, log=open("/dev/null", "w"))
    return settings


@pytest.fixture(scope="session")
def reference_model():
    """An untouched model with the same seed as the extraction: open_clip's own encode_* is the reference."""
    from finetune_clip import model as model_mod
    return model_mod.load_model("ViT-B-32", "none", seed=0)


def make_synthetic_cache(path, n_images=200, caps_per_image=5, d_img=48, d_txt=40, embed=16, seed=0,
                         failed=(), precision="fp32"):
    """A complete cache whose image and text features share a hidden linear structure the heads must find.

    Pretrained heads are random, so the baseline is near chance and a probe has room to improve.
    """
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n_images, 12))
    img = z @ rng.normal(size=(12, d_img)) + 0.3 * rng.normal(size=(n_images, d_img))
    idx = np.repeat(np.arange(n_images), caps_per_image)
    txt = (z[idx] + 0.3 * rng.normal(size=(len(idx), 12))) @ rng.normal(size=(12, d_txt))
    txt += 0.3 * rng.normal(size=txt.shape)
    splits = np.array(["train"] * n_images, dtype=object)
    splits[int(0.7 * n_images):int(0.85 * n_images)] = "val"
    splits[int(0.85 * n_images):] = "test"
    heads = {"visual_proj": rng.normal(size=(d_img, embed)) / np.sqrt(d_img),
             "text_projection": rng.normal(size=(d_txt, embed)) / np.sqrt(d_txt),
             "logit_scale": np.float32(np.log(1 / 0.07))}
    cache.create(path, image_names=[f"img{i:04d}.jpg" for i in range(n_images)], image_splits=splits,
                 captions=[f"caption {j} of image {i}" for j, i in enumerate(idx)], caption_image_index=idx,
                 heads=heads, attrs={"model": "synthetic", "pretrained": "none", "precision": precision, "seed": seed,
                                     "annotations_sha256": "synthetic"})
    w = cache.Writer(path)
    ok = np.ones(n_images, bool)
    ok[list(failed)] = False
    w.write_images(0, img[ok].astype(np.float32), ok, ["" if o else "missing: test" for o in ok])
    w.write_texts(0, txt.astype(np.float32))
    w.finish()
    w.close()
    return path


@pytest.fixture
def synthetic_cache(tmp_path):
    return make_synthetic_cache(tmp_path / "synthetic.h5")


ROOT = Path(__file__).resolve().parents[1]
SMALL_CLIP = cli.SMALL_CLIP  # ShapesCLIP's config and weights, shipped with the package


@pytest.fixture(scope="session")
def target_world(tmp_path_factory):
    """The demo's shifted world, exactly (3,000 images, seed 0): (annotations CSV, image root, scenes)."""
    import pandas as pd
    root = tmp_path_factory.mktemp("target")
    annotations = worlds.make_dataset(root, "target", n_images=3000, seed=0)
    return annotations, root / "images", pd.read_csv(root / "scenes.csv")


@pytest.fixture(scope="session")
def small_extracted(target_world, tmp_path_factory):
    """The target world extracted with the project's small pretrained CLIP (a model that has learned)."""
    from finetune_clip import extract
    annotations, images, _ = target_world
    path = tmp_path_factory.mktemp("small") / "target.h5"
    settings = extract.ExtractSettings(annotations=annotations, images=images, cache=path,
                                       model=str(SMALL_CLIP[0]), pretrained=str(SMALL_CLIP[1]), workers=0)
    extract.extract(settings, log=open("/dev/null", "w"))
    return settings


@pytest.fixture(scope="session")
def small_probed(small_extracted, tmp_path_factory):
    """The probe with its defaults on that cache: (checkpoint path, train() result)."""
    import io

    from finetune_clip import probe
    out = tmp_path_factory.mktemp("small_probe") / "probe.pt"
    result = probe.train(cache.load(small_extracted.cache), probe.ProbeSettings(), out, log=io.StringIO())
    return out, result
