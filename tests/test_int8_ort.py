"""int8-ort: both trunks in ONNX Runtime, exported and quantized once per model, kept on disk and checked."""
import copy

import pytest
import torch

from finetune_clip import autoprecision, backends, onnx_int8
from finetune_clip import model as model_mod

from conftest import SMALL_CLIP


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg")))
        yield


@pytest.fixture(scope="module")
def small(home):
    """The small CLIP architecture, random init (its export takes seconds), and its int8-ort twin, built here."""
    loaded = model_mod.load_model(str(SMALL_CLIP[0]), "none")
    model_mod.take_heads(loaded.model)
    return loaded, backends.prepare(copy.deepcopy(loaded.model), "int8-ort", "cpu")


def features(net, loaded, pixels, captions):
    with torch.no_grad():
        return model_mod.image_features(net, pixels), model_mod.text_features(net, loaded.tokenizer(captions))


PIXELS = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(1))
CAPTIONS = ["a", "a red circle above a blue square", " ".join(["long"] * 90), *autoprecision.flickr_like_captions(40)]


def test_features_agree_with_fp32_at_every_batch_and_caption_length(small):
    loaded, q = small
    assert q.int8_build_s > 0 and "built in" in q.int8_kernels
    assert q.transformer.takes_at  # the text graph computes its last block at the EOT alone
    cos = torch.nn.functional.cosine_similarity
    for pixels, captions in ((PIXELS[:1], CAPTIONS[:1]), (PIXELS, CAPTIONS)):
        (ref_img, ref_txt), (img, txt) = (features(n, loaded, pixels, captions) for n in (loaded.model, q))
        assert img.shape == ref_img.shape and txt.shape == ref_txt.shape
        assert not torch.equal(img, ref_img) and not torch.equal(txt, ref_txt)  # it ran int8, not fp32
        assert float(cos(img, ref_img).min()) > 0.999 and float(cos(txt, ref_txt).min()) > 0.999


@pytest.mark.parametrize("arch", [str(SMALL_CLIP[0]), "ViT-B-32"])
def test_the_attention_written_out_for_export_is_open_clips_own(arch):
    """ExportBlocks (what int8-ort exports) against open_clip's Transformer, both trunks, the text one masked."""
    model = model_mod.load_model(arch, "none").model.eval()
    g = torch.Generator().manual_seed(0)
    for owner, mask in ((model.visual, None), (model, model.attn_mask[:13, :13])):
        assert onnx_int8.ExportBlocks.fits(owner.transformer)  # else export keeps open_clip's blocks as they are
        width = owner.transformer.width
        x = torch.randn(3, 13, width, generator=g)
        at = torch.tensor([12, 4, 0])
        with torch.no_grad():
            ref, ours = owner.transformer(x, attn_mask=mask), onnx_int8.ExportBlocks(owner.transformer)(x, mask)
            # What is exported: the last block at the class token alone (image), at each caption's EOT (text)
            alone = (onnx_int8.ExportBlocks(owner.transformer, class_token=True)(x)[:, 0] if mask is None else
                     onnx_int8.ExportBlocks(owner.transformer)(x, mask, at=at))
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
        want = ref[:, 0] if mask is None else ref[torch.arange(3), at]
        torch.testing.assert_close(alone, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    with onnx_int8._written_out(model):
        assert isinstance(model.transformer, onnx_int8.ExportBlocks)
        assert isinstance(model.visual.transformer, onnx_int8.ExportBlocks) and model.visual.transformer.class_token
    assert not isinstance(model.transformer, onnx_int8.ExportBlocks)  # put back
    assert not isinstance(model.visual.transformer, onnx_int8.ExportBlocks)


def test_the_last_blocks_one_position_layers_stay_fp32(small):
    """The last block's out_proj, c_fc and c_proj run at one position per image or caption: int8 would save nothing
    there, so the shipped graphs keep exactly those three weight MatMuls in fp32 and quantize every other."""
    import onnx
    loaded, _ = small
    folder = onnx_int8.root() / onnx_int8.key(loaded.model)
    for name in onnx_int8.FILES:
        graph = onnx.load(str(folder / name)).graph
        weights = {i.name: i.data_type for i in graph.initializer}
        float_matmuls = [n for n in graph.node if n.op_type == "MatMul" and weights.get(n.input[1]) == 1]
        assert len(float_matmuls) == 3, name
        assert sum(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in graph.node) > 0


def test_every_transpose_in_the_graphs_moves_one_axis(small):
    """ONNX Runtime's CPU Transpose has a dedicated copy for a permutation that moves one axis; the five-axis
    permute of q, k and v together that scaled_dot_product_attention on a packed tensor exports goes through its
    general path (docs/performance.md: the int8 text trunk ran 1.55x fp32 without it, 1.47-1.51x with it)."""
    import onnx
    loaded, _ = small
    folder = onnx_int8.root() / onnx_int8.key(loaded.model)

    def moves_one_axis(perm):  # the other axes keep their order: taking one out leaves them sorted
        return any(perm[:j] + perm[j + 1:] == sorted(perm[:j] + perm[j + 1:]) for j in range(len(perm)))

    for name in onnx_int8.FILES:
        perms = [list(a.ints) for n in onnx.load(str(folder / name)).graph.node if n.op_type == "Transpose"
                 for a in n.attribute if a.name == "perm"]
        assert perms and all(moves_one_axis(p) for p in perms), (name, [p for p in perms if not moves_one_axis(p)])


def test_a_second_use_loads_the_kept_files(small):
    loaded, q = small
    again = backends.prepare(copy.deepcopy(loaded.model), "int8-ort", "cpu")
    assert again.int8_build_s == 0 and "(reused:" in again.int8_kernels
    for a, b in zip(features(q, loaded, PIXELS, CAPTIONS), features(again, loaded, PIXELS, CAPTIONS)):
        assert torch.equal(a, b)  # the same files, the same threads


def test_damaged_files_are_rebuilt_never_used(small):
    loaded, q = small
    folder = onnx_int8.root() / onnx_int8.key(loaded.model)
    manifest = (folder / "manifest.json").read_text()
    (folder / "manifest.json").write_text(manifest[:-3])  # cut short
    assert onnx_int8._sound(folder) == "incomplete (JSONDecodeError)" and not onnx_int8.built(loaded.model)
    (folder / "manifest.json").write_text(manifest)
    raw = bytearray((folder / "visual.onnx").read_bytes())
    raw[len(raw) // 2] ^= 0x40  # one flipped bit in the weights: ONNX Runtime would load it and compute wrong features
    (folder / "visual.onnx").write_bytes(raw)
    assert autoprecision.slow_to_start(loaded.model) == ("int8-ort",)  # auto counts the export again
    rebuilt = backends.prepare(copy.deepcopy(loaded.model), "int8-ort", "cpu")
    assert rebuilt.int8_build_s > 0 and "damaged: visual.onnx does not match its checksum" in rebuilt.int8_kernels
    for a, b in zip(features(q, loaded, PIXELS, CAPTIONS), features(rebuilt, loaded, PIXELS, CAPTIONS)):
        assert torch.equal(a, b)
    assert autoprecision.slow_to_start(loaded.model) == ()


def test_auto_counts_the_export_only_while_the_files_are_missing(small):
    """A record's int8-ort build counts until its files are on disk; a record without a timed build is re-measured."""
    loaded, _ = small
    m = {"image_rate": 10.0, "caption_rate": 100.0, "setup_s": 1.0, "build_s": 60.0, "cos_image": 1.0,
         "cos_text": 1.0, "struck": ""}
    record = {"fp32": {**m, "build_s": 0.0}, "int8-ort": m}
    assert onnx_int8.built(loaded.model)
    assert autoprecision._built_now(record, loaded.model)["int8-ort"]["build_s"] == 0.0
    other = model_mod.load_model(str(SMALL_CLIP[0]), "none", seed=1).model  # other weights: nothing built
    model_mod.take_heads(other)
    assert autoprecision._built_now(record, other)["int8-ort"]["build_s"] == 60.0
    assert "int8-ort" not in autoprecision._built_now({**record, "int8-ort": {**m, "build_s": 0.0}}, other)
    kept = autoprecision._keep_build(record, {"int8-ort": {**m, "build_s": 0.0}})
    assert kept["int8-ort"]["build_s"] == 60.0  # reused now: the build measured before stays on record


def test_auto_takes_int8_ort_from_the_record_once_its_files_are_on_disk(small):
    """A record where int8-ort is fastest: a short job takes it at once while its files are on disk, and leaves it
    out (a minute of export, whatever the record says) for a model whose files are not."""
    import io

    loaded, _ = small
    m = {"image_rate": 10.0, "caption_rate": 100.0, "setup_s": 0.0, "build_s": 0.0, "cos_image": 1.0,
         "cos_text": 1.0, "struck": ""}
    record = {"fp32": m, "bf16": {**m, "image_rate": 1.0}, "int8-fbgemm": {**m, "image_rate": 15.0},
              "int8-ort": {**m, "image_rate": 20.0, "build_s": 1.0}}  # would win even with its build counted
    other = model_mod.load_model(str(SMALL_CLIP[0]), "none", seed=1).model
    model_mod.take_heads(other)
    pixels, tokens = torch.zeros(2, 3, 64, 64), loaded.tokenizer(["a red circle"] * 4)
    for net, expected in ((loaded.model, "int8-ort"), (other, "int8-fbgemm")):
        autoprecision.write_record(autoprecision.record_key("cpu", "ort-test"), record)
        precision, prepared, line = autoprecision.auto_precision(net, "cpu", pixels, tokens, 200, 1000, "ort-test",
                                                                 log=io.StringIO())
        assert (precision, prepared) == (expected, None) and "; from " in line


def test_an_export_that_fails_is_one_line_and_leaves_nothing_behind(small, monkeypatch, tmp_path):
    """A full disk (here: the exporter failing with ENOSPC) is told in one line; no half-built folder stays."""
    import errno

    loaded, _ = small
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))

    def full(model, folder):
        (folder / "visual.fp32.onnx").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(onnx_int8, "_export", full)
    with pytest.raises(model_mod.ModelError, match=r"int8-ort could not export the trunks into .*No space left on "
                       r"device.*XDG_CACHE_HOME") as err:
        backends.prepare(copy.deepcopy(loaded.model), "int8-ort", "cpu")
    assert "\n" not in str(err.value)
    assert [p.name for p in onnx_int8.root().iterdir() if not p.name.endswith(".lock")] == []


def test_the_weights_are_signed_exactly_where_the_probe_found_signed_products_exact(small, monkeypatch, tmp_path):
    """Signed 8-bit weights where ONNX Runtime's u8 x s8 products are exact (VNNI), unsigned elsewhere: the graphs,
    the manifest and the kernels line say which, and the other type is kept under another key, never mistaken for
    this one. (tests/test_avx2_only.py holds the probe itself: exact here with VNNI, saturating without.)"""
    import json

    import onnx
    loaded, q = small
    signed = onnx_int8.signed_weights_exact()
    for want_signed in (signed, not signed):
        monkeypatch.setattr(onnx_int8, "signed_weights_exact", lambda: want_signed)
        folder = onnx_int8.root() / onnx_int8.key(loaded.model)
        if want_signed != signed:
            monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
            assert not folder.exists()  # another key for the other type
            other = backends.prepare(copy.deepcopy(loaded.model), "int8-ort", "cpu")
            folder = onnx_int8.root() / onnx_int8.key(loaded.model)
            assert other.int8_build_s > 0
        word = "signed 8-bit" if want_signed else "unsigned 8-bit"
        assert json.loads((folder / "manifest.json").read_text())["weights"] == word
        for name in onnx_int8.FILES:
            graph = onnx.load(str(folder / name)).graph
            types = {i.data_type for i in graph.initializer if i.name.endswith("_quantized")}
            assert types == {onnx.TensorProto.INT8 if want_signed else onnx.TensorProto.UINT8}, name
    assert f"{'signed' if signed else 'unsigned'} 8-bit weights" in q.int8_kernels
