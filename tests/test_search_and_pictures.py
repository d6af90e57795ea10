"""search (through the text trunk), its HTML page, and the pictures beside the artifacts."""
import builtins
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from finetune_clip import cache, cli, extract, probe, report

from conftest import make_synthetic_cache


def test_search_ranks_by_the_trunk_and_heads(extracted, reference_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = cache.load(extracted.cache)
    query = c.captions[7]  # a caption of image text_image_index[7]
    r = CliRunner().invoke(cli.cli, ["search", "--cache", str(extracted.cache), query, "--k", "5",
                                     "--html", "page.html"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    lines = [line for line in r.output.splitlines() if line[:3].strip().isdigit()]
    assert len(lines) == 5
    # the same ranking by hand: open_clip's encode_text for the query against cached image embeddings
    with torch.no_grad():
        q = reference_model.model.encode_text(reference_model.tokenizer([query]))[0].numpy()
    img = c.image_features @ c.heads["visual_proj"]
    scores = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ (q / np.linalg.norm(q))
    want = [c.image_names[i] for i in np.argsort(-scores)[:5]]
    assert [line.split()[2] for line in lines] == want
    assert float(lines[0].split()[1]) == pytest.approx(scores.max(), abs=1e-4)
    page = Path("page.html").read_text()
    assert page.count("<figure>") == 5 and page.count("data:image/jpeg;base64,") == 5


def test_page_escapes_everything_from_the_data(tmp_path):
    Image.new("RGB", (20, 20), (1, 2, 3)).save(tmp_path / "a.jpg")
    hits = [{"rank": 1, "score": 0.5, "image": "a.jpg", "captions": ["<script>alert(1)</script> & \"quotes\""]},
            {"rank": 2, "score": 0.4, "image": "<b>gone</b>.jpg", "captions": []}]
    page = report.search_page("<img src=x onerror=alert(2)>", hits, tmp_path, "pretrained")
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;quotes&quot;" in page
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(2)&gt;" in page
    assert "<b>gone</b>" not in page and "image unavailable" in page
    assert "http" not in page  # nothing to fetch: the page opens without a server


def test_search_with_a_checkpoint_uses_its_heads(tmp_path):
    path = make_synthetic_cache(tmp_path / "c.h5")
    c = cache.load(path)
    heads = probe.Heads.from_cache(c)
    query = c.text_features[0]
    hits = probe.search(c, heads, query, k=3)
    assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    assert all(len(h["captions"]) == 5 for h in hits)
    flipped = probe.Heads(-heads.visual_proj, heads.text_projection, heads.logit_scale)
    assert probe.search(c, flipped, query, k=1)[0]["image"] != hits[0]["image"]


def test_probe_and_eval_write_pictures(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")  # installed by requirements-dev.txt, so CI runs this
    monkeypatch.chdir(tmp_path)
    path = make_synthetic_cache(tmp_path / "c.h5")
    r = CliRunner().invoke(cli.cli, ["probe", "--cache", str(path), "--epochs", "3"], catch_exceptions=False)
    assert "wrote artifacts/training_history.png" in r.output
    r = CliRunner().invoke(cli.cli, ["eval", "--cache", str(path)], catch_exceptions=False)
    assert "wrote artifacts/final_evaluation_results.png" in r.output
    for name in ("training_history.png", "final_evaluation_results.png"):
        with Image.open(Path("artifacts") / name) as im:
            assert im.format == "PNG" and im.size[0] > 500


def test_without_matplotlib_they_say_how_to_get_pictures(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    path = make_synthetic_cache(tmp_path / "c.h5")
    r = CliRunner().invoke(cli.cli, ["probe", "--cache", str(path), "--epochs", "1"], catch_exceptions=False)
    assert r.exit_code == 0 and "pictures need matplotlib" in r.output
    assert not Path("artifacts/training_history.png").exists()
    assert json.loads(Path("artifacts/training_history.json").read_text())["epochs"]


def test_queries_go_through_the_caches_own_trunk(extracted, reference_model):
    """Query features times the cached text head equal open_clip's encode_text with the cache's model."""
    c = cache.load(extracted.cache)
    feats = extract.encode_queries(c.attrs, ["a red circle", "two dogs play in the snow"])
    with torch.no_grad():
        want = reference_model.model.encode_text(reference_model.tokenizer(["a red circle",
                                                                             "two dogs play in the snow"]))
    got = torch.from_numpy(feats @ c.heads["text_projection"])
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5


def test_a_cache_of_the_removed_torchao_int8_still_evaluates_and_search_says_why(tmp_path):
    """Caches extracted with `--precision int8` before it meant int8-fbgemm or int8-ort hold torchao's features: probe
    and eval read them from the cache alone; search, which must run the same text trunk, refuses in one line."""
    path = make_synthetic_cache(tmp_path / "old_int8.h5", precision="int8")
    out = CliRunner().invoke(cli.cli, ["eval", "--cache", str(path), "--baseline-only", "--out",
                                       str(tmp_path / "r.json")])
    assert out.exit_code == 0, out.output
    out = CliRunner().invoke(cli.cli, ["search", "--cache", str(path), "a red circle"])
    assert out.exit_code == 1
    assert out.output.strip().splitlines()[-1] == (
        "Error: this cache was extracted with --precision int8, which this version cannot run to encode queries; "
        "extract it again with --precision int8 (or fp32) into another --cache")
