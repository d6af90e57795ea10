"""Stage 1: run the frozen CLIP trunks once and stream pre-projection features to the cache.

The projection heads are taken out of the model (``visual.proj`` and
``text_projection`` set to None), so the model's own ``forward`` returns the
ln_post / ln_final features; the heads are stored beside them. Features times
heads equal open_clip's ``encode_image`` / ``encode_text`` (tests prove it).
"""
from __future__ import annotations

import dataclasses
import io
import os
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import autoprecision, backends, data, jpeg, shards
from . import cache as cache_mod
from . import model as model_mod
from .atomic import replacing

# What --precision takes: every concrete precision (backends.PRECISIONS, what a cache records), and two that are
# measured on the machine for the job: 'auto' (the fastest faithful path) and 'int8' (the fastest faithful int8).
CHOICES = ("fp32", "auto", "int8", *backends.INT8, "bf16", "fp16")


class ExtractError(RuntimeError):
    """Extraction cannot start or finish; the message says what to do."""


# ---------------------------------------------------------------- the run

@dataclass(frozen=True)
class ExtractSettings:
    annotations: Path | None      # the annotations file (unless shards)
    images: Path | None           # image root; annotation names are relative to it (unless shards)
    cache: Path
    shards: str | None = None     # instead of both: img2dataset tar shards (pattern) or its 'files' folder
    model: str = "ViT-B-32"
    pretrained: str = "openai"    # tag, FILE or 'none'
    precision: str = "fp32"       # one of CHOICES: fp32 (exact), auto and int8 (measured), a backend, bf16, fp16
    device: str = "cpu"
    # None: chosen from the device and the cores (see defaults_for)
    batch_size: int | None = None       # images per trunk call
    text_batch_size: int | None = None  # captions per trunk call (sorted by length inside a window)
    text_window: int | None = None      # captions sorted together and written as one slab (the resume unit)
    workers: int | None = None          # decoding and tokenizing processes (0: all in the main process)
    decode: str = "auto"                # JPEGs decoded by PIL in the workers ('cpu') or on the device ('device')
    threads: int = 0              # torch threads for the trunks (0: one per core)
    strict: bool = False          # any failed image makes the run fail (after the cache is written)
    seed: int = 0                 # random init seed for --pretrained none
    fmt: str = "auto"             # annotation format


@dataclass
class ExtractSummary:
    cache: Path
    model: str
    images_done: int = 0
    images_failed: dict = field(default_factory=dict)   # reason -> count
    failures: list = field(default_factory=list)        # (image name, error)
    captions: int = 0
    captions_truncated: int = 0
    captions_dropped: dict = field(default_factory=dict)
    captions_non_ascii: int = 0
    seconds: float = 0.0
    notes: list = field(default_factory=list)


CPU_DEFAULTS = dict(workers=1, batch_size=64, text_batch_size=64, text_window=2048)


def defaults_for(device: str, cores: int) -> dict:
    """Workers and batch sizes that keep ``device`` fed, given ``cores`` CPU cores for this process.

    On a CPU the trunks take the cores: one decoding worker keeps up, and small text batches keep
    padding low (docs/performance.md). A GPU's trunks want big batches and many decoders: every core but
    the one that drives the GPU decodes, text batches are 1,024 captions bucketed by length inside
    windows of 16,384, and images go 256 at a time.
    """
    if torch.device(device).type == "cuda":
        return dict(workers=max(1, min(cores - 1, 32)), batch_size=256, text_batch_size=1024, text_window=16384)
    return dict(CPU_DEFAULTS)


PREFETCH = 4  # batches each worker keeps ready


def resolve(settings: ExtractSettings, world: int = 1) -> ExtractSettings:
    """``settings`` with every option the user left out chosen for its device (cores shared among processes).

    Decoded batches wait in shared memory (/dev/shm) and RAM. Workers the user left out are cut to what
    fits (to none, where not even one fits: the main process decodes); workers the user gave that cannot
    fit with the batch size are refused with one line, before any work.
    """
    chosen = defaults_for(settings.device, max(1, _cores() // world))
    decode = settings.decode
    if decode == "auto":  # the device where it decodes JPEGs (a torchvision without nvJPEG does not): else PIL
        decode = "device" if torch.device(settings.device).type == "cuda" and \
            jpeg.decodes_on(settings.device) is None else "cpu"
    elif decode == "device" and (why := jpeg.decodes_on(settings.device)):
        raise ExtractError(f"--decode device: torchvision cannot decode JPEGs on {settings.device} here ({why}); "
                           "use --decode cpu")
    out = dataclasses.replace(settings, decode=decode, **{k: v for k, v in chosen.items()
                                                          if getattr(settings, k) is None})
    if not out.workers:
        return out
    per_worker = PREFETCH * out.batch_size * (3 * 224 * 224 * 4 if decode == "cpu" else 200 << 10)
    room, where = _room_for_batches()
    if room is None or out.workers * per_worker <= room:
        return out
    if settings.workers is None:  # as many as fit; none, and the main process decodes (no shared memory)
        return dataclasses.replace(out, workers=int(room // per_worker))
    raise ExtractError(f"{out.workers} worker(s) x {PREFETCH} batches of {out.batch_size} images keep about "
                       f"{cache_mod.mb(out.workers * per_worker)} of decoded images in flight, but {where} has "
                       f"{cache_mod.mb(room)} for them; use fewer --workers or a smaller --batch-size")


def _cores() -> int:
    """The cores this process may run on (a container's CPU set, not the machine's)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _room_for_batches() -> tuple:
    """(bytes the workers' batches may take, what limits it): the free /dev/shm, and half the free memory."""
    rooms = []
    try:
        rooms.append((os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2, "half the free memory"))
    except (ValueError, OSError):
        pass
    if os.path.isdir("/dev/shm"):
        try:
            rooms.append((shutil.disk_usage("/dev/shm").free, "/dev/shm (shared memory)"))
        except OSError:
            pass
    return min(rooms) if rooms else (None, "")


class _ImageRows(Dataset):
    """Decodes and preprocesses images by row, in worker processes. A failure is returned, not raised.

    With ``jpeg_bytes``, a plain JPEG is only read: its bytes go to the main process, which decodes the
    batch on the device (jpeg.py); every other image is decoded here as before.
    """

    def __init__(self, source, names, preprocess, jpeg_bytes: bool = False):
        self.source, self.names, self.preprocess, self.jpeg_bytes = source, list(names), preprocess, jpeg_bytes

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        try:
            if not self.jpeg_bytes:
                return i, self.preprocess(self.source.open(self.names[i])), "", ""
            raw, label = self.source.read(self.names[i])
            if jpeg.plain_jpeg(raw):
                return i, torch.frombuffer(bytearray(raw), dtype=torch.uint8), "", label
            return i, self.preprocess(data.decode_image(io.BytesIO(raw), label)), "", label
        except data.ImageLoadError as exc:
            return i, None, str(exc), ""


def _collate(items):
    """(rows, the ok rows' pixels stacked, or their items where some are JPEG bytes; ok mask, reasons, labels).

    Runs in the worker: a batch of pixels travels as one tensor, stacked there, not in the trunks' process.
    """
    ok_items = [it for _, it, _, _ in items if it is not None]
    if ok_items and not any(it.dtype == torch.uint8 for it in ok_items):
        ok_items = torch.stack(ok_items)
    return ([i for i, *_ in items], ok_items, np.array([it is not None for _, it, _, _ in items]),
            [err for _, _, err, _ in items], [label for _, it, _, label in items if it is not None])


def _first(items):
    return items[0]


def _worker_init(_):
    torch.set_num_threads(1)  # decoding workers must not compete with the trunk's threads


class _Output:
    """A rank's results on their way to the cache, through ``write(start, features, ...)``.

    In one process they are written on a background thread, one batch in flight, so that the next batch
    computes meanwhile; a write's error surfaces at the next ``put`` or when the block ends, in the caller's
    thread, and nothing after a failed write is written. Under torchrun they are gathered to rank 0, which
    writes everyone's. Either way the features leave the device in ``write`` (see _host).
    """

    def __init__(self, team: "Team", write):
        from concurrent.futures import ThreadPoolExecutor
        self.team, self.write, self.pending = team, write, None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="cache-writes") if team.world == 1 else None

    def put(self, item) -> None:
        if self.pool is None:
            item = item and (item[0], _host(item[1]), *item[2:])  # gather_object pickles: host arrays only
            for got in self.team.gather(item):
                if got is not None:
                    self.write(*got)
        elif item is not None:
            self._drain()
            self.pending = self.pool.submit(self.write, *item)

    def _drain(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if self.pool is None:
            return
        if kind is None:
            self._drain()  # the last write's error, raised here
        elif self.pending is not None:
            self.pending.cancel()
            self.pending.exception()  # let it finish; the error already under way is the one to report
        self.pool.shutdown(wait=True)


def batches(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + size)) for s in range(0, n, size)]


class Team:
    """One process, or the processes torchrun started: who computes what, and one writer.

    Every rank computes its share of the fixed batches; results travel to rank 0,
    the only process that opens the HDF5 file (HDF5 has no safe concurrent writers).
    Batches are the same row ranges as in a single process, so the cache is the same.
    """

    def __init__(self, device: str):
        import torch.distributed as dist
        self.dist = dist
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ExtractError("--device cuda was asked for, but torch sees no CUDA device")
        if self.world > 1:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def writer(self) -> bool:
        return self.rank == 0

    def share(self, obj):
        """rank 0's object, on every rank (an exception on rank 0 is re-raised everywhere)."""
        if self.world == 1:
            if isinstance(obj, Exception):
                raise obj
            return obj
        box = [obj if self.writer else None]
        self.dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], Exception):
            raise box[0]
        return box[0]

    def mine(self, todo: list) -> tuple[list, int]:
        """This rank's part of ``todo`` and how many lockstep rounds every rank runs."""
        return todo[self.rank::self.world], -(-len(todo) // self.world)

    def gather(self, item) -> list:
        """Items of all ranks for one round, on the writer (None where a rank had nothing)."""
        if self.world == 1:
            return [item]
        out = [None] * self.world if self.writer else None
        self.dist.gather_object(item, out, dst=0)
        return out or []

    def barrier(self) -> None:
        if self.world > 1:
            self.dist.barrier()


def _loader(ds, sampler, settings: ExtractSettings, collate):
    return iter(DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=settings.workers,
                           worker_init_fn=_worker_init if settings.workers else None,
                           prefetch_factor=4 if settings.workers else None,
                           pin_memory=torch.device(settings.device).type == "cuda"))


def run_images(model, preprocess, writer, names, source, settings: ExtractSettings, todo: list, team: Team, log):
    """Image batches are fixed row ranges, so a resumed or split run computes exactly the same batches."""
    mine, rounds = team.mine(todo)
    on_device = jpeg.Preprocess.of(preprocess) if settings.decode == "device" else None
    ds = _ImageRows(source, names, preprocess, jpeg_bytes=on_device is not None)
    loader = _loader(ds, [list(range(s, e)) for s, e in mine], settings, _collate)
    with tqdm(total=sum(e - s for s, e in todo), unit="img", desc="images", file=log, dynamic_ncols=True,
              disable=not todo or not team.writer) as bar:
        def write(start, feats, ok, errors):
            writer.write_images(start, _finite(_host(feats), "image", start, settings.precision), ok, errors)
            bar.update(len(ok))

        with _Output(team, write) as out:
            for _ in range(rounds):
                item = None
                batch = next(loader, None)
                if batch is not None:
                    rows, items, ok, errors, labels = batch
                    pixels = _pixels(items, ok, errors, labels, on_device, preprocess, team.device)
                    item = (rows[0], None if pixels is None else model_mod.image_features(model, pixels), ok, errors)
                out.put(item)


def _pixels(items, ok, errors, labels, on_device, preprocess, device):
    """The batch's pixels on the device, in row order; rows that fail on every path become failed rows."""
    if len(items) == 0:
        return None
    if isinstance(items, torch.Tensor):  # decoded by PIL in the worker, stacked there
        return items.to(device, non_blocking=True)
    pixels, failures = jpeg.pixels(items, device, on_device, preprocess, labels)
    for k, reason in failures.items():  # k-th ok row: PIL refused it too
        row = np.flatnonzero(ok)[k]
        errors[row] = reason
    if failures:
        ok[np.flatnonzero(ok)[list(failures)]] = False
    return pixels


def _host(feats):
    """Features as a host array (None stays None; an array gathered from another rank is one already)."""
    return feats if feats is None or isinstance(feats, np.ndarray) else feats.cpu().numpy()


def _finite(feats, kind: str, start: int, precision: str):
    """Features that are not finite are never written: a NaN row would pass for a done one."""
    if feats is not None and not np.isfinite(feats).all():
        raise ExtractError(f"the {precision} trunk gave non-finite {kind} features from row {start} on; nothing of "
                           "that batch was written. Extract with --precision fp32 (exact) into another --cache")
    return feats


class _CaptionWindows(Dataset):
    """Tokenizes a window of captions (open_clip's own tokenizer), in the workers: off the trunks' path."""

    def __init__(self, tokenizer, captions, windows):
        self.tokenizer, self.captions, self.windows = tokenizer, captions, windows

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, k):
        start, stop = self.windows[k]
        texts = list(self.captions[start:stop])
        tokens = self.tokenizer(texts)
        full = (tokens[:, -1] != 0).numpy()
        # Only captions that fill the context can have been truncated; re-encode just those to count.
        n_trunc = sum(len(self.tokenizer.encode(c)) + 2 > tokens.shape[1] for c, f in zip(texts, full) if f)
        return start, tokens, n_trunc


def run_texts(model, tokenizer, writer, captions, settings: ExtractSettings, todo: list, team: Team, log) -> int:
    """Captions go in windows of fixed rows; inside a window they are sorted by length into batches.

    The window is written as one contiguous slab (flat memory, one flush), and
    its batches depend only on its rows, so a resumed run redoes them identically.
    """
    mine, rounds = team.mine(todo)
    truncated = 0
    loader = _loader(_CaptionWindows(tokenizer, captions, mine), [[k] for k in range(len(mine))], settings, _first)
    with tqdm(total=sum(e - s for s, e in todo), unit="cap", desc="captions", file=log, dynamic_ncols=True,
              disable=not todo or not team.writer) as bar:
        def write(start, feats, n_truncated):
            nonlocal truncated
            writer.write_texts(start, _finite(_host(feats), "caption", start, settings.precision))
            truncated += n_truncated
            bar.update(len(feats))

        with _Output(team, write) as out:
            for r in range(rounds):
                item = None
                if r < len(mine):
                    start, tokens, n_trunc = next(loader)
                    feats = model_mod.encode_window(model, tokens, settings.text_batch_size, team.device)
                    item = (start, feats, n_trunc)
                out.put(item)
    return truncated


def _read_collection(settings: ExtractSettings, notes: list):
    """(caption rows, caption report, image source) from annotations + image folder, or from shards."""
    if settings.shards:
        df, report, shard_report, source = shards.read_shards(settings.shards)
        notes += shard_report.notes
        notes += [f"left out {n} {why}" for why, n in sorted(shard_report.skipped.items())]
        return df, report, source
    if not settings.images.is_dir():
        raise ExtractError(f"image folder not found: {settings.images}")
    df, report = data.read_annotations(settings.annotations, settings.fmt)
    return df, report, data.FolderImages(settings.images)


def _prepare_rows(df, log):
    if df["split"].isna().any():
        print("annotations have no split column: assigning a seeded 80/10/10 split by image "
              "(run `cli.py splits` to choose another)", file=log)
    df = data.assign_splits(df)
    names = list(dict.fromkeys(df["image"]))  # first-appearance order
    row_of = {n: i for i, n in enumerate(names)}
    splits = df.drop_duplicates("image").set_index("image").loc[names, "split"].to_numpy(dtype=object)
    return df, names, splits, df["image"].map(row_of).to_numpy(np.int64)


def _open_or_create(settings: ExtractSettings, attrs: dict, create_args: dict, notes: list, log):
    """Resume a matching partial cache, or create one. Returns a Writer, or None when already complete and sound."""
    path = settings.cache
    expected = cache_mod.estimate_bytes(create_args["image_names"], create_args["image_splits"],
                                        create_args["captions"], create_args["heads"])
    _check_space(path, expected, notes, log)

    def note(text: str) -> None:
        print(f"note: {text}", file=log)
        notes.append(text)

    if path.exists():
        try:
            stored, mended = cache_mod.read_attrs_to_resume(path)
        except OSError as exc:
            # An HDF5 file whose writer died unflushed can be unreadable as a whole.
            note(f"{path} could not be opened ({str(exc)[:80]}); starting it afresh")
            path.unlink()
        else:
            if mended:
                note(mended)
            bad = cache_mod.mismatch(stored, attrs)
            if bad:
                raise cache_mod.CacheError(f"cache {path} was made with other settings: {'; '.join(bad)}; "
                                           "use another --cache path or delete this one")
            try:
                writer, repaired = _resume(path, expected, stored, note)
            except OSError as exc:  # not even its names, captions or heads read back
                note(f"{path} could not be salvaged ({str(exc)[:80]}); starting it afresh")
                path.unlink()
            else:
                if writer is not None:
                    notes.append("resumed a partial cache")
                return writer
    cache_mod.create(path, attrs=attrs, expected_bytes=expected, **create_args)
    return cache_mod.Writer(path, expected)


def _resume(path: Path, expected: int, stored: dict, note) -> tuple:
    """(Writer, repair note) for an existing cache; (None, '') when it is complete and every done row sound."""
    try:
        writer = cache_mod.Writer(path, expected)
        repaired = writer.repair()  # a row marked done counts only if its features are on disk
    except (cache_mod.CacheWriteError, OSError, RuntimeError) as exc:
        if getattr(exc, "full", False):
            raise
        # HDF5 refused the file's own structure (a flush that failed part-way): rebuild it from what reads back.
        note(cache_mod.salvage(path, expected))
        writer = cache_mod.Writer(path, expected)
        repaired = writer.repair()
    if repaired:
        note(repaired)
    elif stored.get("complete"):
        writer.close()
        return None, ""
    return writer, repaired


def _check_space(path: Path, expected: int, notes: list, log) -> None:
    """Refuse a job whose cache clearly will not fit on its filesystem; warn where it is tight."""
    need = max(0, expected - cache_mod.allocated_bytes(path))
    free = cache_mod.free_bytes(path.parent)
    if free is None:
        note = f"the free space beside {path} could not be measured, so it was not checked"
        print(f"note: {note}", file=log)
        notes.append(note)
    elif free < need:
        raise ExtractError(f"cache {path} needs about {cache_mod.mb(need)} more, but only {cache_mod.mb(free)} are "
                           "free on its filesystem; free space or choose another --cache")
    elif free < 1.2 * need:
        print(f"warning: cache {path} needs about {cache_mod.mb(need)} more and {cache_mod.mb(free)} are free; "
              "if the disk fills, the same command resumes once space is freed", file=log)


def extract(settings: ExtractSettings, log=None) -> ExtractSummary:
    """Read annotations, run both trunks over everything not yet done, seal the cache.

    The cache is locked for the whole run, so a second extract on it fails at once.
    """
    _check(settings)
    team = Team(settings.device)
    settings = resolve(settings, team.world)
    if not team.writer:
        return _extract(settings, team, open(os.devnull, "w"))
    with cache_mod.locked(settings.cache):
        return _extract(settings, team, log or sys.stderr)


def _check(settings: ExtractSettings) -> None:
    """Settings that cannot work together, refused before anything is loaded."""
    if settings.precision not in CHOICES:
        raise ExtractError(f"unknown precision {settings.precision!r}; choose one of {list(CHOICES)}")
    if settings.precision == "fp16" and settings.device != "cuda":
        raise ExtractError("--precision fp16 is for --device cuda; on a CPU use fp32 (exact), or auto (faster)")
    if settings.precision in ("int8", *backends.INT8) and settings.device != "cpu":
        raise ExtractError(f"--precision {settings.precision} is a CPU path; on a GPU use bf16, fp16 or auto")
    if settings.decode not in ("auto", "cpu", "device"):
        raise ExtractError(f"unknown decode {settings.decode!r}; choose auto, cpu or device")


def _extract(settings: ExtractSettings, team: Team, log) -> ExtractSummary:
    t0 = time.perf_counter()
    notes: list = []
    df, report, source = _read_collection(settings, notes)
    df, names, splits, image_index = _prepare_rows(df, log)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if team.device.type == "cuda" and settings.precision in ("fp32", "auto"):
        # cuDNN convolutions default to TF32 (10-bit mantissa); fp32 (and auto's fp32 reference) must stay exact.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    loaded = model_mod.load_model(settings.model, settings.pretrained, settings.seed)
    print(f"model: {loaded.description}" + (f" on {team.world} processes" if team.world > 1 else ""), file=log)
    heads = model_mod.take_heads(loaded.model)
    prepared = None
    if settings.precision in ("auto", "int8"):  # measured on this machine, for this job
        choice = None
        if team.writer:
            try:
                choice = _choose_precision(settings, loaded, names, source, df, log)
            except Exception as exc:  # every rank must hear of it
                choice = exc
        precision, line = team.share((choice[0], choice[2]) if isinstance(choice, tuple) else choice)
        prepared = choice[1] if isinstance(choice, tuple) else None
        print(line, file=log)
        settings = dataclasses.replace(settings, precision=precision)
    elif settings.precision == "bf16" and team.device.type == "cpu":
        _warn_if_bf16_measured_slow(settings, loaded, log)
    summary = ExtractSummary(cache=settings.cache, model=loaded.description, captions_dropped=dict(report.dropped),
                             captions_non_ascii=report.non_ascii, notes=notes)
    if report.recovered_lines:
        summary.notes.append(f"recovered Kaggle rows with a missing separator at line(s) {report.recovered_lines}")
    captions = df["caption"].to_numpy(dtype=object)
    writer, plan = None, None
    if team.writer:
        try:
            attrs = _identity(settings, loaded, df)
            writer = _open_or_create(settings, attrs, dict(image_names=names, image_splits=splits, captions=captions,
                                                           caption_image_index=image_index, heads=heads),
                                     summary.notes, log)
            plan = _plan(writer, len(names), len(captions), settings) if writer is not None else None
        except Exception as exc:  # every rank must hear of it, or the others wait forever
            plan = exc
    plan = team.share(plan)
    if plan is not None:
        try:
            model = prepared or _prepare_model(loaded, settings, team, log)  # after the space check and the plan
            run_images(model, loaded.preprocess, writer, names, source, settings, plan[0], team, log)
            summary.captions_truncated = run_texts(model, loaded.tokenizer, writer, captions, settings, plan[1],
                                                   team, log)
            if writer is not None:
                writer.finish()
        except cache_mod.CacheWriteError as exc:
            if not exc.full:  # HDF5 refused its own structure: rebuild the file now, so the next run resumes it
                writer.close()
                try:
                    cache_mod.salvage(settings.cache, writer.expected_bytes)
                except (OSError, RuntimeError, cache_mod.CacheError):
                    pass  # the next run salvages it, or starts afresh, and says so
            raise
        except RuntimeError as exc:
            if "DataLoader worker" not in str(exc):
                raise
            raise ExtractError(_worker_death(str(exc), settings.cache)) from None
        finally:
            if writer is not None:
                writer.close()
    team.barrier()
    _summarise(summary, settings.cache)
    summary.seconds = time.perf_counter() - t0
    return summary


def _choose_precision(settings: ExtractSettings, loaded, names, source, df, log) -> tuple:
    """(precision, its prepared model or None, the line that says why) for --precision auto or int8.

    A cache being resumed keeps the precision it was started with (for int8, where that was an int8 backend).
    Otherwise autoprecision decides from this machine's record, or measures on a calibration batch of the job's own
    images and captions.
    """
    among = backends.INT8 if settings.precision == "int8" else None
    if settings.cache.exists():
        try:
            stored = cache_mod.read_attrs_to_resume(settings.cache)[0].get("precision")
        except OSError:
            stored = None
        if stored in (among or backends.PRECISIONS):
            return stored, None, (f"precision {settings.precision}: {stored}, the precision {settings.cache} was "
                                  "started with")
    pixels = []
    for name in names:
        try:
            pixels.append(loaded.preprocess(source.open(name)))
        except data.ImageLoadError:
            continue
        if len(pixels) == autoprecision.CAL_IMAGES:
            break
    if not pixels:
        raise ExtractError(f"--precision {settings.precision}: not one image could be read to measure the paths on")
    captions = df["caption"].to_numpy(dtype=object)
    picks = np.unique(np.linspace(0, len(captions) - 1, min(len(captions), autoprecision.CAL_CAPTIONS)).astype(int))
    return autoprecision.auto_precision(loaded.model, settings.device, torch.stack(pixels),
                                        loaded.tokenizer(list(captions[picks])), len(names), len(captions),
                                        autoprecision.model_id(loaded), settings.text_batch_size, log, among)


def _warn_if_bf16_measured_slow(settings: ExtractSettings, loaded, log) -> None:
    """bf16 on a CPU is suggested only where it measured faster: warn when this machine's record says otherwise."""
    paths = autoprecision.read_record(autoprecision.record_key("cpu", autoprecision.model_id(loaded)))[0]
    if "bf16" in paths and "fp32" in paths and paths["bf16"]["image_rate"] < paths["fp32"]["image_rate"]:
        print(f"warning: bf16 measured {paths['bf16']['image_rate'] / paths['fp32']['image_rate']:.2f}x fp32 on "
              "this CPU (`cli.py bench`); --precision auto takes the fastest faithful path", file=log)


def _worker_death(message: str, path: Path) -> str:
    """One line for torch's 'DataLoader worker (pid N) is killed by signal: Killed.' or '... exited unexpectedly'."""
    pid = re.search(r"pid(?:\(s\))? ([\d, ]+)", message)
    signal = re.search(r"signal: ([^.]+)", message)
    cause = f"killed by signal: {signal.group(1)}" if signal else "it exited unexpectedly"
    why = ("out of shared memory in /dev/shm" if "Bus error" in cause or "shared memory" in message
           else "the out-of-memory killer does this")
    return (f"a decoding worker{f' (pid {pid.group(1).strip()})' if pid else ''} died, {cause} ({why}); every row "
            f"written so far is kept in {path}; run the same command again to resume "
            "(fewer --workers or a smaller --batch-size use less memory)")


def _prepare_model(loaded: model_mod.LoadedModel, settings: ExtractSettings, team: Team, log):
    if settings.precision == "int8-ort":
        print("int8-ort: loading both trunks in ONNX Runtime (the first time for a model: exporting and quantizing "
              "them, a minute or so, kept for later runs)", file=log)
    try:
        model = backends.prepare(loaded.model, settings.precision, team.device)
    except model_mod.ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - a backend that cannot run here: one line, not a trace
        raise ExtractError(f"--precision {settings.precision} could not prepare the trunks on this machine "
                           f"({autoprecision.first_reason(exc)[:160]}); choose another --precision (fp32 is exact, "
                           "auto measures which paths run here)") from exc
    if settings.precision in backends.INT8:
        print(f"int8 kernels: {model.int8_kernels}", file=log)
    return model


def _identity(settings: ExtractSettings, loaded: model_mod.LoadedModel, df) -> dict:
    attrs = {"model": loaded.arch, "pretrained": loaded.pretrained, "precision": settings.precision,
             "seed": settings.seed if loaded.pretrained == "none" else -1,
             "annotations_sha256": data.annotations_sha256(df),
             "image_root": shards.describe(settings.shards) if settings.shards else str(settings.images.resolve()),
             "open_clip_version": open_clip.__version__, "torch_version": torch.__version__,
             "image_decode": "device" if settings.decode == "device" else "pil"}
    if loaded.config:  # a model from a config file: the cache carries the config, so it rebuilds anywhere
        attrs["model_config"] = loaded.config
    if loaded.pretrained.startswith("file:"):
        attrs["pretrained_sha256"] = model_mod.file_sha256(Path(loaded.pretrained[5:]))
    return attrs


def _plan(writer: cache_mod.Writer, n_images: int, n_captions: int, settings: ExtractSettings) -> tuple:
    """The fixed batches (images) and windows (captions) that still have pending rows."""
    img, txt = writer.image_status(), writer.text_status()
    return ([(s, e) for s, e in batches(n_images, settings.batch_size) if (img[s:e] == cache_mod.PENDING).any()],
            [(s, e) for s, e in batches(n_captions, settings.text_window) if (txt[s:e] != cache_mod.DONE).any()])


def _summarise(summary: ExtractSummary, path: Path) -> None:
    """Counts come from the cache itself, so a resumed run reports the whole file, not only its part."""
    names, status, errors, summary.captions = cache_mod.read_status(path)
    summary.images_done = int((status == cache_mod.DONE).sum())
    failed = np.flatnonzero(status == cache_mod.FAILED)
    summary.failures = [(names[i], errors[i]) for i in failed]
    summary.images_failed = dict(Counter(errors[i].split(":")[0] for i in failed))


# ---------------------------------------------------------------- export

def export(checkpoint: dict, out: Path) -> tuple[str, Path | None]:
    """Write an open_clip checkpoint: the original weights with the probed heads put back.

    ``checkpoint`` is a probe checkpoint (as loaded by probe.load_checkpoint); the original
    model is rebuilt from what it records of its cache. Returns the open_clip model name that
    loads the file (``create_model_and_transforms(name, pretrained=out)``) and, for a model
    built from a config file, the copy of that config written beside ``out`` (register it first).
    """
    model = model_mod.load_like_cache(checkpoint["cache"]).model
    with torch.no_grad():
        model.visual.proj.copy_(checkpoint["visual_proj"])
        model.text_projection.copy_(checkpoint["text_projection"])
        model.logit_scale.copy_(checkpoint["logit_scale"].reshape(model.logit_scale.shape))
    with replacing(out) as tmp:
        torch.save({k: v.float() for k, v in model.state_dict().items()}, tmp)
    arch, config = str(checkpoint["cache"]["model"]), checkpoint["cache"].get("model_config")
    if not config:
        return arch, None
    config_path = Path(out).with_name(f"{arch}.json")
    with replacing(config_path) as tmp:
        tmp.write_text(config)
    return arch, config_path


def encode_queries(info: dict, queries: list[str]) -> np.ndarray:
    """Pre-projection features of free-text queries, from the same trunk and precision as the cache (``info``: its
    attributes)."""
    precision = str(info.get("precision", "fp32"))
    if precision not in backends.PRECISIONS:  # 'int8': torchao's compiled path, which this version no longer has
        raise ExtractError(f"this cache was extracted with --precision {precision}, which this version cannot run "
                           "to encode queries; extract it again with --precision int8 (or fp32) into another --cache")
    loaded = model_mod.load_like_cache(info)
    model_mod.take_heads(loaded.model)
    net = backends.prepare(loaded.model, precision, "cpu")
    with torch.no_grad():
        return model_mod.text_features(net, loaded.tokenizer(queries)).numpy()
