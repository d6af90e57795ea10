"""The HDF5 feature cache: schema, create / resume / finish, fingerprint, loading.

One file per dataset x model x precision. Rows are fixed when the file is created
(one per image, one per caption, in annotation order) and never move: extraction
only fills feature rows and flips their status, so a failure can never shift rows.
Feature rows start as NaN, so a row that was never written cannot pass for a vector.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from atomic import replacing

PENDING, DONE, FAILED = 0, 1, 2
# HDF5's own per-chunk checksum on every numeric dataset: a flipped byte fails the read
# instead of silently changing the numbers. (Strings live in HDF5's global heap, which
# filters do not cover; a damaged heap fails to decode instead.)
CHECKED = dict(fletcher32=True)
# Attributes that change the cache's contents: a resume or a reader that expects
# other values is refused, naming the attribute.
IDENTITY = ("model", "model_config", "pretrained", "precision", "annotations_sha256", "seed")
_STR = h5py.string_dtype("utf-8")


class CacheError(ValueError):
    """A cache that is missing, incomplete, busy or made with other settings."""


@contextmanager
def locked(path: str | os.PathLike):
    """Hold an exclusive lock beside the cache while writing it.

    flock is released by the kernel when the process dies, so a SIGKILLed run
    never leaves a stale lock behind.
    """
    lock_path = Path(str(path) + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise CacheError(f"cache {path} is in use by another extract (lock {lock_path})") from None
            raise
        yield
    finally:
        os.close(fd)


def create(path: str | os.PathLike, *, image_names, image_splits, captions, caption_image_index,
           heads: dict, attrs: dict, chunk_rows: int = 256) -> None:
    """Write an empty cache (all rows pending) to a temp file and move it into place."""
    n_img, n_cap = len(image_names), len(captions)
    img_dim, txt_dim = heads["visual_proj"].shape[0], heads["text_projection"].shape[0]
    with replacing(path) as tmp, h5py.File(tmp, "w") as f:
        g = f.create_group("images")
        g.create_dataset("name", data=np.asarray(image_names, dtype=object), dtype=_STR)
        g.create_dataset("split", data=np.asarray(image_splits, dtype=object), dtype=_STR)
        g.create_dataset("features", shape=(n_img, img_dim), dtype="f4", fillvalue=np.nan,
                         chunks=(max(1, min(n_img, chunk_rows)), img_dim), **CHECKED)
        g.create_dataset("status", data=np.zeros(n_img, np.uint8), chunks=True, **CHECKED)
        g.create_dataset("error", data=np.full(n_img, "", dtype=object), dtype=_STR)
        t = f.create_group("texts")
        t.create_dataset("caption", data=np.asarray(captions, dtype=object), dtype=_STR)
        t.create_dataset("image_index", data=np.asarray(caption_image_index, dtype=np.int64), chunks=True,
                         **CHECKED)
        t.create_dataset("features", shape=(n_cap, txt_dim), dtype="f4", fillvalue=np.nan,
                         chunks=(max(1, min(n_cap, chunk_rows)), txt_dim), **CHECKED)
        t.create_dataset("status", data=np.zeros(n_cap, np.uint8), chunks=True, **CHECKED)
        h = f.create_group("heads")
        for name in ("visual_proj", "text_projection"):
            h.create_dataset(name, data=np.asarray(heads[name], dtype=np.float32), chunks=True, **CHECKED)
        h.create_dataset("logit_scale", data=np.float32(heads["logit_scale"]))  # a scalar cannot be chunked
        for k, v in attrs.items():
            f.attrs[k] = str(v) if isinstance(v, str) else v  # str subclasses (torch.__version__) confuse h5py
        f.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        f.attrs["complete"] = False
        f.attrs["fingerprint"] = ""


def mismatch(stored: dict, wanted: dict) -> list[str]:
    return [f"{k}={stored.get(k)!r} (wanted {wanted[k]!r})"
            for k in IDENTITY if k in wanted and str(stored.get(k)) != str(wanted[k])]


class Writer:
    """Fills a created cache. Each write is flushed, so a killed run keeps what it wrote."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.f = h5py.File(self.path, "r+")
        self.img, self.txt = self.f["images"], self.f["texts"]

    def close(self) -> None:
        self.f.close()

    def image_status(self) -> np.ndarray:
        return self.img["status"][:]

    def text_status(self) -> np.ndarray:
        return self.txt["status"][:]

    def write_images(self, start: int, feats: np.ndarray, ok: np.ndarray, errors: list[str]) -> None:
        """Rows ``start..start+len(ok)``: features where ``ok``, failure reasons elsewhere.

        Features go in before the status, so a run killed in between leaves the
        rows pending and they are simply redone.
        """
        stop = start + len(ok)
        block = np.full((len(ok), self.img["features"].shape[1]), np.nan, np.float32)
        block[ok] = feats
        self.img["features"][start:stop] = block
        self.img["error"][start:stop] = np.asarray(errors, dtype=object)
        self.img["status"][start:stop] = np.where(ok, DONE, FAILED).astype(np.uint8)
        self.f.flush()

    def write_texts(self, start: int, feats: np.ndarray) -> None:
        stop = start + len(feats)
        self.txt["features"][start:stop] = feats
        self.txt["status"][start:stop] = DONE
        self.f.flush()

    def finish(self) -> str:
        """Seal the cache: fingerprint its contents, then set ``complete`` last."""
        if (self.img["status"][:] == PENDING).any() or (self.txt["status"][:] != DONE).any():
            raise CacheError(f"cache {self.path} still has pending rows; it cannot be finished")
        fp = fingerprint(self.f)
        self.f.attrs["fingerprint"] = fp
        self.f.flush()
        self.f.attrs["complete"] = True
        self.f.flush()
        return fp


def fingerprint(f: h5py.File) -> str:
    """sha256 over the identity attributes and every stored array, read in slabs (flat memory)."""
    h = hashlib.sha256()
    for k in IDENTITY:
        h.update(f"{k}={f.attrs.get(k, '')}\n".encode())
    for name in ("images/name", "images/split", "images/status", "images/error", "texts/caption",
                 "texts/image_index", "texts/status", "heads/visual_proj", "heads/text_projection",
                 "heads/logit_scale", "images/features", "texts/features"):
        d = f[name]
        step = 8192
        for s in range(0, max(1, d.shape[0] if d.shape else 1), step):
            part = d[s:s + step] if d.shape else d[()]
            if h5py.check_string_dtype(d.dtype):
                part = "\0".join(x.decode() if isinstance(x, bytes) else x for x in part).encode()
            h.update(np.ascontiguousarray(part).tobytes() if not isinstance(part, bytes) else part)
    return h.hexdigest()[:16]


def _attrs(f: h5py.File) -> dict:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}


def read_attrs(path: str | os.PathLike) -> dict:
    with h5py.File(path, "r") as f:
        return _attrs(f)


def read_status(path: str | os.PathLike):
    """(image names, image status, image errors, number of captions), without loading features."""
    with h5py.File(path, "r") as f:
        return (f["images/name"].asstr()[:], f["images/status"][:], f["images/error"].asstr()[:],
                int(f["texts/status"].shape[0]))


@dataclass
class Cache:
    """A complete cache in memory. Arrays are numpy; probe/eval turn them into tensors."""
    path: Path
    attrs: dict
    image_names: np.ndarray      # [N_img] str
    image_split: np.ndarray      # [N_img] str
    image_ok: np.ndarray         # [N_img] bool, status done
    image_error: np.ndarray      # [N_img] str, why a failed image failed
    image_features: np.ndarray   # [N_img, D_img] float32 (NaN where not ok)
    captions: np.ndarray         # [N_cap] str
    text_image_index: np.ndarray  # [N_cap] int64
    text_features: np.ndarray    # [N_cap, D_txt] float32
    heads: dict                  # visual_proj [D_img, E], text_projection [D_txt, E], logit_scale []
    notes: list = field(default_factory=list)  # what a reader should be told (e.g. no checksums)

    @property
    def fingerprint(self) -> str:
        return self.attrs["fingerprint"]

    def split(self, name: str) -> "SplitView":
        """Images of one split that were extracted, and their captions, re-indexed from 0.

        A failed image and its captions are left out together, so every caption
        kept still points at its own image's row.
        """
        if name != "all" and name not in set(self.image_split):
            raise CacheError(f"split {name!r} has no images in {self.path}; "
                             f"splits present: {sorted(set(self.image_split))}")
        keep = self.image_ok & ((self.image_split == name) if name != "all" else True)
        rows = np.flatnonzero(keep)
        new_index = np.full(len(self.image_names), -1, np.int64)
        new_index[rows] = np.arange(len(rows))
        cap_rows = np.flatnonzero(new_index[self.text_image_index] >= 0)
        return SplitView(name=name, image_rows=rows, caption_rows=cap_rows,
                         image_features=self.image_features[rows],
                         text_features=self.text_features[cap_rows],
                         text_image_index=new_index[self.text_image_index[cap_rows]])


@dataclass
class SplitView:
    name: str
    image_rows: np.ndarray        # rows in /images
    caption_rows: np.ndarray      # rows in /texts
    image_features: np.ndarray
    text_features: np.ndarray
    text_image_index: np.ndarray  # into image_features (0..n_images-1)

    @property
    def n_images(self) -> int:
        return len(self.image_rows)

    @property
    def n_captions(self) -> int:
        return len(self.caption_rows)


def load(path: str | os.PathLike) -> Cache:
    """Read a complete cache into memory (probe and eval need every row anyway).

    Every numeric dataset is read through its checksum; a damaged chunk becomes a
    CacheError that says so, never numbers that are silently wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"cache not found: {path} (run `python cli.py extract` first)")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise CacheError(f"cache {path} cannot be opened ({exc}); run extract again to rebuild it") from None
    with f:
        if not bool(f.attrs.get("complete", False)):
            done = int((f["images/status"][:] != PENDING).sum())
            raise CacheError(f"cache {path} is not complete ({done}/{f['images/status'].shape[0]} images done); "
                             "run the same extract command again to finish it")
        try:
            cache = _read(path, f)
        except OSError as exc:  # h5py reports a failed Fletcher32 checksum as an OSError on read
            raise CacheError(f"cache {path} is damaged ({str(exc).splitlines()[0][:100]}); delete it and run "
                             "the same extract command again to rebuild it") from None
        if not f["images/features"].fletcher32:
            cache.notes.append(f"{path} was written before caches carried checksums: damage to it cannot be "
                               "detected (extract it again to add them)")
    return cache


def _read(path: Path, f: h5py.File) -> Cache:
    img, txt = f["images"], f["texts"]
    if (txt["status"][:] != DONE).any():
        raise CacheError(f"cache {path} is marked complete but has captions not done; run extract again")
    return Cache(
        path=path,
        attrs=_attrs(f),
        image_names=img["name"].asstr()[:].astype(object),
        image_split=img["split"].asstr()[:].astype(object),
        image_ok=img["status"][:] == DONE,
        image_error=img["error"].asstr()[:].astype(object),
        image_features=img["features"][:],
        captions=txt["caption"].asstr()[:].astype(object),
        text_image_index=txt["image_index"][:],
        text_features=txt["features"][:],
        heads={k: f["heads"][k][()] for k in ("visual_proj", "text_projection", "logit_scale")},
    )
