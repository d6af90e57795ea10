"""Stage 1: run the frozen CLIP trunks once and stream pre-projection features to the cache.

The projection heads are taken out of the model (``visual.proj`` and
``text_projection`` set to None), so the model's own ``forward`` returns the
ln_post / ln_final features; the heads are stored beside them. Features times
heads equal open_clip's ``encode_image`` / ``encode_text`` (tests prove it).
"""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import sys
import time
import zipfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import cache as cache_mod
import data
from atomic import replacing

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ExtractError(RuntimeError):
    """Extraction cannot start or finish; the message says what to do."""


# ---------------------------------------------------------------- model loading

@dataclass
class LoadedModel:
    model: torch.nn.Module       # the whole CLIP model, heads still in place
    preprocess: object           # open_clip's eval transform (PIL -> tensor)
    tokenizer: object
    arch: str                    # the open_clip model name that rebuilds this architecture
    pretrained: str              # 'none', a tag, or 'file:<abs path>'
    description: str             # what the user is told was loaded


def _is_torchscript(path: Path) -> bool:
    """OpenAI's own .pt files are TorchScript archives; open_clip's state-dict loader refuses them."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_tag(name: str, tag: str):
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        raise ExtractError(f"unknown pretrained tag {tag!r} for {name}; known tags: "
                           f"{open_clip.list_pretrained_tags_by_model(name)}; or pass a local FILE or 'none'")
    if not _hub_reachable():
        # No network: let huggingface_hub serve its local cache without ~1 min of retries.
        import huggingface_hub.constants as hf_constants
        os.environ["HF_HUB_OFFLINE"] = "1"
        hf_constants.HF_HUB_OFFLINE = True
    # OpenAI's weights were trained with QuickGELU; the plain 'ViT-B-32' config uses GELU.
    quick = bool(cfg.get("quick_gelu")) and not name.endswith("-quickgelu")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tag, force_quick_gelu=quick)
    except RuntimeError as exc:
        raise ExtractError(f"could not get the {tag!r} weights for {name} ({str(exc).splitlines()[0][:160]}); "
                           "offline, pass --pretrained FILE (a local checkpoint) or --pretrained none") from None
    arch = name + "-quickgelu" if quick else name
    return model, preprocess, arch


def _load_file(name: str, path: Path):
    if _is_torchscript(path):
        # The way open_clip loads OpenAI's archives: rebuild from the state dict, with QuickGELU.
        model = open_clip.load_openai_model(str(path), precision="fp32", device="cpu")
        _check_same_architecture(model, name, path)
        preprocess = open_clip.image_transform(model.visual.image_size, is_train=False,
                                               mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD)
        arch = name if name.endswith("-quickgelu") else name + "-quickgelu"
        return model, preprocess, arch
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(path))
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ExtractError(f"cannot load {path} into {name}: {str(exc).splitlines()[0][:200]}") from None
    return model, preprocess, name


def _check_same_architecture(model: torch.nn.Module, name: str, path: Path) -> None:
    with _quiet():
        ref = open_clip.create_model(name, pretrained=None)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:2]
        raise ExtractError(f"{path} is not a {name} checkpoint (first differences: {diff}); pass the matching --model")


@contextmanager
def _quiet():
    """open_clip logs a warning for every random init; the caller says what was loaded instead."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def load_model(name: str = "ViT-B-32", pretrained: str = "openai", seed: int = 0) -> LoadedModel:
    """``pretrained``: an open_clip tag ('openai'), a local checkpoint FILE, or 'none' (seeded random init)."""
    if name not in open_clip.list_models():
        raise ExtractError(f"unknown model {name!r}; open_clip knows e.g. ViT-B-32, ViT-B-32-quickgelu, ViT-B-16")
    if pretrained == "none":
        torch.manual_seed(seed)
        with _quiet():
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
        arch, tag, desc = name, "none", f"{name}, random init (seed {seed}): features carry no pretrained knowledge"
    elif Path(pretrained).is_file():
        path = Path(pretrained).resolve()
        model, preprocess, arch = _load_file(name, path)
        tag, desc = f"file:{path}", f"{arch} from {path}"
    elif os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise ExtractError(f"pretrained file not found: {pretrained}")
    else:
        model, preprocess, arch = _load_tag(name, pretrained)
        tag, desc = pretrained, f"{arch}, pretrained={pretrained}"
    model.eval().requires_grad_(False)
    return LoadedModel(model, preprocess, open_clip.get_tokenizer(name), arch, tag, desc)


# ---------------------------------------------------------------- trunks

def take_heads(model: torch.nn.Module) -> dict:
    """Copy the heads out (fp32 numpy) and remove them, so the towers return pre-projection features."""
    heads = {"visual_proj": model.visual.proj.detach().float().cpu().numpy().copy(),
             "text_projection": model.text_projection.detach().float().cpu().numpy().copy(),
             "logit_scale": np.float32(model.logit_scale.detach().float().cpu().item())}
    model.visual.proj = None
    model.text_projection = None
    return heads


@torch.no_grad()
def image_features(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """ln_post output at the class token (the model's heads must have been taken out)."""
    assert model.visual.proj is None, "take_heads(model) first"
    dtype = next(model.visual.parameters()).dtype
    return model.visual(pixels.to(dtype)).float()


@torch.no_grad()
def text_features(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """ln_final output at the EOT token, running only as many positions as the longest caption needs.

    Exact, not approximate: the causal mask means position i attends to positions
    <= i only, so the padding after a caption's EOT never reaches the EOT's
    features. Trimming the context to the batch's longest caption (and slicing the
    positional embedding and mask to match) just skips work on padding.
    """
    eot = tokens.argmax(dim=-1)  # EOT has the largest id in CLIP's vocabulary
    n = int(eot.max()) + 1
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens[:, :n]).to(cast) + model.positional_embedding[:n].to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), eot].float()


# ---------------------------------------------------------------- the run

@dataclass(frozen=True)
class ExtractSettings:
    annotations: Path
    images: Path                  # image root; annotation names are relative to it
    cache: Path
    model: str = "ViT-B-32"
    pretrained: str = "openai"    # tag, FILE or 'none'
    precision: str = "fp32"       # fp32 (exact), bf16 (trunk weights in bfloat16) or fp16 (GPU only)
    device: str = "cpu"
    batch_size: int = 64          # images per trunk call
    text_batch_size: int = 64     # captions per trunk call (sorted by length inside a window)
    text_window: int = 2048       # captions sorted together and written as one slab (the resume unit)
    workers: int = 1              # image-decoding processes (0: decode in the main process)
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


class _ImageRows(Dataset):
    """Decodes and preprocesses images by row, in worker processes. A failure is returned, not raised."""

    def __init__(self, root: Path, names, preprocess):
        self.root, self.names, self.preprocess = root, list(names), preprocess

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        try:
            return i, self.preprocess(data.load_image(self.root / self.names[i])), ""
        except data.ImageLoadError as exc:
            return i, None, str(exc)


def _collate(items):
    rows = [i for i, _, _ in items]
    ok = np.array([px is not None for _, px, _ in items])
    pixels = torch.stack([px for _, px, _ in items if px is not None]) if ok.any() else None
    return rows, pixels, ok, [err for _, _, err in items]


def _worker_init(_):
    torch.set_num_threads(1)  # decoding workers must not compete with the trunk's threads


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


def run_images(model, preprocess, writer, names, settings: ExtractSettings, todo: list, team: Team, log):
    """Image batches are fixed row ranges, so a resumed or split run computes exactly the same batches."""
    mine, rounds = team.mine(todo)
    ds = _ImageRows(settings.images, names, preprocess)
    loader = iter(DataLoader(ds, batch_sampler=[list(range(s, e)) for s, e in mine], collate_fn=_collate,
                             num_workers=settings.workers, worker_init_fn=_worker_init if settings.workers else None,
                             prefetch_factor=4 if settings.workers else None))
    with tqdm(total=sum(e - s for s, e in todo), unit="img", desc="images", file=log, dynamic_ncols=True,
              disable=not todo or not team.writer) as bar:
        for _ in range(rounds):
            item = None
            batch = next(loader, None)
            if batch is not None:
                rows, pixels, ok, errors = batch
                feats = image_features(model, pixels.to(team.device)).cpu().numpy() if pixels is not None else None
                item = (rows[0], feats, ok, errors)
            for got in team.gather(item):
                if got is not None:
                    writer.write_images(*got)
                    bar.update(len(got[2]))


def encode_window(model, tokens: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """Sort a window of captions by length and encode it in batches of similar length.

    Small batches keep each bucket tight (little padding); `make bench` compares the
    default batch with 256 on Flickr-length captions.
    """
    order = torch.argsort(tokens.argmax(dim=-1), stable=True)
    out = torch.empty(len(tokens), model.ln_final.normalized_shape[0])
    for s, e in batches(len(order), batch_size):
        idx = order[s:e]
        out[idx] = text_features(model, tokens[idx].to(device)).cpu()
    return out


def run_texts(model, tokenizer, writer, captions, settings: ExtractSettings, todo: list, team: Team, log) -> int:
    """Captions go in windows of fixed rows; inside a window they are sorted by length into batches.

    The window is written as one contiguous slab (flat memory, one flush), and
    its batches depend only on its rows, so a resumed run redoes them identically.
    """
    mine, rounds = team.mine(todo)
    truncated = 0
    with tqdm(total=sum(e - s for s, e in todo), unit="cap", desc="captions", file=log, dynamic_ncols=True,
              disable=not todo or not team.writer) as bar:
        for r in range(rounds):
            item = None
            if r < len(mine):
                start, stop = mine[r]
                tokens = tokenizer(list(captions[start:stop]))
                full = tokens[:, -1] != 0
                # Only captions that fill the context can have been truncated; re-encode just those to count.
                n_trunc = sum(len(tokenizer.encode(c)) + 2 > tokens.shape[1]
                              for c in captions[start:stop][full.numpy()])
                item = (start, encode_window(model, tokens, settings.text_batch_size, team.device).numpy(), n_trunc)
            for got in team.gather(item):
                if got is not None:
                    writer.write_texts(got[0], got[1])
                    truncated += got[2]
                    bar.update(len(got[1]))
    return truncated


def _prepare_rows(settings: ExtractSettings, log):
    df, report = data.read_annotations(settings.annotations, settings.fmt)
    if df["split"].isna().any():
        print("annotations have no split column: assigning a seeded 80/10/10 split by image "
              "(run `cli.py splits` to choose another)", file=log)
    df = data.assign_splits(df)
    names = list(dict.fromkeys(df["image"]))  # first-appearance order
    row_of = {n: i for i, n in enumerate(names)}
    splits = df.drop_duplicates("image").set_index("image").loc[names, "split"].to_numpy(dtype=object)
    return df, report, names, splits, df["image"].map(row_of).to_numpy(np.int64)


def _open_or_create(settings: ExtractSettings, attrs: dict, create_args: dict, notes: list, log):
    """Resume a matching partial cache, or create one. Returns a Writer, or None when already complete."""
    path = settings.cache
    if path.exists():
        try:
            stored = cache_mod.read_attrs(path)
        except OSError as exc:
            # An HDF5 file whose writer died unflushed can be unreadable as a whole.
            note = f"{path} could not be opened ({str(exc)[:80]}); starting it afresh"
            print(note, file=log)
            notes.append(note)
            path.unlink()
        else:
            bad = cache_mod.mismatch(stored, attrs)
            if bad:
                raise cache_mod.CacheError(f"cache {path} was made with other settings: {'; '.join(bad)}; "
                                           "use another --cache path or delete this one")
            if stored.get("complete"):
                return None
            notes.append("resumed a partial cache")
            return cache_mod.Writer(path)
    cache_mod.create(path, attrs=attrs, **create_args)
    return cache_mod.Writer(path)


def extract(settings: ExtractSettings, log=None) -> ExtractSummary:
    """Read annotations, run both trunks over everything not yet done, seal the cache.

    The cache is locked for the whole run, so a second extract on it fails at once.
    """
    team = Team(settings.device)
    if not team.writer:
        return _extract(settings, team, open(os.devnull, "w"))
    with cache_mod.locked(settings.cache):
        return _extract(settings, team, log or sys.stderr)


def _extract(settings: ExtractSettings, team: Team, log) -> ExtractSummary:
    t0 = time.perf_counter()
    if settings.precision not in PRECISIONS:
        raise ExtractError(f"unknown precision {settings.precision!r}; choose fp32, bf16 or fp16")
    if settings.precision == "fp16" and team.device.type != "cuda":
        raise ExtractError("--precision fp16 is for --device cuda; on a CPU use fp32 (exact) or bf16")
    if not settings.images.is_dir():
        raise ExtractError(f"image folder not found: {settings.images}")
    df, report, names, splits, image_index = _prepare_rows(settings, log)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if settings.precision == "bf16" and team.device.type == "cpu" \
            and "AVX512" not in torch.backends.cpu.get_cpu_capability():
        print(f"warning: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bfloat16 matrix "
              "instructions; bf16 will be slower than fp32 here (see `make bench`)", file=log)
    loaded = load_model(settings.model, settings.pretrained, settings.seed)
    print(f"model: {loaded.description}" + (f" on {team.world} processes" if team.world > 1 else ""), file=log)
    heads = take_heads(loaded.model)
    model = loaded.model.to(device=team.device, dtype=PRECISIONS[settings.precision])
    if team.device.type == "cuda" and settings.precision == "fp32":
        # cuDNN convolutions default to TF32 (10-bit mantissa); fp32 must stay exact.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    summary = ExtractSummary(cache=settings.cache, model=loaded.description, captions_dropped=dict(report.dropped),
                             captions_non_ascii=report.non_ascii)
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
            run_images(model, loaded.preprocess, writer, names, settings, plan[0], team, log)
            summary.captions_truncated = run_texts(model, loaded.tokenizer, writer, captions, settings, plan[1],
                                                   team, log)
            if writer is not None:
                writer.finish()
        finally:
            if writer is not None:
                writer.close()
    team.barrier()
    _summarise(summary, settings.cache)
    summary.seconds = time.perf_counter() - t0
    return summary


def _identity(settings: ExtractSettings, loaded: LoadedModel, df) -> dict:
    attrs = {"model": loaded.arch, "pretrained": loaded.pretrained, "precision": settings.precision,
             "seed": settings.seed if loaded.pretrained == "none" else -1,
             "annotations_sha256": data.annotations_sha256(df), "image_root": str(settings.images.resolve()),
             "open_clip_version": open_clip.__version__, "torch_version": torch.__version__}
    if loaded.pretrained.startswith("file:"):
        attrs["pretrained_sha256"] = file_sha256(Path(loaded.pretrained[5:]))
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

def load_like_cache(info: dict) -> LoadedModel:
    """Rebuild the model a cache was made with, from its recorded model, pretrained and seed."""
    pretrained = str(info["pretrained"])
    pretrained = pretrained[5:] if pretrained.startswith("file:") else pretrained
    loaded = load_model(str(info["model"]), pretrained, seed=max(int(info.get("seed") or 0), 0))
    if loaded.arch != info["model"]:
        raise ExtractError(f"rebuilt {loaded.arch}, but the cache was made with {info['model']}")
    return loaded


def encode_queries(info: dict, queries: list[str]) -> np.ndarray:
    """Pre-projection features of free-text queries, from the same trunk and precision as the cache."""
    loaded = load_like_cache(info)
    take_heads(loaded.model)
    model = loaded.model.to(PRECISIONS[str(info.get("precision", "fp32"))])
    return text_features(model, loaded.tokenizer(queries)).numpy()


def export(checkpoint: dict, out: Path) -> str:
    """Write an open_clip checkpoint: the original weights with the probed heads put back.

    ``checkpoint`` is a probe checkpoint (as loaded by probe.load_checkpoint); the
    original model is rebuilt from what it records of its cache. Returns the open_clip
    model name that loads the file (``create_model_and_transforms(name, pretrained=out)``).
    """
    model = load_like_cache(checkpoint["cache"]).model
    with torch.no_grad():
        model.visual.proj.copy_(checkpoint["visual_proj"])
        model.text_projection.copy_(checkpoint["text_projection"])
        model.logit_scale.copy_(checkpoint["logit_scale"].reshape(model.logit_scale.shape))
    with replacing(out) as tmp:
        torch.save({k: v.float() for k, v in model.state_dict().items()}, tmp)
    return str(checkpoint["cache"]["model"])
