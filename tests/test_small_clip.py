"""The project's small pretrained CLIP: a config-file model through the whole pipeline, on a shifted world."""
import json

import numpy as np
import open_clip
import pytest
import torch
from click.testing import CliRunner

from finetune_clip import cache, cli, data, extract, probe, worlds
from finetune_clip import model as model_mod

from conftest import SMALL_CLIP


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_committed_weights_are_small_fp16_and_fit_the_config():
    config, weights = SMALL_CLIP
    assert weights.stat().st_size <= 16 * 2**20
    state = torch.load(weights, map_location="cpu", weights_only=True)
    assert {v.dtype for v in state.values()} == {torch.float16}
    name, _ = model_mod.register_config(config)
    assert {k: tuple(v.shape) for k, v in state.items()} == \
        {k: tuple(v.shape) for k, v in open_clip.create_model(name).state_dict().items()}


def test_config_model_cache_times_heads_equals_open_clips_encode(small_extracted):
    """The reference is open_clip's own model, built by open_clip from the same files."""
    c = cache.load(small_extracted.cache)
    open_clip.add_model_config(SMALL_CLIP[0])
    ref, _, preprocess = open_clip.create_model_and_transforms("ShapesCLIP", pretrained=str(SMALL_CLIP[1]))
    ref.eval()
    tokenizer = open_clip.get_tokenizer("ShapesCLIP")
    rows = np.arange(0, len(c.image_names), 250)
    px = torch.stack([preprocess(data.load_image(small_extracted.images / c.image_names[i])) for i in rows])
    caps = np.arange(0, len(c.captions), 487)
    with torch.no_grad():
        want_img = ref.encode_image(px)
        want_txt = ref.encode_text(tokenizer([str(x) for x in c.captions[caps]]))
    got_img = torch.from_numpy(c.image_features[rows]) @ torch.from_numpy(c.heads["visual_proj"])
    got_txt = torch.from_numpy(c.text_features[caps]) @ torch.from_numpy(c.heads["text_projection"])
    assert rel_err(got_img, want_img) < 1e-5
    assert rel_err(got_txt, want_txt) < 1e-5


def test_cache_carries_the_config_and_rebuilds_the_model_without_the_file(small_extracted, monkeypatch):
    attrs = cache.read_attrs(small_extracted.cache)
    assert attrs["model"] == "ShapesCLIP"
    assert json.loads(attrs["model_config"]) == json.loads(SMALL_CLIP[0].read_text())
    monkeypatch.delitem(open_clip.factory._MODEL_CONFIGS, "ShapesCLIP")  # as in a fresh process elsewhere
    loaded = model_mod.load_like_cache(attrs)
    assert loaded.arch == "ShapesCLIP"
    assert loaded.model.visual.proj.shape == (128, 128)


def test_config_and_weight_mistakes_get_one_line(tmp_path):
    with pytest.raises(model_mod.ModelError, match="model config not found: .*nope.json"):
        model_mod.load_model(str(tmp_path / "nope.json"), "none")
    bad = tmp_path / "NotAConfig.json"
    bad.write_text(json.dumps({"hidden_size": 4}))
    with pytest.raises(model_mod.ModelError, match="NotAConfig.json is not an open_clip model config"):
        model_mod.load_model(str(bad), "none")
    broken = tmp_path / "Broken.json"
    broken.write_text("{not json")
    with pytest.raises(model_mod.ModelError, match="Broken.json is not readable JSON"):
        model_mod.load_model(str(broken), "none")
    other = tmp_path / "other.pt"
    torch.save({"logit_scale": torch.ones([])}, other)
    with pytest.raises(model_mod.ModelError, match=r"cannot load .*other.pt into ShapesCLIP.*expected a state dict"):
        model_mod.load_model(str(SMALL_CLIP[0]), str(other))
    with pytest.raises(model_mod.ModelError, match="'ViT-Nope': neither an open_clip model name .*nor a model-config"):
        model_mod.load_model("ViT-Nope", "none")


def test_cli_extract_names_a_bad_config(tmp_path, shapes):
    annotations, images = shapes
    bad = tmp_path / "Weird.json"
    bad.write_text("[]")
    r = CliRunner().invoke(cli.cli, ["extract", "--annotations", str(annotations), "--images", str(images),
                                     "--cache", str(tmp_path / "c.h5"), "--model", str(bad), "--pretrained", "none"])
    assert r.exit_code == 1
    assert "Weird.json is not an open_clip model config" in r.output
    assert not (tmp_path / "c.h5").exists()


def _t2i_r1(heads, view):
    return probe.evaluate_heads(heads, view)["text_to_image"]["R@1"]


def test_zero_shot_works_on_the_shifted_world_and_the_probe_adds_to_it(small_extracted, small_probed):
    """The situation of a real user: a CLIP whose heads already work, on data it has not quite seen."""
    c = cache.load(small_extracted.cache)
    heldout = c.split("test")
    chance = 100 / heldout.n_images
    zero_shot = _t2i_r1(probe.Heads.from_cache(c), heldout)
    probed = _t2i_r1(probe.load_checkpoint(small_probed[0], c)[0], heldout)
    assert zero_shot >= 5 * chance
    assert probed >= zero_shot + 5


def _top5_carry(c, heads, scenes, queries):
    """Per query, how many of the top 5 images show the queried colour and shape."""
    truth = scenes.set_index("image")
    feats = extract.encode_queries(c.attrs, [q for q, _, _ in queries])
    hits = []
    for f, (_, colour, shape) in zip(feats, queries):
        top = probe.search(c, heads, f, 5)
        hits.append(sum(truth.loc[h["image"], "colour"] == colour and truth.loc[h["image"], "shape"] == shape
                        for h in top))
    return np.array(hits)


def test_search_ranks_by_what_the_query_says(small_extracted, small_probed, target_world):
    scenes = target_world[2]
    c = cache.load(small_extracted.cache)
    queries = [(f"a {colour} {shape}", colour, shape) for colour in worlds.COLOURS for shape in worlds.SHAPES]
    zero_shot = _top5_carry(c, probe.Heads.from_cache(c), scenes, queries)
    probed = _top5_carry(c, probe.load_checkpoint(small_probed[0], c)[0], scenes, queries)
    assert zero_shot.mean() > 2.5, zero_shot  # most top-5 hits carry both attributes (by chance: 5/48)
    assert probed.mean() >= zero_shot.mean(), (probed, zero_shot)
