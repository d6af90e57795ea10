"""Annotation formats, caption policy, splits, names and images that fight back."""
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from finetune_clip import data, worlds


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- formats

def test_canonical_csv(tmp_path):
    p = write(tmp_path / "a.csv", "image,caption,split\na.jpg,A dog .,train\nb.jpg,NA,test\n")
    df, _ = data.read_annotations(p)
    assert df.values.tolist() == [["a.jpg", "A dog .", "train"], ["b.jpg", "NA", "test"]]  # "NA" is text


def test_kaggle_results_with_missing_separator(tmp_path):
    p = write(tmp_path / "results.csv",
              "image_name| comment_number| comment\n"
              "1000092795.jpg| 0| Two young guys with shaggy hair .\n"
              "2199200615.jpg| 4   A dog runs across the grass .\n"
              "2199200615.jpg| 3| A | sign is held .\n")
    assert data.detect_format(p) == "kaggle"
    df, report = data.read_annotations(p)
    assert df["caption"].tolist() == ["Two young guys with shaggy hair .", "A dog runs across the grass .",
                                      "A | sign is held ."]
    assert df["image"].tolist() == ["1000092795.jpg", "2199200615.jpg", "2199200615.jpg"]
    assert report.recovered_lines == [3]


def test_kaggle_unparseable_row_is_named_by_line(tmp_path):
    p = write(tmp_path / "results.csv", "image_name| comment_number| comment\na.jpg| 0| ok\ngarbage line\n")
    with pytest.raises(data.DataError, match=":3: cannot parse"):
        data.read_annotations(p)


def test_karpathy_json_keeps_its_split(tmp_path):
    doc = {"images": [
        {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "A cat ."}, {"raw": "A pet ."}]},
        {"filename": "b.jpg", "split": "restval", "sentences": [{"raw": "A dog ."}]},
        {"filename": "c.jpg", "split": "test", "sentences": [{"raw": "A cow ."}]}]}
    p = write(tmp_path / "dataset_flickr30k.json", json.dumps(doc))
    df, _ = data.read_annotations(p)
    assert df["split"].tolist() == ["train", "train", "train", "test"]
    assert data.assign_splits(df)["split"].tolist() == ["train", "train", "train", "test"]


def test_hf_annotations_form(tmp_path):
    df = pd.DataFrame({"raw": [json.dumps(["A b .", "C d ."]), json.dumps(["E f ."])],
                       "sentids": ["[0, 1]", "[2]"], "split": ["train", "val"],
                       "filename": ["1.jpg", "2.jpg"], "img_id": ["0", "1"]})
    df.to_csv(tmp_path / "flickr_annotations_30k.csv", index=False)
    out, _ = data.read_annotations(tmp_path / "flickr_annotations_30k.csv")
    assert out.values.tolist() == [["1.jpg", "A b .", "train"], ["1.jpg", "C d .", "train"], ["2.jpg", "E f .", "val"]]


def test_unknown_format_names_columns_and_formats(tmp_path):
    p = write(tmp_path / "x.csv", "picture,text\na.jpg,hi\n")
    with pytest.raises(data.DataError, match=r"found columns \['picture', 'text'\].*accepted: csv"):
        data.read_annotations(p)


def test_named_format_with_missing_column(tmp_path):
    p = write(tmp_path / "x.csv", "image,text\na.jpg,hi\n")
    with pytest.raises(data.DataError, match=r"missing column\(s\) \['caption'\]"):
        data.read_annotations(p, "csv")


# ---------------------------------------------------------------- captions

def test_caption_policy_is_counted(tmp_path):
    rows = pd.DataFrame({"image": ["a.jpg"] * 7,
                         "caption": ["A dog .", "  ", None, 42, "A  dog . ", "Ein Hund läuft .", "ok"]})
    df, report = data.clean_captions(rows)
    assert df["caption"].tolist() == ["A dog .", "Ein Hund läuft .", "ok"]
    assert report.dropped == {"empty": 1, "missing": 1, "not_text": 1, "duplicate": 1}
    assert report.non_ascii == 1 and report.kept == 3


def test_nothing_left_is_an_error():
    with pytest.raises(data.DataError, match="no usable captions"):
        data.clean_captions(pd.DataFrame({"image": ["a"], "caption": [" "]}))


# ---------------------------------------------------------------- names and splits

@pytest.mark.parametrize("name", ["/etc/passwd", "../secret.jpg", "a/../../b.jpg", "C:\\x.jpg"])
def test_names_leaving_the_root_are_refused(tmp_path, name):
    p = tmp_path / "a.csv"
    pd.DataFrame({"image": ["ok.jpg", name], "caption": ["x", "y"]}).to_csv(p, index=False)
    with pytest.raises(data.DataError, match="leaves the image root"):
        data.read_annotations(p)


def test_image_in_two_splits_is_refused():
    df = pd.DataFrame({"image": ["a", "a", "b"], "caption": ["x", "y", "z"], "split": ["train", "test", "val"]})
    with pytest.raises(data.DataError, match="'a' appears in more than one split"):
        data.assign_splits(df)


def test_random_split_is_by_image_and_seeded():
    df = pd.DataFrame({"image": np.repeat([f"{i}.jpg" for i in range(100)], 5), "caption": range(500)})
    df["caption"] = df["caption"].astype(str)
    df["split"] = None
    a, b = data.assign_splits(df, seed=3), data.assign_splits(df, seed=3)
    assert a["split"].tolist() == b["split"].tolist()
    assert a.groupby("image")["split"].nunique().max() == 1
    assert a.drop_duplicates("image")["split"].value_counts().to_dict() == {"train": 80, "val": 10, "test": 10}
    assert data.assign_splits(df, seed=4)["split"].tolist() != a["split"].tolist()


def test_apply_splits_by_name():
    override = pd.DataFrame({"image": ["b", "a"], "caption": ["x", "y"], "split": ["test", "val"]})
    assert data.apply_splits(["a", "b"], override).tolist() == ["val", "test"]
    with pytest.raises(data.DataError, match="'c'"):
        data.apply_splits(["a", "c"], override)


# ---------------------------------------------------------------- images

def _jpeg(path, size=(40, 30), colour=(200, 30, 30)):
    Image.new("RGB", size, colour).save(path, quality=95)
    return path


def test_bad_images_get_a_reason(tmp_path, monkeypatch):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image at all")
    full = _jpeg(tmp_path / "full.jpg", size=(300, 300)).read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(full[: len(full) // 2])
    cases = {"missing.jpg": "missing", "empty.jpg": "empty", "text.jpg": "not_an_image",
             "truncated.jpg": "truncated"}
    for name, reason in cases.items():
        with pytest.raises(data.ImageLoadError) as err:
            data.load_image(tmp_path / name)
        assert err.value.reason == reason, name
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for side in (40, 100):  # just over the limit (PIL warns) and far over it (PIL raises)
        _jpeg(tmp_path / f"big{side}.jpg", size=(side, side))
        with pytest.raises(data.ImageLoadError) as err:
            data.load_image(tmp_path / f"big{side}.jpg")
        assert err.value.reason == "too_large"


def test_unusual_modes_become_sensible_rgb(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "clear.png")           # fully transparent red
    Image.new("LA", (8, 8), (0, 255)).save(tmp_path / "la.png")                       # opaque black
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(tmp_path / "g16.png")     # 16-bit white
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(tmp_path / "g16mid.png")
    Image.new("L", (8, 8), 77).save(tmp_path / "grey.png")
    px = {n: data.load_image(tmp_path / n).getpixel((4, 4)) for n in
          ("cmyk.jpg", "clear.png", "la.png", "pal.png", "g16.png", "g16mid.png", "grey.png")}
    assert all(data.load_image(tmp_path / n).mode == "RGB" for n in px)
    assert px["cmyk.jpg"][0] > 200 and px["cmyk.jpg"][1] < 60
    assert px["clear.png"] == (255, 255, 255)   # transparency composited on white
    assert px["la.png"] == (0, 0, 0)
    assert px["pal.png"] == (0, 0, 255)
    assert px["g16.png"] == (255, 255, 255) and px["g16mid.png"] == (128, 128, 128)
    assert px["grey.png"] == (77, 77, 77)


def test_exif_rotation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 200, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    im.save(tmp_path / "rot.jpg", exif=exif)
    assert data.load_image(tmp_path / "rot.jpg").size == (20, 40)


def test_ordinary_rgb_jpeg_is_untouched(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(tmp_path / "x.jpg")
    ours = np.asarray(data.load_image(tmp_path / "x.jpg"))
    theirs = np.asarray(Image.open(tmp_path / "x.jpg").convert("RGB"))  # what open_clip's transform does
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("world", ["source", "target"])
def test_generated_worlds_are_deterministic(tmp_path, world):
    a = worlds.make_dataset(tmp_path / "a", world, n_images=20, seed=1, size=32)
    b = worlds.make_dataset(tmp_path / "b", world, n_images=20, seed=1, size=32)
    assert a.read_text() == b.read_text()
    df = pd.read_csv(a)
    assert df.groupby("image")["caption"].nunique().min() == 5
    name = f"images/{world}_00000.jpg"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
