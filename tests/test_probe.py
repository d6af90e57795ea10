"""Training the heads from a cache: it learns, it is reproducible, its checkpoints are safe."""
import io
import json

import numpy as np
import pytest
import torch

from finetune_clip import cache, metrics, probe

from conftest import make_synthetic_cache

FAST = probe.ProbeSettings(lr=1e-2, batch_size=32, epochs=15, patience=15, seed=0)


def test_probe_improves_validation_recall(synthetic_cache, tmp_path):
    c = cache.load(synthetic_cache)
    result = probe.train(c, FAST, tmp_path / "best.pt", tmp_path / "history.json", log=io.StringIO())
    history = json.loads((tmp_path / "history.json").read_text())
    baseline = history["epochs"][0]["val_mean_recall"]
    assert history["epochs"][0]["train_loss"] is None  # epoch 0 is the pretrained heads
    assert result["val_mean_recall"] > baseline + 20
    for entry in history["epochs"][1:]:
        assert {"train_loss", "val_loss", "val", "seconds"} <= set(entry)
    assert history["epochs"][-1]["val_loss"] < history["epochs"][0]["val_loss"]
    # the checkpoint holds the best epoch's heads and reproduces its validation recall
    heads, ckpt = probe.load_checkpoint(tmp_path / "best.pt", c)
    assert ckpt["epoch"] == result["best_epoch"] and ckpt["cache_fingerprint"] == c.fingerprint
    assert metrics.mean_recall(probe.evaluate_heads(heads, c.split("val"))) == pytest.approx(result["val_mean_recall"])


def test_seeded_runs_are_identical(synthetic_cache, tmp_path):
    c = cache.load(synthetic_cache)
    settings = probe.ProbeSettings(lr=1e-2, batch_size=32, epochs=3, patience=3, seed=4)
    a = probe.train(c, settings, tmp_path / "a.pt", log=io.StringIO())
    b = probe.train(c, settings, tmp_path / "b.pt", log=io.StringIO())
    assert [e["train_loss"] for e in a["history"]] == [e["train_loss"] for e in b["history"]]
    ha, _ = probe.load_checkpoint(tmp_path / "a.pt")
    hb, _ = probe.load_checkpoint(tmp_path / "b.pt")
    assert torch.equal(ha.visual_proj, hb.visual_proj)


def test_batches_hold_distinct_images_one_caption_each():
    idx = np.repeat(np.arange(10), 5)
    sampler = probe.CaptionSampler(idx, 10)
    gen = torch.Generator().manual_seed(0)
    images = torch.arange(10)
    caps = sampler.draw(images, gen)
    assert (torch.from_numpy(idx)[caps] == images).all()
    seen = {int(sampler.draw(torch.tensor([3]), gen)) for _ in range(200)}
    assert seen == set(range(15, 20))  # every caption of image 3 gets drawn, no other


def test_frozen_temperature_stays(synthetic_cache, tmp_path):
    c = cache.load(synthetic_cache)
    settings = probe.ProbeSettings(lr=1e-2, batch_size=32, epochs=2, patience=2, train_logit_scale=False)
    probe.train(c, settings, tmp_path / "x.pt", log=io.StringIO())
    heads, _ = probe.load_checkpoint(tmp_path / "x.pt")
    assert float(heads.logit_scale) == pytest.approx(float(c.heads["logit_scale"]))


def test_checkpoint_from_another_cache_is_refused(tmp_path):
    a = cache.load(make_synthetic_cache(tmp_path / "a.h5", seed=0))
    b = cache.load(make_synthetic_cache(tmp_path / "b.h5", seed=1))
    probe.train(a, probe.ProbeSettings(epochs=1), tmp_path / "a.pt", log=io.StringIO())
    with pytest.raises(probe.ProbeError, match=f"{a.fingerprint}.*{b.fingerprint}"):
        probe.evaluate(b, "test", tmp_path / "a.pt")


def test_checkpoint_write_is_atomic(synthetic_cache, tmp_path):
    c = cache.load(synthetic_cache)
    probe.train(c, probe.ProbeSettings(epochs=1), tmp_path / "x.pt", log=io.StringIO())
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_foreign_file_is_refused(tmp_path):
    torch.save({"hello": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(probe.ProbeError, match="not a probe checkpoint"):
        probe.load_checkpoint(tmp_path / "other.pt")


def test_bad_settings_are_named():
    with pytest.raises(probe.ProbeError, match="lr"):
        probe.ProbeSettings(lr=-1).check()


def test_evaluate_shape(synthetic_cache, tmp_path):
    c = cache.load(synthetic_cache)
    probe.train(c, FAST, tmp_path / "best.pt", log=io.StringIO())
    r = probe.evaluate(c, "test", tmp_path / "best.pt")
    assert r["n_images"] == 30 and r["n_captions"] == 150
    assert set(r) == {"split", "n_images", "n_captions", "baseline", "probe", "delta_pp", "cache"}
    for block in (r["baseline"], r["probe"]):
        for d in ("text_to_image", "image_to_text"):
            assert set(block[d]) == {"R@1", "R@5", "R@10", "median_rank", "mean_rank"}
    assert r["delta_pp"]["text_to_image"]["R@5"] == pytest.approx(
        r["probe"]["text_to_image"]["R@5"] - r["baseline"]["text_to_image"]["R@5"], abs=1e-3)


def test_patience_counts_epochs_without_improvement(tmp_path):
    c = cache.load(make_synthetic_cache(tmp_path / "c.h5"))
    # a vanishing lr never beats epoch 0, so training stops after exactly `patience` more epochs
    r = probe.train(c, probe.ProbeSettings(lr=1e-12, epochs=50, patience=3), tmp_path / "x.pt", log=io.StringIO())
    assert r["best_epoch"] == 0 and len(r["history"]) == 1 + 3
