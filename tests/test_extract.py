"""Cached features times cached heads equal open_clip's own encode_image / encode_text."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image

from finetune_clip import cache, data, extract, worlds
from finetune_clip import model as model_mod

LONG = " ".join(["a dog runs across the green grass toward a red ball"] * 12)  # ~130 tokens, truncated


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_cached_features_times_heads_equal_encode(extracted, reference_model):
    c = cache.load(extracted.cache)
    model, preprocess, tok = reference_model.model, reference_model.preprocess, reference_model.tokenizer
    names = list(c.image_names[:6])
    pixels = torch.stack([preprocess(Image.open(extracted.images / n).convert("RGB")) for n in names])
    with torch.no_grad():
        want_img = model.encode_image(pixels)
        want_txt = model.encode_text(tok(list(c.captions[:10])))
    got_img = torch.from_numpy(c.image_features[:6] @ c.heads["visual_proj"])
    got_txt = torch.from_numpy(c.text_features[:10] @ c.heads["text_projection"])
    assert rel_err(got_img, want_img) < 1e-5
    assert rel_err(got_txt, want_txt) < 1e-5
    assert float(c.heads["logit_scale"]) == pytest.approx(float(model.logit_scale))
    assert c.image_features.shape[1] == 768 and c.text_features.shape[1] == 512


def test_bucketed_text_equals_encode_text_for_all_lengths(reference_model):
    model = copy.deepcopy(reference_model.model)
    heads = model_mod.take_heads(model)
    captions = ["dog", "a man in a red shirt climbs a rock wall", LONG, "two children play .", "x " * 74,
                "é café 北京"]
    tokens = reference_model.tokenizer(captions)
    assert tokens[2].ne(0).sum() == 77  # the long caption fills the context after truncation
    with torch.no_grad():
        want = reference_model.model.encode_text(tokens)
    got = model_mod.text_features(model, tokens) @ torch.from_numpy(heads["text_projection"])
    assert rel_err(got, want) < 1e-5


def test_trimming_the_context_is_exact_because_the_mask_is_causal(reference_model):
    """A short caption gives the same features alone (context trimmed to its length) as in a batch padded to 77."""
    model = copy.deepcopy(reference_model.model)
    model_mod.take_heads(model)
    tokens = reference_model.tokenizer(["a small cat", LONG])
    n = int(tokens[0].argmax()) + 1
    with torch.no_grad():
        alone = model_mod.text_features(model, tokens[:1])            # runs only n positions
        padded = model_mod.text_features(model, tokens)[:1]             # runs all 77 positions
    assert n < 10
    assert rel_err(alone, padded) < 1e-5
    # And the padding really is ignored: changing tokens after the EOT changes nothing.
    scrambled = tokens[:1].clone()
    scrambled[0, n:] = 1234
    with torch.no_grad():
        x = model.token_embedding(scrambled) + model.positional_embedding
        out = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))[0, n - 1]
    assert rel_err(out[None], alone) < 1e-5


def test_image_features_equal_encode_image_on_random_pixels(reference_model):
    model = copy.deepcopy(reference_model.model)
    heads = model_mod.take_heads(model)
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        want = reference_model.model.encode_image(x)
    got = model_mod.image_features(model, x) @ torch.from_numpy(heads["visual_proj"])
    assert rel_err(got, want) < 1e-5


def test_the_last_block_runs_at_the_class_token_and_at_the_eot_alone(reference_model):
    """Both trunks' last block computes its MLP at one position per image or caption, not at every position (that
    block's keys and values still see them all); the tests above show the features still equal encode_*."""
    model = copy.deepcopy(reference_model.model)
    model_mod.take_heads(model)
    seen = []
    for blocks in (model.visual.transformer.resblocks, model.transformer.resblocks):
        for block in blocks:
            block.mlp.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    tokens = reference_model.tokenizer(["a dog", "a man in a red shirt climbs a rock wall"])
    n = int(tokens.argmax(-1).max()) + 1
    with torch.no_grad():
        model_mod.image_features(model, torch.randn(2, 3, 224, 224))
        model_mod.text_features(model, tokens)
    assert seen == [(2, 50, 768)] * 11 + [(2, 1, 768)] + [(2, n, 512)] * 11 + [(2, 1, 512)]


def test_random_init_is_seeded():
    a = model_mod.load_model("ViT-B-32", "none", seed=7).model.visual.proj
    b = model_mod.load_model("ViT-B-32", "none", seed=7).model.visual.proj
    c = model_mod.load_model("ViT-B-32", "none", seed=8).model.visual.proj
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_local_state_dict_file_loads_into_named_architecture(tmp_path, reference_model):
    path = tmp_path / "weights.pt"
    torch.save(reference_model.model.state_dict(), path)
    loaded = model_mod.load_model("ViT-B-32", str(path))
    assert loaded.pretrained == f"file:{path.resolve()}" and loaded.arch == "ViT-B-32"
    for (k, v), (k2, v2) in zip(loaded.model.state_dict().items(), reference_model.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def _openai_style_archive(path, model):
    """A TorchScript archive holding OpenAI-named weights, like OpenAI's own ViT-B-32.pt."""
    class Holder(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x
    root = Holder()
    for key, value in model.state_dict().items():
        *parents, leaf = key.split(".")
        mod = root
        for p in parents:
            if not hasattr(mod, p):
                mod.add_module(p, Holder())
            mod = getattr(mod, p)
        mod.register_buffer(leaf, value.clone())
    torch.jit.script(root).save(str(path))


def test_openai_torchscript_file_is_loaded_with_quickgelu(tmp_path):
    torch.manual_seed(0)
    import open_clip
    src = open_clip.create_model("ViT-B-32-quickgelu")
    with torch.no_grad():  # OpenAI ships fp16 weights; open_clip's loader rounds through fp16 as they do
        for p in src.parameters():
            p.copy_(p.half().float())
    path = tmp_path / "ViT-B-32.pt"
    _openai_style_archive(path, src)
    loaded = model_mod.load_model("ViT-B-32", str(path))
    assert loaded.arch == "ViT-B-32-quickgelu"
    acts = {type(m).__name__ for m in loaded.model.modules()}
    assert "QuickGELU" in acts and "GELU" not in acts
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert rel_err(loaded.model.encode_image(x), src.encode_image(x)) < 1e-5


def test_missing_file_and_offline_tag_give_one_line_errors(monkeypatch):
    with pytest.raises(model_mod.ModelError, match="not found"):
        model_mod.load_model("ViT-B-32", "/nonexistent/ViT-B-32.pt")
    monkeypatch.setattr(model_mod, "_hub_reachable", lambda *a, **k: False)
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    with pytest.raises(model_mod.ModelError, match="--pretrained FILE .* or --pretrained none"):
        model_mod.load_model("ViT-B-32", "openai")


def test_unknown_model_is_named():
    with pytest.raises(model_mod.ModelError, match="ViT-Q-99"):
        model_mod.load_model("ViT-Q-99", "none")


def test_extract_records_identity_and_refuses_other_settings(extracted):
    attrs = cache.read_attrs(extracted.cache)
    for key in ("model", "pretrained", "precision", "open_clip_version", "torch_version", "annotations_sha256",
                "image_root", "created", "fingerprint"):
        assert attrs[key] != "", key
    assert attrs["complete"] and attrs["seed"] == 0 and attrs["pretrained"] == "none"
    other = extract.ExtractSettings(**{**extracted.__dict__, "seed": 1})
    with pytest.raises(cache.CacheError, match="seed=0"):
        extract.extract(other, log=open("/dev/null", "w"))


def test_rerun_on_complete_cache_changes_nothing(extracted):
    before = cache.read_attrs(extracted.cache)["fingerprint"]
    summary = extract.extract(extracted, log=open("/dev/null", "w"))
    assert cache.read_attrs(extracted.cache)["fingerprint"] == before
    assert summary.images_done == 24 and summary.captions == 120


def test_rows_follow_annotations(extracted):
    c = cache.load(extracted.cache)
    df, _ = data.read_annotations(extracted.annotations)
    assert list(c.captions) == list(df["caption"])
    assert [c.image_names[i] for i in c.text_image_index] == list(df["image"])
    assert np.isfinite(c.image_features).all() and np.isfinite(c.text_features).all()


def test_bf16_cache_agrees_with_fp32(tmp_path):
    ann = worlds.make_dataset(tmp_path / "d", "source", n_images=6, seed=1, size=48)
    caches = {}
    for precision in ("fp32", "bf16"):
        settings = extract.ExtractSettings(annotations=ann, images=ann.parent / "images",
                                           cache=tmp_path / f"{precision}.h5", pretrained="none", precision=precision,
                                           workers=0)
        extract.extract(settings, log=open("/dev/null", "w"))
        caches[precision] = cache.load(settings.cache)
    assert caches["bf16"].attrs["precision"] == "bf16"
    assert caches["bf16"].fingerprint != caches["fp32"].fingerprint
    for kind in ("image_features", "text_features"):
        a, b = getattr(caches["bf16"], kind), getattr(caches["fp32"], kind)
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cos.min() > 0.999, kind


def test_gpu_only_settings_fail_clearly_without_a_gpu(shapes, tmp_path):
    from click.testing import CliRunner

    from finetune_clip import cli
    annotations, images = shapes
    base = ["extract", "--annotations", str(annotations), "--images", str(images), "--cache", str(tmp_path / "c.h5"),
            "--pretrained", "none"]
    r = CliRunner().invoke(cli.cli, base + ["--precision", "fp16"])
    assert r.exit_code == 1 and "fp16 is for --device cuda" in r.output
    if not torch.cuda.is_available():
        r = CliRunner().invoke(cli.cli, base + ["--device", "cuda"])
        assert r.exit_code == 1 and "no CUDA device" in r.output


def test_weights_that_moved_keep_their_cache_and_rebuild_from_the_shipped_copy(shapes, tmp_path):
    """A cache records a weights file by path and checksum. The same weights from elsewhere resume it (the checksum
    is the identity, not the path); where the recorded path is gone, a file of the same name and checksum shipped
    with the package (ShapesCLIP lay outside the package in earlier versions) rebuilds the model for search and
    export; other weights are refused by name, and weights gone for good are one line."""
    import io
    import shutil
    from dataclasses import replace

    from conftest import SMALL_CLIP
    annotations, images = shapes
    moved = tmp_path / "old_place" / "ShapesCLIP.pt"
    moved.parent.mkdir()
    shutil.copy(SMALL_CLIP[1], moved)
    settings = extract.ExtractSettings(annotations=annotations, images=images, cache=tmp_path / "c.h5",
                                       model=str(SMALL_CLIP[0]), pretrained=str(moved), workers=0)
    extract.extract(settings, log=io.StringIO())
    before = cache.load(settings.cache).fingerprint
    shutil.rmtree(moved.parent)
    extract.extract(replace(settings, pretrained=str(SMALL_CLIP[1])), log=io.StringIO())  # resumed, not refused
    c = cache.load(settings.cache)
    assert c.fingerprint == before and c.attrs["pretrained"] == f"file:{moved}"
    assert extract.encode_queries(c.attrs, ["a red circle"]).shape == (1, c.text_features.shape[1])

    other = tmp_path / "other.pt"
    weights = torch.load(SMALL_CLIP[1], weights_only=True)
    weights["logit_scale"] = weights["logit_scale"] + 1
    torch.save(weights, other)
    with pytest.raises(cache.CacheError, match="made with other settings: pretrained="):
        extract.extract(replace(settings, pretrained=str(other)), log=io.StringIO())
    gone = {**c.attrs, "pretrained": f"file:{tmp_path / 'Gone.pt'}"}
    with pytest.raises(model_mod.ModelError, match="no longer at .*Gone.pt; put them back"):
        extract.encode_queries(gone, ["a red circle"])
