"""The cache's complete flag, identity, lock and loading by split."""
import h5py
import numpy as np
import pytest

from finetune_clip import cache

from conftest import make_synthetic_cache


def test_incomplete_cache_is_never_read(tmp_path):
    path = make_synthetic_cache(tmp_path / "c.h5")
    with h5py.File(path, "r+") as f:
        f.attrs["complete"] = False
    with pytest.raises(cache.CacheError, match="not complete"):
        cache.load(path)


def test_unfinished_rows_refuse_to_seal(tmp_path):
    path = make_synthetic_cache(tmp_path / "c.h5")
    with h5py.File(path, "r+") as f:
        f["texts/status"][3] = cache.PENDING
    w = cache.Writer(path)
    with pytest.raises(cache.CacheError, match="pending"):
        w.finish()
    w.close()


def test_unwritten_rows_are_nan_not_zero(tmp_path):
    path = make_synthetic_cache(tmp_path / "c.h5", failed=[4, 9])
    c = cache.load(path)
    assert np.isnan(c.image_features[[4, 9]]).all()
    assert not c.image_ok[4] and c.image_error[4].startswith("missing")


def test_split_leaves_out_failed_images_with_their_captions(tmp_path):
    path = make_synthetic_cache(tmp_path / "c.h5", n_images=20, failed=[1])
    c = cache.load(path)
    view = c.split("train")
    assert 1 not in view.image_rows and view.n_images == 13
    assert view.n_captions == 13 * 5
    # every caption still points at its own image's features
    for row, local in zip(view.caption_rows, view.text_image_index):
        assert view.image_rows[local] == c.text_image_index[row]
    with pytest.raises(cache.CacheError, match="no images"):
        c.split("holdout")


def test_fingerprint_follows_contents(tmp_path):
    a = cache.read_attrs(make_synthetic_cache(tmp_path / "a.h5", seed=0))["fingerprint"]
    b = cache.read_attrs(make_synthetic_cache(tmp_path / "b.h5", seed=0))["fingerprint"]
    c = cache.read_attrs(make_synthetic_cache(tmp_path / "c.h5", seed=1))["fingerprint"]
    assert a == b != c


def test_second_writer_is_refused(tmp_path):
    path = tmp_path / "c.h5"
    with cache.locked(path):
        with pytest.raises(cache.CacheError, match="in use"):
            with cache.locked(path):
                pass
    with cache.locked(path):  # released again
        pass


def test_mismatch_names_the_attribute():
    stored = {"model": "ViT-B-32", "precision": "fp32", "pretrained": "none"}
    assert cache.mismatch(stored, {"model": "ViT-B-32", "precision": "bf16"}) == ["precision='fp32' (wanted 'bf16')"]


def test_missing_cache_says_what_to_run(tmp_path):
    with pytest.raises(cache.CacheError, match="extract"):
        cache.load(tmp_path / "nope.h5")


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    from finetune_clip.atomic import replacing
    target = tmp_path / "out" / "x.json"
    with replacing(target) as tmp:
        tmp.write_text("old")
    with pytest.raises(RuntimeError):
        with replacing(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.json"]


def _flip_a_byte_inside(path, dataset):
    import h5py
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(0)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0x40]))


@pytest.mark.parametrize("dataset", ["images/features", "texts/features", "texts/status"])
def test_a_flipped_byte_is_caught_and_named(tmp_path, dataset):
    path = make_synthetic_cache(tmp_path / "c.h5")
    _flip_a_byte_inside(path, dataset)
    with pytest.raises(cache.CacheError, match="is damaged .*run the same extract command again"):
        cache.load(path)


def test_cli_says_the_cache_is_damaged_in_one_line(tmp_path):
    from click.testing import CliRunner

    from finetune_clip import cli
    path = make_synthetic_cache(tmp_path / "c.h5")
    _flip_a_byte_inside(path, "images/features")
    for args in (["eval", "--baseline-only"], ["probe", "--epochs", "1"], ["compare", "--b", "baseline"]):
        r = CliRunner().invoke(cli.cli, [*args, "--cache", str(path)])
        assert r.exit_code == 1 and r.output.count("\n") == 1 and "is damaged" in r.output, r.output


def test_a_cache_from_before_checksums_still_loads_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "CHECKED", {})
    c = cache.load(make_synthetic_cache(tmp_path / "old.h5"))
    assert c.image_features.shape[0] == 200
    assert any("before caches carried checksums" in n for n in c.notes)
    monkeypatch.undo()
    assert cache.load(make_synthetic_cache(tmp_path / "new.h5")).notes == []
