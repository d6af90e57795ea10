"""img2dataset / webdataset input: tar shards read in place, or the same members as plain files.

A sample is the set of members that share a key, by webdataset's rule: the member path up to
the first dot of its file name. ``KEY.jpg`` (or png, webp, ...) is the image, ``KEY.txt`` the
caption, ``KEY.json`` metadata (a ``split`` there is used when every sample has one).
Images are read straight out of the tar by byte offset, never unpacked to disk, so rows can be
fetched in any order (fixed batches, resume, several processes) as with files. The cache names
an image ``SHARD/KEY.EXT``: unique across shards and traceable to its member.

We index tars with the standard library's ``tarfile`` rather than the ``webdataset`` package:
webdataset streams samples in order, which cannot give the fixed, resumable rows the cache needs.
Patterns are brace-expanded with ``braceexpand``, the package webdataset itself uses.
"""
from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pandas as pd
from braceexpand import braceexpand
from PIL import Image

from . import data
from .atomic import replacing

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext


class ShardError(data.DataError):
    """A pattern that matches nothing, or a shard that breaks the sample rules; names the shard."""


@dataclass(frozen=True)
class Member:
    tar: str      # path of the tar file
    offset: int   # where the member's bytes start
    size: int     # how many bytes it has


@dataclass(frozen=True)
class TarImages:
    """Images as members of tar shards, by cache name; opens each by seeking to its bytes."""
    members: dict

    def open(self, name: str) -> Image.Image:
        return data.decode_image(io.BytesIO(self.read(name)[0]), name)

    def read(self, name: str) -> tuple[bytes, str]:
        """(the member's bytes, the label its failures name)."""
        m = self.members.get(name)
        if m is None:
            raise data.ImageLoadError("missing", f"{name} has no image member")
        if m.size == 0:
            raise data.ImageLoadError("empty", f"{name} has zero bytes")
        with open(m.tar, "rb") as fh:
            fh.seek(m.offset)
            raw = fh.read(m.size)
        if len(raw) < m.size:
            raise data.ImageLoadError("truncated", f"{name}: the shard ends {m.size - len(raw)} bytes into it")
        return raw, name


@dataclass
class ShardReport:
    """What reading the shards met, for the extract summary."""
    notes: list = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # reason -> members or samples left out


def expand(pattern: str) -> list[Path]:
    """A brace pattern and/or glob of tar files, or one folder in img2dataset's 'files' layout."""
    if Path(pattern).is_dir():
        return [Path(pattern)]
    paths = sorted({p for part in braceexpand(pattern) for p in (glob.glob(part) or [part])})
    missing = [p for p in paths if not Path(p).is_file()]
    if missing or not paths:
        raise ShardError(f"--shards {pattern!r}: no such shard {missing[0] if missing else pattern!r}; "
                         "expected tar files ('data/{00000..00009}.tar', 'data/*.tar') or a folder of them")
    return [Path(p) for p in paths]


def _unsafe(name: str) -> bool:
    p = PurePosixPath(name)
    return p.is_absolute() or ".." in p.parts or name.startswith(("/", "\\"))


def _tar_members(path: Path, report: ShardReport):
    """(name, offset, size, complete) of each regular member; a cut-off tar ends the listing with a note."""
    size = path.stat().st_size
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if m.isfile():
                    yield m.name, m.offset_data, m.size, m.offset_data + m.size <= size
    except (tarfile.ReadError, EOFError) as exc:
        report.notes.append(f"{path.name}: the tar is damaged or cut off ({exc}); members after that point are "
                            "missing")


def _folder_members(root: Path):
    for p in sorted(root.rglob("*")):
        if p.is_file():
            yield p.relative_to(root).as_posix(), 0, p.stat().st_size, True


def _samples(source: Path, members, report: ShardReport) -> dict:
    """key -> {ext: (offset, size, complete)}; unsafe names skipped, a repeated member refused."""
    samples: dict = {}
    for name, offset, size, complete in members:
        if _unsafe(name):
            report.skipped["unsafe member name"] += 1
            continue
        m = _KEY_EXT.match(name)
        if m is None:
            report.skipped["member without an extension"] += 1
            continue
        key, ext = m.group(1), m.group(2).lower()
        if ext in samples.setdefault(key, {}):
            raise ShardError(f"{source}: key {key!r} has two {ext!r} members; keys must be unique within a shard")
        samples[key][ext] = (offset, size, complete)
    return samples


def _member_bytes(fh, root: Path, key: str, ext: str, part) -> bytes | None:
    """A small member's bytes (caption, metadata): by offset from the shard open as ``fh``, or from its
    own file in the 'files' layout (``fh`` None). None when it is absent or cut off."""
    if part is None or not part[2]:
        return None
    if fh is None:
        return (root / f"{key}.{ext}").read_bytes()
    fh.seek(part[0])
    return fh.read(part[1])


def _split_of(meta: bytes | None) -> str | None:
    try:
        value = json.loads(meta) if meta else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    split = value.get("split") if isinstance(value, dict) else None
    return split if split in data.SPLITS else None


def read_shards(pattern: str) -> tuple[pd.DataFrame, data.CaptionReport, ShardReport, object]:
    """Rows ``image, caption, split`` (one per sample), the caption report, the shard report, and the
    image source (TarImages, or FolderImages for the 'files' layout)."""
    rows, tar_images, report = [], {}, ShardReport()
    sources = expand(pattern)
    folder = len(sources) == 1 and sources[0].is_dir()
    for source in sources:
        samples = _samples(source, _folder_members(source) if folder else _tar_members(source, report), report)
        with nullcontext() if folder else open(source, "rb") as fh:  # one handle a shard for all its captions
            for key, parts in samples.items():
                image_ext = next((e for e in IMAGE_EXTS if e in parts), None)
                name = f"{key}.{image_ext or 'jpg'}" if folder else f"{source.name}/{key}.{image_ext or 'jpg'}"
                if "txt" not in parts:  # keys with neither (img2dataset's .parquet, _stats.json) are no samples
                    if image_ext:
                        report.skipped["image without a caption (no .txt)"] += 1
                    continue
                caption = _member_bytes(fh, source, key, "txt", parts["txt"])
                if caption is None:
                    report.skipped["caption member cut off"] += 1
                    continue
                if image_ext and not folder:
                    offset, size, _ = parts[image_ext]
                    tar_images[name] = Member(str(source.resolve()), offset, size)
                meta = _member_bytes(fh, source, key, "json", parts.get("json"))
                rows.append((name, caption.decode("utf-8", errors="replace"), _split_of(meta)))
    if not rows:
        raise ShardError(f"--shards {pattern!r}: no sample with a caption (.txt) in {len(sources)} shard(s)")
    df = pd.DataFrame(rows, columns=["image", "caption", "split"])
    if df["split"].notna().any() and df["split"].isna().any():
        df["split"] = None  # some samples name a split, some do not: draw them all (seeded) instead
        report.notes.append("only some samples give a split in their .json; assigning a seeded split to all")
    df, captions = data.clean_captions(df)
    data.check_image_names(df["image"])
    across = Counter(n.split("/", 1)[1] for n in df["image"].unique() if "/" in n) if not folder else Counter()
    if any(v > 1 for v in across.values()):
        report.notes.append(f"{sum(v > 1 for v in across.values())} key(s) appear in more than one shard; "
                            "each is kept as its own image (SHARD/KEY)")
    source = data.FolderImages(sources[0]) if folder else TarImages(tar_images)
    return df, captions, report, source


def write_shards(df: pd.DataFrame, images: Path, folder: Path, per_shard: int = 1000) -> list[Path]:
    """Write a Flickr-layout collection as img2dataset tar shards: ``KEY.jpg``, ``KEY.txt``, ``KEY.json``
    per image (its first caption; the json keeps the image name and split). Keys are the image's
    position, nine digits, as img2dataset numbers them."""
    folder.mkdir(parents=True, exist_ok=True)
    first = df.drop_duplicates("image").reset_index(drop=True)
    paths = []
    for start in range(0, len(first), per_shard):
        path = folder / f"{start // per_shard:05d}.tar"
        with replacing(path) as tmp, tarfile.open(tmp, "w") as tar:
            for i, r in first.iloc[start:start + per_shard].iterrows():
                meta = {"key": f"{i:09d}", "source": r["image"], **({"split": r["split"]} if "split" in r else {})}
                for ext, payload in (("jpg", (Path(images) / r["image"]).read_bytes()),
                                     ("txt", str(r["caption"]).encode()), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(path)
    return paths


def describe(pattern: str) -> str:
    """What the cache records as its image root for a shard pattern."""
    return f"shards:{os.path.abspath(pattern) if Path(pattern).is_dir() else pattern}"
