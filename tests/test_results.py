"""Sweeps, compare and export: what a user takes away from a probe run."""
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from finetune_clip import cache, cli, probe

from conftest import make_synthetic_cache


def invoke(*args):
    return CliRunner().invoke(cli.cli, [str(a) for a in args], catch_exceptions=False)


def test_sweep_runs_the_grid_and_chooses_by_validation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = make_synthetic_cache(tmp_path / "c.h5")
    r = invoke("probe", "--cache", path, "--lr", "1e-4,1e-2", "--batch-size", "16,64", "--epochs", 4)
    assert r.exit_code == 0, r.output
    record = json.loads(Path("artifacts/training_history.json").read_text())
    assert len(record["runs"]) == 4 and record["chosen_by"] == "val_mean_recall"
    scores = [run["val_mean_recall"] for run in record["runs"]]
    assert record["best_run"] == int(np.argmax(scores))
    assert "<- kept" in r.output
    _, ckpt = probe.load_checkpoint(Path("checkpoints/linearprobe_best.pt"))
    assert ckpt["val_mean_recall"] == pytest.approx(max(scores))
    assert ckpt["settings"] == record["runs"][record["best_run"]]["settings"]
    assert sorted(p.name for p in Path("checkpoints").iterdir()) == ["linearprobe_best.pt"]  # losers removed


def test_sweep_never_looks_at_test(tmp_path, monkeypatch):
    path = make_synthetic_cache(tmp_path / "c.h5")
    c = cache.load(path)
    seen = []
    real_split = cache.Cache.split
    monkeypatch.setattr(cache.Cache, "split", lambda self, name: seen.append(name) or real_split(self, name))
    probe.sweep(c, [probe.ProbeSettings(lr=lr, epochs=2) for lr in (1e-3, 1e-2)], tmp_path / "b.pt", None,
                log=open("/dev/null", "w"))
    assert set(seen) == {"train", "val"}


def test_compare_writes_both_sides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = make_synthetic_cache(tmp_path / "c.h5")
    assert invoke("probe", "--cache", path, "--epochs", 3).exit_code == 0
    r = invoke("compare", "--cache", path, "--a", "baseline", "--b", "checkpoints/linearprobe_best.pt")
    assert r.exit_code == 0, r.output
    out = json.loads(Path("artifacts/comparison_results.json").read_text())
    assert out["a"]["source"] == "baseline" and out["b"]["source"].endswith("linearprobe_best.pt")
    assert out["delta_pp"]["text_to_image"]["R@1"] == pytest.approx(
        out["b"]["text_to_image"]["R@1"] - out["a"]["text_to_image"]["R@1"], abs=1e-3)
    assert "text->image R@5" in r.output


def test_export_round_trip_through_open_clip(extracted, tmp_path):
    c = cache.load(extracted.cache)
    # probed heads, clearly different from the pretrained ones
    torch.manual_seed(0)
    start = probe.Heads.from_cache(c)
    moved = probe.Heads(start.visual_proj + 0.05 * torch.randn_like(start.visual_proj),
                        start.text_projection + 0.05 * torch.randn_like(start.text_projection),
                        start.logit_scale - 0.5)
    probe.save_checkpoint(tmp_path / "best.pt", moved, c, probe.ProbeSettings(), {"epoch": 1, "val": {},
                                                                              "val_mean_recall": 0.0})
    heads, _ = probe.load_checkpoint(tmp_path / "best.pt", c)
    r = invoke("export", "--checkpoint", tmp_path / "best.pt", "--out", tmp_path / "probed.pt")
    assert r.exit_code == 0, r.output
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=str(tmp_path / "probed.pt"))
    model.eval()
    names = list(c.image_names[:4])
    px = torch.stack([preprocess(Image.open(extracted.images / n)) for n in names])
    tok = open_clip.get_tokenizer("ViT-B-32")(list(c.captions[:6]))
    with torch.no_grad():
        got_img, got_txt = model.encode_image(px), model.encode_text(tok)
    want_img = torch.from_numpy(c.image_features[:4]) @ heads.visual_proj
    want_txt = torch.from_numpy(c.text_features[:6]) @ heads.text_projection
    assert float((got_img - want_img).abs().max() / want_img.abs().max()) < 1e-5
    assert float((got_txt - want_txt).abs().max() / want_txt.abs().max()) < 1e-5
    assert float(model.logit_scale.detach()) == pytest.approx(float(heads.logit_scale))


def test_export_of_a_foreign_file_is_refused(tmp_path):
    torch.save({"x": torch.zeros(1)}, tmp_path / "x.pt")
    r = CliRunner().invoke(cli.cli, ["export", "--checkpoint", str(tmp_path / "x.pt"), "--out", str(tmp_path / "o.pt")])
    assert r.exit_code == 1 and "not a probe checkpoint" in r.output
