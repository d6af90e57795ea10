"""Projected, L2-normalised embeddings out of a cache, where people index them.

The folder layout is clip-retrieval's (its ``index`` step and autofaiss read it):

    DIR/img_emb/img_emb_0.npy                 float16 [n_images, E]   one row per usable image
    DIR/text_emb/text_emb_0.npy               float16 [n_captions, E] one row per caption of those images
    DIR/metadata/metadata_0.parquet           per img_emb row: image_path, caption (its first), split, cache_row
    DIR/text_metadata/text_metadata_0.parquet per text_emb row: caption, image_index (row of img_emb),
                                              image_path, split, cache_row
    DIR/export.json                           what made them: cache, fingerprint, heads, interpolation alpha

Text metadata has its own folder because clip-retrieval aligns ``metadata/`` with ``img_emb/``
row by row, and a Flickr-style collection has five captions per image. Failed images and their
captions are left out (as in probe and eval); ``cache_row`` traces every row back to the cache.
Works from the cache alone, like probe and eval: no model is loaded.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from . import cache as cache_mod
from .atomic import replacing


def project(c: cache_mod.Cache, visual_proj: torch.Tensor, text_projection: torch.Tensor):
    """(image embeddings, text embeddings, the split view they come from), L2-normalised fp32."""
    view = c.split("all")
    with torch.no_grad():
        img = F.normalize(torch.from_numpy(view.image_features) @ visual_proj, dim=-1)
        txt = F.normalize(torch.from_numpy(view.text_features) @ text_projection, dim=-1)
    return img.numpy(), txt.numpy(), view


def write(c: cache_mod.Cache, visual_proj: torch.Tensor, text_projection: torch.Tensor, out: Path,
          source: dict) -> dict:
    """Write the embeddings of every usable image and caption of ``c``; ``source`` says which heads."""
    img, txt, view = project(c, visual_proj, text_projection)
    names = c.image_names[view.image_rows].astype(str)
    splits = c.image_split[view.image_rows].astype(str)
    captions = c.captions[view.caption_rows].astype(str)
    first = pd.Series(captions).groupby(view.text_image_index).first().reindex(range(len(names)), fill_value="")
    _save_npy(out / "img_emb" / "img_emb_0.npy", img)
    _save_npy(out / "text_emb" / "text_emb_0.npy", txt)
    _save_parquet(out / "metadata" / "metadata_0.parquet", pd.DataFrame(
        {"image_path": names, "caption": first.to_numpy(), "split": splits, "cache_row": view.image_rows}))
    _save_parquet(out / "text_metadata" / "text_metadata_0.parquet", pd.DataFrame(
        {"caption": captions, "image_index": view.text_image_index, "image_path": names[view.text_image_index],
         "split": splits[view.text_image_index], "cache_row": view.caption_rows}))
    record = {"images": len(names), "captions": len(captions), "dim": int(img.shape[1]), "dtype": "float16",
              "normalised": "L2, before the float16 cast", "cache": str(c.path), "cache_fingerprint": c.fingerprint,
              **{k: c.attrs.get(k) for k in ("model", "pretrained", "precision")}, **source}
    with replacing(out / "export.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return record


def _save_npy(path: Path, array: np.ndarray) -> None:
    with replacing(path) as tmp:
        with open(tmp, "wb") as fh:  # np.save on a path would append '.npy' to the temp name
            np.save(fh, array.astype(np.float16))


def _save_parquet(path: Path, df: pd.DataFrame) -> None:
    with replacing(path) as tmp:
        df.to_parquet(tmp, index=False)
