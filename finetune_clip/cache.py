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
import re
import resource
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from .atomic import replacing

PENDING, DONE, FAILED = 0, 1, 2
# HDF5's own per-chunk checksum on every numeric dataset: a flipped byte fails the read
# instead of silently changing the numbers. (Strings live in HDF5's global heap, which
# filters do not cover; a damaged heap fails to decode instead.)
CHECKED = dict(fletcher32=True)
# Attributes that change the cache's contents: a resume or a reader that expects
# other values is refused, naming the attribute.
IDENTITY = ("model", "model_config", "pretrained", "precision", "annotations_sha256", "seed", "image_decode")
IDENTITY_DEFAULTS = {"image_decode": "pil"}  # what caches made before the attribute existed used
_STR = h5py.string_dtype("utf-8")


class CacheError(ValueError):
    """A cache that is missing, incomplete, busy or made with other settings."""


class CacheWriteError(CacheError):
    """A write to the cache did not reach the disk (disk full, file size limit, I/O error).

    The file is let go as its last successful write left it: unsealed, and no row marked done
    whose features are not on disk, so the same extract command resumes it once the cause is gone.
    ``full`` says whether the disk (or a size limit) was the cause.
    """

    def __init__(self, message: str, full: bool = False):
        super().__init__(message)
        self.full = full


# What a failed write's errno means to a user.
_FULL = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
         errno.EFBIG: "the file size limit was reached"}


def _errno_of(exc: BaseException) -> int | None:
    """HDF5 reports a failed write as text ('... errno = 28, error message = ...'), not as OSError.errno."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    found = re.search(r"errno = (\d+)", str(exc))
    return int(found.group(1)) if found else None


def abandon(f: h5py.File, *handles) -> None:
    """Close an HDF5 file whose writes failed, writing nothing more to it.

    HDF5 keeps what it could not write as dirty and retries it at close, and again at exit,
    where a second failure crashes the process (a segmentation fault). Pointing the file's
    descriptor at an in-memory file first lets HDF5 close cleanly; the file on disk stays
    exactly as its last successful write left it. A soft file-size limit (RLIMIT_FSIZE) would
    stop the in-memory file too, so it is lifted to the hard limit for the close.
    """
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    if limit[0] != limit[1]:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit[1], limit[1]))
    try:
        _let_go(f, handles)
    finally:
        if limit[0] != limit[1]:
            resource.setrlimit(resource.RLIMIT_FSIZE, limit)


def _let_go(f: h5py.File, handles) -> None:
    try:
        fd = f.id.get_vfd_handle()
        sink = os.memfd_create("abandoned-hdf5") if hasattr(os, "memfd_create") else os.open(os.devnull, os.O_RDWR)
        os.dup2(sink, fd)
        os.close(sink)
    except Exception:  # noqa: BLE001 - not a plain POSIX file: close as well as HDF5 can
        pass
    for h in handles:  # the caller's open datasets go first, while the file is still open
        try:
            h.id.close()
        except Exception:  # noqa: BLE001
            pass
    try:
        f.close()
    except Exception:  # noqa: BLE001 - its errors are about the sink, not the file on disk
        pass


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e5 else f"{n / 1e3:,.1f} kB"


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Bytes free to this user on the filesystem holding ``folder``, or None where it cannot be measured."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def allocated_bytes(path: str | os.PathLike) -> int:
    """Bytes a file holds on disk now (0 when it does not exist)."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def estimate_bytes(image_names, image_splits, captions, heads: dict) -> int:
    """The finished cache's size: feature rows x widths x 4 bytes, plus statuses, names, captions and heads.

    HDF5 keeps each variable-length string in a global heap (a 16-byte object header, data
    rounded up to 8 bytes) and a 16-byte reference in the dataset.
    """
    d_img, d_txt = heads["visual_proj"].shape[0], heads["text_projection"].shape[0]
    n_img, n_cap = len(image_names), len(captions)
    strings = sum(32 + -(-len(str(s).encode()) // 8) * 8 for column in (image_names, image_splits, captions)
                  for s in column) + 32 * n_img  # + the (mostly empty) failure reasons
    numbers = 4 * (n_img * d_img + n_cap * d_txt) + 2 * (n_img + n_cap) + 8 * n_cap
    head_bytes = 4 * (heads["visual_proj"].size + heads["text_projection"].size + 1)
    return int(1.02 * (strings + numbers + head_bytes)) + (64 << 10)  # chunk checksums, indexes, the header


@contextmanager
def locked(path: str | os.PathLike):
    """Hold an exclusive lock beside the cache while writing it.

    flock is released by the kernel when the process dies, so a SIGKILLed run
    never leaves a stale lock behind.
    """
    lock_path = Path(str(path) + ".lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:  # a read-only filesystem, a file where a folder should be, no permission
        blocker = next((p for p in lock_path.parents if p.exists()), None)
        why = (f"{blocker} is a file, not a folder" if blocker is not None and not blocker.is_dir()
               else f"{exc.strerror or exc} ({exc.filename or lock_path})")
        raise CacheError(f"cannot write the cache at {path}: {why}; choose another --cache") from None
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
           heads: dict, attrs: dict, chunk_rows: int = 256, expected_bytes: int | None = None) -> None:
    """Write an empty cache (all rows pending) to a temp file and move it into place.

    The file is built in memory (HDF5's core driver) and written with one plain write. Then every
    feature chunk is written once with NaN, so the disk space the features need is taken before
    any trunk runs: a disk that fills later cannot stop a feature write, and later writes change
    data in place, never the file's structure. A write that fails here leaves no file behind
    (CacheWriteError); nothing has been extracted yet.
    """
    n_img, n_cap = len(image_names), len(captions)
    img_dim, txt_dim = heads["visual_proj"].shape[0], heads["text_projection"].shape[0]
    with h5py.File(f"{path}.in-memory", "w", driver="core", backing_store=False) as f:
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
        f.flush()
        image = f.id.get_file_image()
    expected = expected_bytes or estimate_bytes(image_names, image_splits, captions, heads)
    with replacing(path) as tmp:
        try:
            with open(tmp, "wb") as out:
                out.write(image)
        except OSError as exc:
            if exc.errno not in _FULL:
                raise
            raise CacheWriteError(_write_failure(Path(path), "the new cache", exc, expected), full=True) from None
        del image
        w = Writer(tmp, expected)
        w.path = Path(path)  # what its messages name
        with w._writing("the new cache's feature space"):
            for features in (w.img_features, w.txt_features):
                for s in range(0, features.shape[0], features.chunks[0]):
                    e = min(features.shape[0], s + features.chunks[0])
                    features[s:e] = np.full((e - s, features.shape[1]), np.nan, np.float32)
                    w.f.flush()  # one chunk at a time: flat memory
        w.close()


def _write_failure(path: Path, what: str, exc: BaseException, expected: int) -> str:
    """One line: what failed, the space needed against the space free, and that the same command resumes."""
    code = _errno_of(exc)
    free = free_bytes(path.parent)
    need = max(0, expected - allocated_bytes(path)) if expected else None
    space = ""
    if need is not None and free is not None:
        space = f"; the finished cache needs about {mb(need)} more and {mb(free)} are free there"
    if code in _FULL:
        cause = f"{_FULL[code]} ({os.strerror(code)})"
    else:
        cause = f"the write failed ({str(exc).splitlines()[0][:120]})"
    remedy = "raise the limit (ulimit -f)" if code == errno.EFBIG else "free space"
    kept = ("nothing was extracted yet" if what.startswith("the new cache") else
            "no row is marked done that is not on disk")
    return (f"cache {path}: {cause} while writing {what}; {kept}{space}; "
            f"{remedy} and run the same command again to resume")


def mismatch(stored: dict, wanted: dict) -> list[str]:
    """The identity attributes in which ``stored`` differs from ``wanted``, each as 'name=stored (wanted ...)'.

    Weights from a local file are the same weights wherever the file lies now: where both sides recorded the file's
    sha256, that is compared instead of its path.
    """
    def value(attrs: dict, k: str) -> str:
        if k == "pretrained" and str(attrs.get(k, "")).startswith("file:") and attrs.get("pretrained_sha256"):
            return f"sha256 {attrs['pretrained_sha256']}"
        return str(attrs.get(k, IDENTITY_DEFAULTS.get(k)))
    return [f"{k}={stored.get(k, IDENTITY_DEFAULTS.get(k))!r} (wanted {wanted[k]!r})"
            for k in IDENTITY if k in wanted and value(stored, k) != value(wanted, k)]


class Writer:
    """Fills a created cache. Features reach the disk before the status that marks their rows done.

    Every write is flushed twice: features (and failure reasons) first, then the status. A run
    killed, or a disk that fills, between the two leaves the rows pending, never done and empty.
    A failed write lets the file go (``abandon``) and raises CacheWriteError; the file is then
    as its last successful flush left it, and the same extract resumes it.
    """

    def __init__(self, path: str | os.PathLike, expected_bytes: int = 0):
        self.path = Path(path)
        self.expected_bytes = expected_bytes  # the finished size, for the message when the disk fills
        self.f = h5py.File(self.path, "r+")
        # One handle per dataset for the writer's whole life. HDF5 writes a dataset's cached chunks
        # when its last handle closes, and h5py swallows an error there ("Exception ignored"): with
        # handles made per call, features could silently miss the disk while their status reached it.
        # Held open, chunks reach the disk in flush(), whose errors are raised.
        img, txt = self.f["images"], self.f["texts"]
        self.img_features, self.img_status, self.img_error = img["features"], img["status"], img["error"]
        self.txt_features, self.txt_status = txt["features"], txt["status"]
        self.broken = False

    def close(self) -> None:
        if not self.broken:
            self.f.close()

    @contextmanager
    def _writing(self, what: str):
        if self.broken:
            raise CacheError(f"cache {self.path} was let go after a failed write; run extract again")
        try:
            yield
        except (OSError, RuntimeError) as exc:
            if "DataLoader worker" in str(exc):  # torch's signal handler raised here; the file is fine
                raise
            self.broken = True
            abandon(self.f, self.img_features, self.img_status, self.img_error, self.txt_features, self.txt_status)
            raise CacheWriteError(_write_failure(self.path, what, exc, self.expected_bytes),
                                  full=_errno_of(exc) in _FULL) from None

    def image_status(self) -> np.ndarray:
        return self.img_status[:]

    def text_status(self) -> np.ndarray:
        return self.txt_status[:]

    def write_images(self, start: int, feats: np.ndarray, ok: np.ndarray, errors: list[str]) -> None:
        """Rows ``start..start+len(ok)``: features where ``ok``, failure reasons elsewhere."""
        stop = start + len(ok)
        block = np.full((len(ok), self.img_features.shape[1]), np.nan, np.float32)
        block[ok] = feats
        with self._writing(f"image rows {start}-{stop - 1}"):
            self.img_features[start:stop] = block
            for i in np.flatnonzero(~ok):  # strings take new heap space: written only for (rare) failures
                self.img_error[start + i] = errors[i]
            self.f.flush()
            self.img_status[start:stop] = np.where(ok, DONE, FAILED).astype(np.uint8)
            self.f.flush()

    def write_texts(self, start: int, feats: np.ndarray) -> None:
        stop = start + len(feats)
        with self._writing(f"caption rows {start}-{stop - 1}"):
            self.txt_features[start:stop] = feats
            self.f.flush()
            self.txt_status[start:stop] = DONE
            self.f.flush()

    def repair(self) -> str:
        """Make the status tell the truth before a resume; returns a note ('' when all was sound).

        A row stays done only if its features are on disk and finite. Rows marked done that hold
        NaN (never written: a write that failed, a cache from before this check), rows in chunks that
        fail their checksum (rewritten whole as NaN), and all rows when the status itself is unreadable
        (re-derived from the features) go back to pending, and the resume extracts them again.
        """
        notes = []
        with self._writing("the repaired status"):
            for kind, features, status in (("image", self.img_features, self.img_status),
                                           ("caption", self.txt_features, self.txt_status)):
                try:
                    old = status[:]
                except (OSError, RuntimeError):
                    old = None
                    notes.append(f"the {kind} status was unreadable and was rebuilt from the features")
                new, unreadable = _sound_status(features, old)
                if unreadable:
                    notes.append(f"{unreadable} {kind} rows were in damaged chunks")
                if old is None or (new != old).any():
                    redo = int((new == PENDING).sum() - (0 if old is None else (old == PENDING).sum()))
                    if redo and old is not None:
                        notes.append(f"{redo} {kind} rows marked done held no features")
                    status[:] = new
            if notes:
                self.f.attrs["complete"] = False
                self.f.attrs["fingerprint"] = ""
                self.f.flush()
        return ("; ".join(notes) + "; extracting them again") if notes else ""

    def finish(self) -> str:
        """Seal the cache: fingerprint its contents, then set ``complete`` last (load() checks every done row)."""
        if (self.img_status[:] == PENDING).any() or (self.txt_status[:] != DONE).any():
            raise CacheError(f"cache {self.path} still has pending rows; it cannot be finished")
        fp = fingerprint(self.f)
        with self._writing("the seal"):
            self.f.attrs["fingerprint"] = fp
            self.f.flush()
            self.f.attrs["complete"] = True
            self.f.flush()
        return fp


def salvage(path: str | os.PathLike, expected_bytes: int = 0) -> str:
    """Rebuild a cache whose HDF5 structure a failed write left inconsistent; returns a note.

    HDF5 writes a flush in pieces, so a disk that fills during one can leave its index pointing
    past the file's recorded end, and HDF5 then refuses later writes. Every row that reads back
    sound (status done, chunk checksum good, features finite) is copied, chunk by chunk, into a
    fresh file that then replaces the old one; every other row is pending. Raises OSError when
    even the names, captions or heads cannot be read (the caller starts afresh).
    """
    path = Path(path)
    fresh = path.with_name(path.name + ".salvage")
    kept = {}
    with h5py.File(path, "r") as old:
        attrs = {k: v for k, v in _attrs(old).items() if k not in ("complete", "fingerprint")}
        create(fresh, image_names=old["images/name"].asstr()[:], image_splits=old["images/split"].asstr()[:],
               captions=old["texts/caption"].asstr()[:], caption_image_index=old["texts/image_index"][:],
               heads={k: old["heads"][k][()] for k in ("visual_proj", "text_projection", "logit_scale")},
               attrs={k: v for k, v in attrs.items() if k != "created"},
               chunk_rows=old["images/features"].chunks[0], expected_bytes=expected_bytes)
        w = Writer(fresh, expected_bytes)
        try:
            with w._writing("the salvaged rows"):
                w.f.attrs["created"] = attrs.get("created", "")
                for kind, group, target, target_status in (("image", "images", w.img_features, w.img_status),
                                                           ("caption", "texts", w.txt_features, w.txt_status)):
                    features = old[f"{group}/features"]
                    try:
                        status = old[f"{group}/status"][:]
                    except (OSError, RuntimeError):
                        status = np.zeros(features.shape[0], np.uint8)
                    new = np.full_like(status, PENDING)
                    for s, e, block in _chunks(features):
                        if block is None:
                            continue
                        done = (status[s:e] == DONE) & np.isfinite(block).all(axis=1)
                        if done.any():
                            target[s:e] = np.where(done[:, None], block, np.nan)
                        new[s:e][done] = DONE
                    if kind == "image":  # failure reasons too: a failed image is not tried again
                        try:
                            errors = old["images/error"].asstr()[:].astype(object)
                        except (OSError, RuntimeError):
                            errors = None
                        if errors is not None:
                            failed = status == FAILED
                            w.img_error[:] = np.where(failed, errors, "").astype(object)
                            new[failed] = FAILED
                    w.f.flush()
                    target_status[:] = new
                    w.f.flush()
                    kept[kind] = int((new != PENDING).sum())
        except BaseException:
            fresh.unlink(missing_ok=True)
            raise
        finally:
            w.close()
    os.replace(fresh, path)
    return (f"{path} was left inconsistent by a failed write; kept the {kept['image']} image and {kept['caption']} "
            "caption rows that read back sound in a rebuilt file")


def _chunks(features: h5py.Dataset):
    """(start, stop, rows) chunk by chunk (flat memory); rows is None where the chunk fails its checksum."""
    step = features.chunks[0]
    for s in range(0, features.shape[0], step):
        e = min(features.shape[0], s + step)
        try:
            rows = features[s:e]
        except (OSError, RuntimeError):
            rows = None
        yield s, e, rows


def _sound_status(features: h5py.Dataset, status: np.ndarray | None) -> tuple[np.ndarray, int]:
    """The status a dataset's features support, read chunk by chunk (flat memory), and the rows unreadable.

    Done rows that are not all finite become pending. A chunk that fails its checksum is
    overwritten whole with NaN (a whole-chunk write reads nothing) and its rows become pending.
    Without a readable ``status``, rows with finite features are done and the rest pending.
    """
    new = np.full(features.shape[0], PENDING, np.uint8) if status is None else status.copy()
    unreadable = 0
    for s, e, rows in _chunks(features):
        if rows is None:
            features[s:e] = np.full((e - s, features.shape[1]), np.nan, np.float32)
            new[s:e] = PENDING
            unreadable += e - s
            continue
        finite = np.isfinite(rows).all(axis=1)
        if status is None:
            new[s:e] = np.where(finite, DONE, PENDING)
        else:
            new[s:e][(new[s:e] == DONE) & ~finite] = PENDING
    return new, unreadable


def fingerprint(f: h5py.File) -> str:
    """sha256 over the identity attributes and every stored array, read in slabs (flat memory)."""
    h = hashlib.sha256()
    for k in IDENTITY:
        if k in f.attrs or k not in IDENTITY_DEFAULTS:  # an attribute added later leaves older fingerprints alone
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


def _truncated(exc: BaseException) -> tuple[int, int] | None:
    """(file size, HDF5's recorded end) when HDF5 refused a file for being shorter than it recorded."""
    found = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", str(exc))
    return (int(found.group(1)), int(found.group(2))) if found else None


def read_attrs_to_resume(path: str | os.PathLike) -> tuple[dict, str]:
    """The attributes of a cache to resume, and a note when it had to be mended first.

    A flush that failed part-way (a full disk) can leave the file shorter than the end HDF5
    recorded, and HDF5 then refuses to open it. Extending it with zeros (sparse: no disk space)
    opens it again; every chunk in that tail fails its checksum, so repair() redoes its rows.
    Anything else unreadable raises OSError.
    """
    try:
        return read_attrs(path), ""
    except OSError as exc:
        cut = _truncated(exc)
        if cut is None or os.path.getsize(path) != cut[0] or cut[1] <= cut[0]:
            raise
        os.truncate(path, cut[1])
        return read_attrs(path), f"{path} was cut short by a failed write ({mb(cut[1] - cut[0])} missing); mended"


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
        if _truncated(exc):
            raise CacheError(f"cache {path} is not complete (a write to it failed part-way); run the same extract "
                             "command again to resume it") from None
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
        bad_img = int((cache.image_ok & ~np.isfinite(cache.image_features).all(axis=1)).sum())
        bad_txt = int((~np.isfinite(cache.text_features).all(axis=1)).sum())
        if bad_img or bad_txt:
            raise CacheError(f"cache {path} is damaged ({bad_img} image and {bad_txt} caption rows marked done hold "
                             "non-finite or never-written features); run the same extract command again to "
                             "re-extract them")
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
