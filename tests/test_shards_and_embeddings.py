"""img2dataset / webdataset shards in, clip-retrieval-style embeddings out."""
import io
import json
import tarfile

import h5py
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from finetune_clip import cache, cli, extract, probe, shards

from conftest import SMALL_CLIP


def _add(tar, name, payload: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_shards(folder, images, df, per_shard=10, extra=None):
    """img2dataset's tar layout (shards.write_shards), plus ``extra`` members appended to named shards."""
    paths = shards.write_shards(df.drop(columns="split"), images, folder, per_shard)
    for path in paths:
        with tarfile.open(path, "a") as tar:
            for name, payload in (extra or {}).get(path.name, []):
                _add(tar, name, payload)
    return paths, df.drop_duplicates("image").reset_index(drop=True)


def _extract(tmp_path, pattern, name="s.h5"):
    settings = extract.ExtractSettings(annotations=None, images=None, cache=tmp_path / name, shards=str(pattern),
                                       model=str(SMALL_CLIP[0]), pretrained=str(SMALL_CLIP[1]), workers=0)
    return extract.extract(settings, log=io.StringIO()), cache.load(settings.cache)


@pytest.fixture(scope="module")
def shard_set(target_world, tmp_path_factory):
    annotations, images, _ = target_world
    df = pd.read_csv(annotations).head(150)  # 30 images
    folder = tmp_path_factory.mktemp("shards")
    paths, first = write_shards(folder, images, df)
    return folder, paths, first, images


def test_shards_give_the_features_files_give(shard_set, tmp_path):
    folder, paths, first, images = shard_set
    summary, c = _extract(tmp_path, folder / "{00000..00002}.tar")
    assert summary.images_done == 30 and not summary.failures
    assert list(c.image_names[:2]) == ["00000.tar/000000000.jpg", "00000.tar/000000001.jpg"]
    assert list(c.captions) == list(first["caption"])
    # the same images as files, through the ordinary annotations path
    ann = tmp_path / "a.csv"
    first.assign(split=None).to_csv(ann, index=False)
    files = extract.ExtractSettings(annotations=ann, images=images, cache=tmp_path / "f.h5",
                                    model=str(SMALL_CLIP[0]), pretrained=str(SMALL_CLIP[1]), workers=0)
    extract.extract(files, log=io.StringIO())
    f = cache.load(files.cache)
    assert np.array_equal(c.image_features, f.image_features)
    assert np.array_equal(c.text_features, f.text_features)


def test_glob_and_brace_patterns_name_the_same_shards(shard_set):
    folder = shard_set[0]
    assert shards.expand(str(folder / "*.tar")) == shards.expand(str(folder / "{00000..00002}.tar"))
    with pytest.raises(shards.ShardError, match="no such shard"):
        shards.expand(str(folder / "{00000..00009}.tar"))


def test_bad_members_are_recorded_and_nothing_shifts(target_world, tmp_path):
    annotations, images, _ = target_world
    df = pd.read_csv(annotations).head(100)  # 20 images, two shards of 10
    jpg = (images / df["image"].iloc[0]).read_bytes()
    extra = {"00000.tar": [("../evil.jpg", jpg), ("/abs/evil.txt", b"x"),            # unsafe names: skipped
                           ("lonely.jpg", jpg),                                       # image, no caption
                           ("nocaption.txt", b"a caption whose image is missing"),   # caption, no image
                           ("bogus.jpg", b"not a jpeg at all"), ("bogus.txt", b"a broken image")],
             # its caption comes first, so cutting the shard inside this image leaves a truncated image
             "00001.tar": [("000000000.txt", b"same key as in shard 0"), ("000000000.jpg", jpg)]}
    paths, first = write_shards(tmp_path / "sh", images, df, extra=extra)
    # cut the last shard in the middle of its last image member
    with tarfile.open(paths[1]) as tar:
        last = [m for m in tar.getmembers() if m.name.endswith(".jpg")][-1]
    raw = paths[1].read_bytes()
    paths[1].write_bytes(raw[:last.offset_data + last.size // 2])
    summary, c = _extract(tmp_path, tmp_path / "sh" / "*.tar")
    names = list(c.image_names)
    failed = dict(summary.failures)
    assert failed["00000.tar/nocaption.jpg"].startswith("missing")
    assert failed["00000.tar/bogus.jpg"].startswith("not_an_image")
    assert failed[f"00001.tar/{last.name}"].startswith("truncated")
    assert "00000.tar/000000000.jpg" in names and "00001.tar/000000000.jpg" in names  # same key, both kept
    assert not any("evil" in n or "lonely" in n for n in names)
    notes = " | ".join(summary.notes)
    assert "1 unsafe member name" not in notes and "2 unsafe member name" in notes
    assert "1 image without a caption" in notes and "more than one shard" in notes
    # every regular sample's caption still points at its own image's row
    regular = {f"{i // 10:05d}.tar/{i:09d}.jpg": r["caption"] for i, r in first.iterrows()}
    pairs = [(names[c.text_image_index[j]], caption) for j, caption in enumerate(c.captions)]
    assert sum(regular.get(name) == caption for name, caption in pairs) == len(regular)


def test_a_repeated_member_in_one_shard_is_one_clear_line(target_world, tmp_path):
    annotations, images, _ = target_world
    df = pd.read_csv(annotations).head(10)
    jpg = (images / df["image"].iloc[0]).read_bytes()
    write_shards(tmp_path / "sh", images, df, extra={"00000.tar": [("000000000.jpg", jpg)]})
    r = CliRunner().invoke(cli.cli, ["extract", "--shards", str(tmp_path / "sh" / "*.tar"),
                                     "--cache", str(tmp_path / "c.h5"), "--model", str(SMALL_CLIP[0]),
                                     "--pretrained", str(SMALL_CLIP[1])])
    assert r.exit_code == 1 and "key '000000000' has two 'jpg' members" in r.output and r.output.count("\n") == 1


def test_shards_and_annotations_cannot_be_mixed(tmp_path):
    r = CliRunner().invoke(cli.cli, ["extract", "--shards", "x.tar", "--images", str(tmp_path)])
    assert r.exit_code == 2 and "--shards replaces --annotations and --images" in r.output


def test_files_layout_and_resume(target_world, tmp_path):
    """img2dataset's output_format=files: numbered folders of KEY.jpg / KEY.txt, plus its own side files."""
    annotations, images, _ = target_world
    first = pd.read_csv(annotations).drop_duplicates("image").head(12).reset_index(drop=True)
    for i, r in first.iterrows():
        d = tmp_path / "files" / f"{i // 5:05d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:09d}.jpg").write_bytes((images / r["image"]).read_bytes())
        (d / f"{i:09d}.txt").write_text(r["caption"])
    (tmp_path / "files" / "00000.parquet").write_bytes(b"PAR1")
    (tmp_path / "files" / "00000_stats.json").write_text("{}")
    summary, c = _extract(tmp_path, tmp_path / "files")
    assert summary.images_done == 12 and c.image_names[0] == "00000/000000000.jpg"
    before = c.image_features.copy()
    with h5py.File(c.path, "r+") as f:  # as if killed after the first batch
        f["images/status"][4:] = cache.PENDING
        f["images/features"][4:] = np.nan
        f.attrs["complete"] = False
    summary, again = _extract(tmp_path, tmp_path / "files")
    assert "resumed a partial cache" in summary.notes
    assert np.array_equal(again.image_features, before)


# ---------------------------------------------------------------- embeddings out

def test_embeddings_index_ranks_as_search_does(small_extracted, small_probed, tmp_path):
    c = cache.load(small_extracted.cache)
    r = CliRunner().invoke(cli.cli, ["export", "--cache", str(c.path), "--embeddings", str(tmp_path / "emb"),
                                     "--checkpoint", str(small_probed[0])])
    assert r.exit_code == 0, r.output
    img = np.load(tmp_path / "emb/img_emb/img_emb_0.npy")
    txt = np.load(tmp_path / "emb/text_emb/text_emb_0.npy")
    meta = pd.read_parquet(tmp_path / "emb/metadata/metadata_0.parquet")
    tmeta = pd.read_parquet(tmp_path / "emb/text_metadata/text_metadata_0.parquet")
    assert img.dtype == np.float16 and txt.dtype == np.float16
    assert len(img) == len(meta) == c.image_ok.sum() and len(txt) == len(tmeta) == len(c.captions)
    assert np.allclose(np.linalg.norm(img.astype(np.float32), axis=1), 1, atol=2e-3)
    assert list(tmeta["image_path"]) == list(meta["image_path"].to_numpy()[tmeta["image_index"]])
    assert json.loads((tmp_path / "emb/export.json").read_text())["cache_fingerprint"] == c.fingerprint
    heads, _ = probe.load_checkpoint(small_probed[0], c)
    eps = 2.5e-3  # float16 storage moves a unit-vector dot product by about 1e-3 at most
    exact_positions = 0
    for row in range(0, len(c.captions), 97):
        hits = probe.search(c, heads, c.text_features[row], 6)
        scores = np.array([h["score"] for h in hits])
        index_scores = img.astype(np.float32) @ txt[row].astype(np.float32)  # an exact inner-product index
        top = meta["image_path"].to_numpy()[np.argsort(-index_scores, kind="stable")[:5]]
        for p in range(5):
            clear = scores[p] - scores[p + 1] >= eps and (p == 0 or scores[p - 1] - scores[p] >= eps)
            if clear:  # a position clearly apart from its neighbours must hold the same image
                assert top[p] == hits[p]["image"], (row, p)
                exact_positions += 1
        # and nothing enters the index's top 5 that search scores clearly below its own 5th
        by_name = {h["image"]: h["score"] for h in probe.search(c, heads, c.text_features[row], len(meta))}
        assert all(by_name[name] >= scores[4] - eps for name in top)
    assert exact_positions >= 50


def test_embeddings_need_a_cache(tmp_path):
    r = CliRunner().invoke(cli.cli, ["export", "--embeddings", str(tmp_path / "e")])
    assert r.exit_code == 2 and "--embeddings needs --cache" in r.output
