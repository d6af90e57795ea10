"""Annotations, splits and safe image opening (the generated worlds live in worlds.py).

Everything here works on plain pandas / PIL objects; nothing imports torch.
The canonical in-memory form of a collection is a DataFrame with one row per
caption and the columns ``image, caption, split``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from .atomic import replacing

SPLITS = ("train", "val", "test")
FORMATS = ("csv", "kaggle", "karpathy", "hf")


class DataError(ValueError):
    """Bad annotations or names: the message names the file, line or value."""


# ---------------------------------------------------------------- annotations

@dataclass
class CaptionReport:
    """What cleaning did to the captions, counted so the summary can say it."""
    kept: int = 0
    dropped: dict = field(default_factory=dict)  # reason -> count
    recovered_lines: list = field(default_factory=list)  # Kaggle rows repaired, by line number
    non_ascii: int = 0

    def drop(self, reason: str, n: int = 1) -> None:
        if n:
            self.dropped[reason] = self.dropped.get(reason, 0) + n


def _read_csv(path: Path) -> pd.DataFrame:
    # keep_default_na=False: a caption "NA" or "null" is text, not a missing value.
    df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    df.columns = [c.strip() for c in df.columns]
    missing = {"image", "caption"} - set(df.columns)
    if missing:
        raise DataError(f"{path}: missing column(s) {sorted(missing)}; found {list(df.columns)}")
    cols = ["image", "caption"] + (["split"] if "split" in df.columns else [])
    return df[cols]


_KAGGLE_ROW = re.compile(r"^(?P<image>[^|]+?)\s*\|\s*(?P<num>\d+)\s*(?:\|\s?|\s+)(?P<caption>.*)$")


def _read_kaggle(path: Path) -> tuple[pd.DataFrame, list[int]]:
    """Kaggle's results.csv: ``image_name| comment_number| comment``, pipe-separated.

    The public file has a row whose second pipe is missing
    (``2199200615.jpg| 4   A dog runs across the grass .``); the regex accepts
    whitespace in its place, and the line number is reported as recovered.
    """
    rows, recovered = [], []
    with open(path, encoding="utf-8") as fh:
        header = fh.readline()
        if "|" not in header:
            raise DataError(f"{path}: not a Kaggle results.csv (no '|' in the header {header.strip()!r})")
        for lineno, line in enumerate(fh, start=2):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            m = _KAGGLE_ROW.match(line)
            if m is None:
                raise DataError(f"{path}:{lineno}: cannot parse Kaggle row {line!r}")
            if line.count("|") < 2:
                recovered.append(lineno)
            rows.append((m["image"].strip(), m["caption"]))
    return pd.DataFrame(rows, columns=["image", "caption"]), recovered


def _read_karpathy(path: Path) -> pd.DataFrame:
    with open(path, encoding="utf-8") as fh:
        doc = json.load(fh)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise DataError(f"{path}: not a Karpathy dataset JSON (expected {{'images': [...]}})")
    rows = []
    for i, entry in enumerate(doc["images"]):
        try:
            name, split = entry["filename"], entry.get("split")
            sentences = entry["sentences"]
        except (KeyError, TypeError) as exc:
            raise DataError(f"{path}: images[{i}] lacks {exc}") from None
        split = "train" if split == "restval" else split  # Karpathy's 'restval' is extra training data
        for s in sentences:
            raw = s.get("raw") if isinstance(s, dict) else s
            rows.append((name, raw, split))
    return pd.DataFrame(rows, columns=["image", "caption", "split"])


def _read_hf(path: Path) -> pd.DataFrame:
    """The ``flickr_annotations_30k.csv`` form: one row per image, ``raw`` a JSON list of captions."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    rows = []
    for lineno, (name, raw, split) in enumerate(zip(df["filename"], df["raw"], df["split"]), start=2):
        try:
            captions = json.loads(raw)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{lineno}: 'raw' is not a JSON list of captions: {raw[:60]!r}") from None
        if not isinstance(captions, list):
            raise DataError(f"{path}:{lineno}: 'raw' is not a JSON list of captions: {raw[:60]!r}")
        rows.extend((name, c, split) for c in captions)
    return pd.DataFrame(rows, columns=["image", "caption", "split"])


def detect_format(path: str | os.PathLike) -> str:
    path = Path(path)
    with open(path, encoding="utf-8", errors="replace") as fh:
        head = fh.read(4096)
    stripped = head.lstrip()
    if stripped.startswith("{"):
        return "karpathy"
    first = stripped.splitlines()[0] if stripped else ""
    if "|" in first:
        return "kaggle"
    columns = {c.strip().strip('"') for c in first.split(",")}
    if {"raw", "filename"} <= columns:
        return "hf"
    if {"image", "caption"} <= columns:
        return "csv"
    raise DataError(
        f"{path}: unknown annotation format; found columns {sorted(columns) or first[:80]!r}; "
        "accepted: csv (image,caption[,split]), kaggle (image_name| comment_number| comment), "
        "karpathy (dataset_flickr30k.json), hf (raw,sentids,split,filename,img_id)")


def read_annotations(path: str | os.PathLike, fmt: str = "auto") -> tuple[pd.DataFrame, CaptionReport]:
    """Read any supported format into ``image, caption, split`` rows, cleaned.

    ``split`` is None where the file gives none. Captions are cleaned by
    :func:`clean_captions`; the report counts what was dropped or repaired.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotations file not found: {path}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; accepted: auto, {', '.join(FORMATS)}")
    recovered: list[int] = []
    if fmt == "csv":
        df = _read_csv(path)
    elif fmt == "kaggle":
        df, recovered = _read_kaggle(path)
    elif fmt == "karpathy":
        df = _read_karpathy(path)
    else:
        df = _read_hf(path)
    if "split" not in df.columns:
        df["split"] = None
    df, report = clean_captions(df)
    report.recovered_lines = recovered
    check_image_names(df["image"])
    return df, report


def clean_captions(df: pd.DataFrame) -> tuple[pd.DataFrame, CaptionReport]:
    """The one documented policy for captions that fight back.

    - missing (NaN/None) or not a string: dropped, counted as ``missing`` / ``not_text``;
    - empty or whitespace-only: dropped, counted as ``empty``;
    - surrounding whitespace stripped and inner runs of whitespace collapsed to one space;
    - a repeated (image, caption) pair after that: later copies dropped, counted as ``duplicate``;
    - non-ASCII text is kept as is (open_clip's tokenizer normalises it with ftfy), and counted.
    Over-long captions are kept here; extraction truncates them exactly as open_clip does and counts them.
    """
    report = CaptionReport()
    df = df.copy()
    df["image"] = df["image"].astype(str).str.strip()
    caption = df["caption"]
    missing = caption.isna()
    not_text = ~missing & ~caption.map(lambda c: isinstance(c, str))
    report.drop("missing", int(missing.sum()))
    report.drop("not_text", int(not_text.sum()))
    df = df[~missing & ~not_text]
    df["caption"] = df["caption"].map(lambda c: " ".join(c.split()))
    empty = df["caption"] == ""
    report.drop("empty", int(empty.sum()))
    df = df[~empty]
    dup = df.duplicated(subset=["image", "caption"], keep="first")
    report.drop("duplicate", int(dup.sum()))
    df = df[~dup].reset_index(drop=True)
    if df.empty:
        raise DataError("no usable captions left after cleaning: " + _fmt_counts(report.dropped))
    report.non_ascii = int(sum(not c.isascii() for c in df["caption"]))
    report.kept = len(df)
    return df, report


def _fmt_counts(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def check_image_names(names) -> None:
    """Refuse names that would leave the image root (absolute paths, ``..``), before any work."""
    for name in pd.unique(pd.Series(list(names), dtype=object)):
        p = PurePosixPath(str(name).replace("\\", "/"))
        if not str(name) or p.is_absolute() or ".." in p.parts or re.match(r"^[A-Za-z]:", str(name)):
            raise DataError(f"image name {name!r} leaves the image root; names must be relative paths inside it")


def annotations_sha256(df: pd.DataFrame) -> str:
    """Hash of the cleaned (image, caption) rows, in order: what the cache's rows are made from."""
    h = hashlib.sha256()
    for image, caption in zip(df["image"], df["caption"]):
        h.update(image.encode() + b"\0" + caption.encode() + b"\n")
    return h.hexdigest()


# ---------------------------------------------------------------- splits

def assign_splits(df: pd.DataFrame, val: float = 0.1, test: float = 0.1, seed: int = 42) -> pd.DataFrame:
    """Give every image one split; keep the input's split column when it is complete.

    Splits are drawn by image, never by caption, so no image's captions straddle
    train and test. An image listed under two splits is refused.
    """
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise DataError(f"split fractions val={val}, test={test} must be >= 0 and sum to less than 1")
    df = df.copy()
    given = df["split"].notna() & (df["split"].astype(str).str.strip() != "")
    if given.all():
        df["split"] = df["split"].astype(str).str.strip()
        bad = sorted(set(df["split"]) - set(SPLITS))
        if bad:
            raise DataError(f"unknown split value(s) {bad}; expected {list(SPLITS)}")
        per_image = df.groupby("image")["split"].nunique()
        clash = per_image[per_image > 1]
        if len(clash):
            raise DataError(f"image {clash.index[0]!r} appears in more than one split "
                            f"({sorted(set(df.loc[df['image'] == clash.index[0], 'split']))}); "
                            f"{len(clash)} image(s) affected")
        return df
    if given.any():
        raise DataError(f"the split column is filled for {int(given.sum())} of {len(df)} rows; "
                        "fill it for all rows or for none")
    images = np.array(sorted(df["image"].unique()))
    order = np.random.default_rng(seed).permutation(len(images))
    n_test, n_val = int(round(test * len(images))), int(round(val * len(images)))
    split_of = {}
    for rank, i in enumerate(order):
        split_of[images[i]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    df["split"] = df["image"].map(split_of)
    return df


def split_counts(df: pd.DataFrame) -> pd.DataFrame:
    """Images and captions per split, for printing."""
    g = df.groupby("split")
    out = pd.DataFrame({"images": g["image"].nunique(), "captions": g.size()})
    return out.reindex([s for s in SPLITS if s in out.index])


def apply_splits(image_names, override: pd.DataFrame) -> np.ndarray:
    """Splits for the cached images, taken from other annotations by image name."""
    split_of = override.drop_duplicates("image").set_index("image")["split"]
    names = pd.Series(list(image_names), dtype=object)
    splits = names.map(split_of)
    if splits.isna().any():
        missing = names[splits.isna()]
        raise DataError(f"{len(missing)} cached image(s) have no split in the given annotations "
                        f"(first: {missing.iloc[0]!r})")
    return splits.to_numpy(dtype=object)


# ---------------------------------------------------------------- images

class ImageLoadError(Exception):
    """An image that cannot be used; ``reason`` is one short word for the summary."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _present(path: str | os.PathLike) -> Path:
    """``path``, if it names a file with something in it; else ImageLoadError 'missing' or 'empty'."""
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError("missing", f"{path} does not exist")
    if path.stat().st_size == 0:
        raise ImageLoadError("empty", f"{path} has zero bytes")
    return path


def read_image_bytes(path: str | os.PathLike) -> bytes:
    """The file's bytes, with load_image's reasons for a file that is missing or empty."""
    path = _present(path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageLoadError("unreadable", f"{path}: {exc.strerror or exc}") from None


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image fully and return it as RGB, or raise ImageLoadError.

    PIL opens lazily, so a truncated file fails only on ``load()``: it is forced
    here, inside the guard. Mode policy (docs/data-formats.md): EXIF orientation applied;
    transparency composited on white; 16-bit and float greyscale rescaled to 8 bits;
    CMYK, palette and greyscale converted by PIL. An ordinary RGB file goes through
    untouched, so open_clip's own preprocessing sees the same pixels.
    """
    path = _present(path)
    return decode_image(path, str(path))


def decode_image(source, label: str) -> Image.Image:
    """Decode a path or a binary file object into RGB, with load_image's reasons for failure."""
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x its pixel limit; treat both as too large.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                im.load()
                return to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError("too_large", f"{label}: {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageLoadError("not_an_image", f"{label} is not an image PIL can read") from None
    except (OSError, SyntaxError, ValueError) as exc:
        # The header parsed but the pixels did not: a cut-off download or a damaged file.
        reason = "truncated" if "truncat" in str(exc).lower() else "corrupt"
        raise ImageLoadError(reason, f"{label}: {exc}") from None


@dataclass(frozen=True)
class FolderImages:
    """Images as files under a root folder (the Flickr30k layout); names are relative paths."""
    root: Path

    def open(self, name: str) -> Image.Image:
        return load_image(self.root / name)

    def read(self, name: str) -> tuple[bytes, str]:
        """(the file's bytes, the label its failures name), for decoding elsewhere (decode_image)."""
        return read_image_bytes(self.root / name), str(self.root / name)


def to_rgb(im: Image.Image) -> Image.Image:
    im = ImageOps.exif_transpose(im)
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        return Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def write_csv_atomic(df: pd.DataFrame, path: str | os.PathLike) -> None:
    with replacing(path) as tmp:
        df[["image", "caption", "split"]].to_csv(tmp, index=False)
