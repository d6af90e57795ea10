"""Extraction over a collection with broken images and awkward captions: nothing shifts, nothing is hidden."""
import shutil

import numpy as np
import pandas as pd
import torch
from click.testing import CliRunner
from PIL import Image

from finetune_clip import cache, cli

LONG = " ".join(["a brown dog jumps over a wooden fence in the park"] * 10)


def test_failures_are_recorded_and_rows_never_shift(shapes, reference_model, tmp_path):
    annotations, images = shapes
    root = tmp_path / "images"
    shutil.copytree(images, root)
    df = pd.read_csv(annotations)
    names = list(dict.fromkeys(df["image"]))
    (root / names[0]).unlink()                          # missing
    (root / names[1]).write_bytes(b"")                  # zero bytes
    for n in names[8:16]:                               # a whole batch of 8 truncated
        b = (root / n).read_bytes()
        (root / n).write_bytes(b[: len(b) // 3])
    (root / names[20]).write_text("<html>not an image</html>")
    df.loc[len(df)] = [names[5], LONG, df.loc[df["image"] == names[5], "split"].iloc[0]]   # > 77 tokens
    df.loc[len(df)] = [names[6], "   ", df.loc[df["image"] == names[6], "split"].iloc[0]]  # dropped
    df.loc[len(df)] = [names[7], "Ein Hund läuft über die Wiese", df.loc[df["image"] == names[7], "split"].iloc[0]]
    ann = tmp_path / "ann.csv"
    df.to_csv(ann, index=False)
    cache_path = tmp_path / "c.h5"
    result = CliRunner().invoke(cli.cli, ["extract", "--annotations", str(ann), "--images", str(root),
                                          "--cache", str(cache_path), "--pretrained", "none", "--workers", "1",
                                          "--batch-size", "8", "--strict"])
    assert result.exit_code == 1
    assert "13 done, 11 failed (" in result.output and "empty 1, missing 1, not_an_image 1" in result.output
    summary = [line for line in result.output.splitlines() if line.startswith("images: 13 done")][0]
    assert summary.count("truncated") + summary.count("corrupt") >= 1  # the 8 cut-off JPEGs, by PIL's word
    assert "1 truncated to the context length" in result.output and "empty 1" in result.output
    assert "captions with non-ASCII text (kept): 1" in result.output
    assert "--strict: 11 image(s) failed" in result.output and names[0] in result.output

    c = cache.load(cache_path)  # complete despite the failures
    failed = ~c.image_ok
    assert failed.sum() == 11 and np.isnan(c.image_features[failed]).all()
    assert {e.split(":")[0] for e in c.image_error[failed]} <= {"missing", "empty", "truncated", "corrupt",
                                                                 "not_an_image"}
    # each stored row is still its own image
    model, preprocess = reference_model.model, reference_model.preprocess
    for row in np.flatnonzero(c.image_ok)[[0, 3, -1]]:
        px = preprocess(Image.open(root / c.image_names[row]).convert("RGB"))[None]
        with torch.no_grad():
            want = model.encode_image(px)[0].numpy()
        got = c.image_features[row] @ c.heads["visual_proj"]
        assert np.abs(got - want).max() / np.abs(want).max() < 1e-5
    # captions of failed images are out of every split, the rest point at their own image
    for split in ("train", "val", "test"):
        view = c.split(split)
        assert not np.isin(c.text_image_index[view.caption_rows], np.flatnonzero(failed)).any()
    with torch.no_grad():
        want = model.encode_text(reference_model.tokenizer([LONG]))[0].numpy()
    row = list(c.captions).index(LONG)
    assert np.abs(c.text_features[row] @ c.heads["text_projection"] - want).max() / np.abs(want).max() < 1e-5

    again = CliRunner().invoke(cli.cli, ["extract", "--annotations", str(ann), "--images", str(root),
                                         "--cache", str(cache_path), "--pretrained", "none"])
    assert again.exit_code == 0 and "11 failed" in again.output  # without --strict it succeeds
