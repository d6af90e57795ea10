"""Command line: extract features once, probe the heads often, evaluate.

    finetune-clip demo
    finetune-clip extract --annotations data/flickr30k_annotations_with_splits.csv --images data/flickr30k_images
    finetune-clip probe
    finetune-clip eval --split test

(``python cli.py ...`` from a checkout is the same command.) Each command parses and checks its options, calls one
library function, and turns library errors into one clear line and a non-zero exit. Nothing below this module
imports click.
"""
from __future__ import annotations

import atexit
import ctypes
import functools
import gc
import os
import platform
import sys
from pathlib import Path

import click

from . import PRETRAINED, __version__, data
from . import cache as cache_mod
from .atomic import replacing
from .probe_settings import ProbeError, ProbeSettings

DEFAULT_ANNOTATIONS = Path("data/flickr30k_annotations_with_splits.csv")
DEFAULT_IMAGES = Path("data/flickr30k_images")
DEFAULT_CACHE = Path("cache/flickr30k.h5")
DEFAULT_CHECKPOINT = Path("checkpoints/linearprobe_best.pt")
DEFAULT_HISTORY = Path("artifacts/training_history.json")
DEFAULT_RESULTS = Path("artifacts/final_evaluation_results.json")


def _library_errors() -> tuple:
    """The error types the stage modules raise on purpose (the heavy modules' only if already imported)."""
    known = [data.DataError, cache_mod.CacheError, ProbeError, OSError]
    for module, name in (("extract", "ExtractError"), ("model", "ModelError"), ("autoprecision", "PrecisionError")):
        loaded = sys.modules.get(f"{__package__}.{module}")
        if loaded is not None:
            known.append(getattr(loaded, name))
    return tuple(known)


def friendly_errors(fn):
    """Library errors become one line on stderr and exit status 1; anything else is a bug and shows its trace."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except _library_errors() as exc:
            raise click.ClickException(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    return wrapper


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Let this process's malloc keep freed memory for the next tensor, instead of mapping every large one afresh.

    PyTorch's CPU allocator takes each tensor from malloc, and glibc serves a large block by mmap and unmaps it on
    free, so every activation tensor of a batch is paged in again, one fault per 4 KiB page: millions of faults and
    seconds of system time in an extract. Blocks from the heap only, and a trim threshold of 1 GiB, keep that memory
    for reuse, as PyTorch's CPU tuning guide does with jemalloc or tcmalloc by LD_PRELOAD, with no other library
    (the gain, and the peak memory it costs: docs/performance.md). For the command line's own process: the library
    never changes its caller's allocator. True where it applied (Linux with glibc).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def skip_final_collection() -> None:
    """Let this process exit without the garbage collector's last full pass over every object it still holds.

    At exit Python runs a full collection, and with torch and open_clip imported it traverses a few million objects
    that the process exit frees anyway: about half a second at the end of every command, a tenth of an `eval`
    (docs/performance.md). gc.freeze at exit moves them out of that pass; objects are still released as their
    modules are torn down, and files are closed by the code that opened them, never left to a collector. For the
    command line's own process, as keep_freed_memory is.
    """
    atexit.unregister(gc.freeze)  # once, however many commands a process runs (tests run many)
    atexit.register(gc.freeze)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="finetune-clip")
def cli():
    """Adapt CLIP's projection heads to your image-caption data, on a CPU.

    Extract features once, probe the heads often (seconds), evaluate Recall@K.
    Start with `demo`; every command has --help with an example.
    """
    keep_freed_memory()
    skip_final_collection()


# ---------------------------------------------------------------- splits

@cli.command()
@click.option("--annotations", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--format", "fmt", type=click.Choice(["auto", *data.FORMATS]), default="auto", show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--val", type=float, default=0.1, show_default=True, help="fraction of images for validation")
@click.option("--test", type=float, default=0.1, show_default=True, help="fraction of images for test")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_ANNOTATIONS, show_default=True)
@friendly_errors
def splits(annotations, fmt, seed, val, test, out):
    """Write the canonical CSV (image,caption,split), split by image.

    Reads any supported format (canonical CSV, Kaggle results.csv, Karpathy
    dataset_flickr30k.json, flickr_annotations_30k.csv). A split given in the
    input is kept; otherwise images are drawn at random (seeded).

    \b
    Example:
      finetune-clip splits --annotations dataset_flickr30k.json
    """
    df, report = data.read_annotations(annotations, fmt)
    df = data.assign_splits(df, val=val, test=test, seed=seed)
    data.write_csv_atomic(df, out)
    click.echo(data.split_counts(df).to_string())
    _echo_caption_report(report)
    click.echo(f"wrote {out}")


def _echo_caption_report(report: data.CaptionReport) -> None:
    if report.dropped:
        click.echo("captions dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(report.dropped.items())))
    if report.recovered_lines:
        click.echo(f"recovered rows with a missing separator at line(s): {report.recovered_lines}")
    if report.non_ascii:
        click.echo(f"captions with non-ASCII text (kept): {report.non_ascii}")


# ---------------------------------------------------------------- extract

@cli.command("extract")
@click.option("--annotations", type=click.Path(dir_okay=False, path_type=Path),
              default=DEFAULT_ANNOTATIONS, show_default=True)
@click.option("--images", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_IMAGES, show_default=True)
@click.option("--shards", default=None, metavar="PATTERN",
              help="instead of --annotations/--images: img2dataset tar shards ('data/{00000..00009}.tar', "
                   "'data/*.tar') or its 'files' folder")
@click.option("--cache", "cache_path", type=click.Path(dir_okay=False, path_type=Path),
              default=DEFAULT_CACHE, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["auto", *data.FORMATS]), default="auto", show_default=True)
@click.option("--model", default="ViT-B-32", show_default=True,
              help="an open_clip model name, or an open_clip model-config JSON file")
@click.option("--pretrained", default="openai", show_default=True, help="an open_clip tag, a local FILE, or 'none'")
@click.option("--precision", type=click.Choice(["fp32", "auto", "int8", "int8-fbgemm", "int8-ort", "bf16", "fp16"]),
              default="fp32", show_default=True,
              help="fp32 is exact; auto takes the fastest path that is faithful on this machine for this job, "
              "int8 the fastest faithful int8 (both measured, see `bench`); int8-fbgemm and int8-ort name an int8 "
              "backend (CPU); bf16; fp16 (GPU)")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="images per trunk call  [default: 64 on a CPU, 256 on a GPU]")
@click.option("--text-batch-size", type=click.IntRange(min=1), default=None,
              help="captions per trunk call, similar lengths batched together  [default: 64 on a CPU, 1024 on a GPU]")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="processes that decode images and tokenize captions (0: the main process does it)  "
                   "[default: 1 on a CPU; on a GPU every core but one, up to 32]")
@click.option("--decode", type=click.Choice(["auto", "cpu", "device"]), default="auto", show_default=True,
              help="cpu: PIL decodes every image in the workers; device: JPEGs are decoded and resized in batches "
                   "on the device (nvJPEG on a GPU), anything else by PIL; auto: device on a GPU, cpu on a CPU")
@click.option("--seed", type=int, default=0, show_default=True, help="random-init seed for --pretrained none")
@click.option("--strict", is_flag=True, help="exit non-zero, listing them, if any image failed")
@click.pass_context
@friendly_errors
def extract_cmd(ctx, annotations, images, cache_path, shards, fmt, model, pretrained, precision, device, batch_size,
                text_batch_size, workers, decode, seed, strict):
    """Run the frozen trunks once; write features to an HDF5 cache.

    Killed or interrupted, the same command resumes where it stopped. Under
    `torchrun --nproc-per-node N cli.py extract ...` the work is split across
    the processes (gloo on CPU, NCCL on GPUs) and rank 0 writes the one cache.

    \b
    Examples:
      finetune-clip extract --pretrained openai
      finetune-clip extract --shards 'data/{00000..00009}.tar' --cache cache/mine.h5
    """
    from . import extract
    given = {name for name in ("annotations", "images")
             if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT}
    if shards and given:
        raise click.UsageError(f"--shards replaces --annotations and --images; drop --{' and --'.join(sorted(given))}")
    if not shards:
        if not annotations.is_file():
            raise click.BadParameter(f"file {str(annotations)!r} does not exist", param_hint="'--annotations'")
        if not images.is_dir():
            raise click.BadParameter(f"folder {str(images)!r} does not exist", param_hint="'--images'")
    settings = extract.ExtractSettings(annotations=annotations, images=images, cache=cache_path, shards=shards,
                                       model=model, pretrained=pretrained, precision=precision, device=device,
                                       batch_size=batch_size, text_batch_size=text_batch_size, workers=workers,
                                       decode=decode, seed=seed, fmt=fmt, strict=strict)
    summary = extract.extract(settings)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports for everyone
    _echo_extract_summary(summary)
    if strict and summary.failures:
        listing = "; ".join(f"{n} ({e})" for n, e in summary.failures[:20])
        more = f" and {len(summary.failures) - 20} more" if len(summary.failures) > 20 else ""
        raise click.ClickException(f"--strict: {len(summary.failures)} image(s) failed: {listing}{more}")


def _echo_extract_summary(s) -> None:
    failed = sum(s.images_failed.values())
    click.echo(f"model: {s.model}")
    click.echo(f"cache: {s.cache}")
    click.echo(f"images: {s.images_done} done, {failed} failed"
               + (" (" + ", ".join(f"{k} {v}" for k, v in sorted(s.images_failed.items())) + ")" if failed else ""))
    click.echo(f"captions: {s.captions}" + (f", {s.captions_truncated} truncated to the context length"
                                            if s.captions_truncated else ""))
    if s.captions_dropped:
        click.echo("captions dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(s.captions_dropped.items())))
    if s.captions_non_ascii:
        click.echo(f"captions with non-ASCII text (kept): {s.captions_non_ascii}")
    for note in s.notes:
        click.echo(f"note: {note}")
    click.echo(f"time: {s.seconds:.1f} s")


# ---------------------------------------------------------------- bench

@cli.command("bench")
@click.option("--annotations", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="project the extract time of this collection (with --images)")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None)
@click.option("--shards", default=None, metavar="PATTERN", help="or of these img2dataset shards")
@click.option("--model", default="ViT-B-32", show_default=True)
@click.option("--pretrained", default="openai", show_default=True, help="an open_clip tag, a local FILE, or 'none'")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--compiled", is_flag=True,
              help="also measure int8-ort before its one-time export (about a minute, kept for later runs)")
@friendly_errors
def bench_cmd(annotations, images, shards, model, pretrained, device, compiled):
    """Time every extraction path on this machine; recommend one.

    Prints the GEMM ceiling, each path's images/s and captions/s on both
    trunks against fp32, its min cosine to fp32 features, and the projected
    extract time of the collection you name (or of a Flickr30k-sized one).
    The last line, 'recommended: ...', names the path `extract --precision
    auto` takes; the measurements go to the per-machine record it reads.

    \b
    Example:
      finetune-clip bench --pretrained none
    """
    from . import autoprecision, extract
    from . import model as model_mod
    if (annotations is None) != (images is None) or (shards and annotations):
        raise click.UsageError("name a collection with --annotations and --images, or with --shards, or neither")
    if device == "cuda":
        extract.Team("cuda")  # the one clear line where torch sees no CUDA device
    job = None
    if annotations or shards:
        settings = extract.ExtractSettings(annotations=annotations, images=images, cache=Path("."), shards=shards)
        df = extract._read_collection(settings, [])[0]
        job = (int(df["image"].nunique()), len(df))
    loaded = model_mod.load_model(model, pretrained)
    model_mod.take_heads(loaded.model)
    click.echo(f"model: {loaded.description}")
    autoprecision.machine_check(loaded.model, loaded.tokenizer, device, autoprecision.model_id(loaded), job,
                                extract.defaults_for(device, 1)["text_batch_size"], compiled=compiled)


# ---------------------------------------------------------------- probe

class Values(click.ParamType):
    """One value or a comma list (``1e-4,3e-4``): a list makes probe run the grid."""
    name = "value[,value...]"

    def __init__(self, kind):
        self.kind = kind

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            values = [self.kind(v) for v in str(value).split(",") if v.strip()]
        except ValueError:
            values = []
        if not values:
            self.fail(f"{value!r} is not a {self.kind.__name__} or a comma list of them", param, ctx)
        return values


class Alphas(click.ParamType):
    """A comma list of interpolation weights, e.g. ``0,0.25,0.5,0.75,1`` (one grid, not a sweep)."""
    name = "alpha[,alpha...]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            alphas = tuple(float(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            alphas = None
        if not alphas:
            self.fail(f"{value!r} is not a comma list of numbers in [0, 1]", param, ctx)
        if any(not 0.0 <= a <= 1.0 for a in alphas):
            self.fail(f"interpolation weights must lie in [0, 1], got {value!r}", param, ctx)
        return alphas


@cli.command("probe")
@click.option("--cache", "cache_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=DEFAULT_CACHE, show_default=True)
@click.option("--annotations", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="take train/val/test from these annotations instead of the cache (matched by image name)")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_CHECKPOINT, show_default=True)
@click.option("--history", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_HISTORY,
              show_default=True)
@click.option("--lr", type=Values(float), default=str(ProbeSettings.lr), show_default=True,
              help="AdamW learning rate")
@click.option("--weight-decay", type=Values(float), default=str(ProbeSettings.weight_decay), show_default=True,
              help="AdamW decay toward zero")
@click.option("--reg-to-init", type=Values(float), default=str(ProbeSettings.reg_to_init), show_default=True,
              help="L2 penalty on the distance from the pretrained heads")
@click.option("--train-logit-scale/--freeze-logit-scale", default=ProbeSettings.train_logit_scale, show_default=True,
              help="learn the temperature, or keep the pretrained one")
@click.option("--batch-size", type=Values(int), default=str(ProbeSettings.batch_size), show_default=True,
              help="distinct images per batch")
@click.option("--loss", type=Values(str), default=ProbeSettings.loss, show_default=True,
              help="'single' (one random caption per image) or 'multi' (all of them as positives)")
@click.option("--interpolate/--no-interpolate", default=ProbeSettings.interpolate, show_default=True,
              help="choose alpha*trained + (1-alpha)*pretrained heads on validation (WiSE-FT), or keep the trained")
@click.option("--alphas", type=Alphas(), default=",".join(f"{a:g}" for a in ProbeSettings.alphas), show_default=True,
              help="the interpolation grid")
@click.option("--epochs", type=click.IntRange(min=1), default=ProbeSettings.epochs, show_default=True,
              help="at most; early stopping usually ends sooner")
@click.option("--patience", type=click.IntRange(min=0), default=ProbeSettings.patience, show_default=True,
              help="epochs without a better validation recall before stopping")
@click.option("--seed", type=int, default=ProbeSettings.seed, show_default=True,
              help="batch order and caption choice")
@friendly_errors
def probe_cmd(cache_path, annotations, out, history, **options):
    """Train the two projection heads on the cached features.

    The heads are trained with validation-based early stopping; the saved
    heads are alpha * trained + (1 - alpha) * pretrained, with alpha chosen on
    validation from --alphas (WiSE-FT). Comma lists (--lr 1e-3,3e-3
    --weight-decay 0,0.1) run the whole grid, choose by validation recall
    only, keep the best checkpoint and record every run in --history.

    \b
    Examples:
      finetune-clip probe
      finetune-clip probe --lr 1e-3,3e-3 --reg-to-init 0,1e-3
    """
    import itertools

    from . import probe, report
    lists = {k: v for k, v in options.items() if isinstance(v, list) and len(v) > 1}
    fixed = {k: v[0] if isinstance(v, list) else v for k, v in options.items() if k not in lists}
    grid = [probe.ProbeSettings(**fixed, **dict(zip(lists, combo))) for combo in itertools.product(*lists.values())]
    c = _load_cache(cache_path, annotations)
    if len(grid) == 1:
        _train_and_report(c, grid[0], out, history)
        return
    summary = probe.sweep(c, grid, out, history, log=sys.stdout)
    click.echo(f"\n{'run':>4}  " + "  ".join(f"{k:>14}" for k in lists) + "  best epoch  val mean recall")
    for i, run in enumerate(summary["runs"]):
        mark = "  <- kept" if i == summary["best_run"] else ""
        click.echo(f"{i:>4}  " + "  ".join(f"{run['settings'][k]:>14}" for k in lists)
                   + f"  {run['best_epoch']:>10}  {run['val_mean_recall']:>15.2f}{mark}")
    click.echo(f"chosen by validation recall; saved {out}; every run in {history}")
    click.echo(report.plot_history(summary["runs"][summary["best_run"]]["history"], history.with_suffix(".png")))


def _train_and_report(c: cache_mod.Cache, settings, out: Path, history: Path) -> None:
    from . import probe, report
    result = probe.train(c, settings, out, history, log=sys.stdout)
    mix = result["interpolation"]
    click.echo(f"best epoch {result['best_epoch']}" + (f", interpolation alpha {mix['alpha']}" if mix else "")
               + f": val mean recall {result['val_mean_recall']:.2f}; saved {out}; history {history}")
    click.echo(report.plot_history(result["history"], history.with_suffix(".png")))


def _load_cache(cache_path: Path, annotations: Path | None = None) -> cache_mod.Cache:
    c = cache_mod.load(cache_path)
    for note in c.notes:
        click.echo(f"note: {note}", err=True)
    if annotations is not None:
        df, _ = data.read_annotations(annotations)
        c.image_split = data.apply_splits(c.image_names, data.assign_splits(df))
    return c


# ---------------------------------------------------------------- eval

@cli.command("eval")
@click.option("--cache", "cache_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=DEFAULT_CACHE, show_default=True)
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option("--annotations", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="take splits from these annotations instead of the cache")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_CHECKPOINT,
              show_default=True)
@click.option("--baseline-only", is_flag=True, help="evaluate the pretrained heads alone")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_RESULTS, show_default=True)
@friendly_errors
@click.pass_context
def eval_cmd(ctx, cache_path, split, annotations, checkpoint, baseline_only, out):
    """Recall@1/5/10 both ways: zero-shot heads beside the probed ones.

    Before any probe (no checkpoint at the default path) it reports the
    zero-shot heads alone. Writes the results JSON and a PNG beside it.

    \b
    Example:
      finetune-clip eval --split test
    """
    c = _load_cache(cache_path, annotations)
    if not baseline_only and not checkpoint.exists() \
            and ctx.get_parameter_source("checkpoint") == click.core.ParameterSource.DEFAULT:
        click.echo(f"note: no probe checkpoint at {checkpoint} yet (run `python cli.py probe`); "
                   "reporting the pretrained zero-shot heads alone")
        baseline_only = True
    _evaluate_and_report(c, split, None if baseline_only else checkpoint, out)


def _evaluate_and_report(c: cache_mod.Cache, split: str, checkpoint: Path | None, out: Path) -> None:
    from . import probe, report
    result = probe.evaluate(c, split, checkpoint)
    probe.write_json_atomic(out, result)
    click.echo(format_results(result))
    click.echo(f"wrote {out}")
    click.echo(report.plot_recalls(result, out.with_suffix(".png")))


def format_results(r: dict, names=("zero-shot", "probe")) -> str:
    cols = [(names[0], r["baseline"])] + ([(names[1], r["probe"])] if "probe" in r else [])
    head = f"{r['split']}: {r['n_images']} images, {r['n_captions']} captions"
    lines = [head, f"{'':26}" + "".join(f"{name:>10}" for name, _ in cols) + ("     delta" if len(cols) > 1 else "")]
    for d, label in (("text_to_image", "text->image"), ("image_to_text", "image->text")):
        for k in ("R@1", "R@5", "R@10", "median_rank"):
            vals = [m[d][k] for _, m in cols]
            row = f"{label + ' ' + k:26}" + "".join(f"{v:10.2f}" for v in vals)
            if len(cols) > 1 and k.startswith("R@"):
                row += f"{vals[1] - vals[0]:+10.2f}"
            lines.append(row)
    return "\n".join(lines)


# ---------------------------------------------------------------- compare / export

@cli.command("compare")
@click.option("--cache", "cache_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=DEFAULT_CACHE, show_default=True)
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option("--a", "a", default="baseline", show_default=True, help="'baseline' or a checkpoint")
@click.option("--b", "b", required=True, help="'baseline' or a checkpoint")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("artifacts/comparison_results.json"), show_default=True)
@friendly_errors
def compare_cmd(cache_path, split, a, b, out):
    """Two sets of heads side by side on one split.

    \b
    Example:
      finetune-clip compare --a baseline --b checkpoints/linearprobe_best.pt
    """
    from . import probe
    result = probe.compare(_load_cache(cache_path), split, a, b)
    probe.write_json_atomic(out, result)
    click.echo(format_results({"split": split, "n_images": result["n_images"], "n_captions": result["n_captions"],
                               "baseline": result["a"], "probe": result["b"]}, names=("a", "b")))
    click.echo(f"a = {a}\nb = {b}\nwrote {out}")


@cli.command("export")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"probe checkpoint (default: {DEFAULT_CHECKPOINT} for --out; the zero-shot heads for --embeddings)")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write an open_clip checkpoint with the probed heads in place")
@click.option("--cache", "cache_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="the cache whose embeddings --embeddings writes")
@click.option("--embeddings", "embeddings_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="write L2-normalised float16 embeddings and Parquet metadata in clip-retrieval's layout")
@friendly_errors
def export_cmd(checkpoint, out, cache_path, embeddings_dir):
    """An open_clip checkpoint, or embeddings for an index.

    --out FILE writes the original model's weights with the probed heads in
    place, for open_clip. --embeddings DIR (with --cache) writes every image's
    and caption's projected, L2-normalised embedding as float16 .npy files
    plus Parquet metadata, in the folders clip-retrieval's index step reads
    (img_emb/, text_emb/, metadata/), with the zero-shot heads or
    --checkpoint's.

    \b
    Examples:
      finetune-clip export --out clip_probed.pt
      finetune-clip export --cache cache/flickr30k.h5 --embeddings emb/
    """
    from . import probe
    if (out is None) == (embeddings_dir is None):
        raise click.UsageError("give --out FILE (an open_clip checkpoint) or --embeddings DIR (with --cache)")
    if embeddings_dir is not None:
        from . import embeddings
        if cache_path is None:
            raise click.UsageError("--embeddings needs --cache: the cache whose embeddings to write")
        c = _load_cache(cache_path)
        if checkpoint is None:
            heads, source = probe.Heads.from_cache(c), {"heads": "zero-shot (the cache's pretrained heads)"}
        else:
            heads, ckpt = probe.load_checkpoint(checkpoint, c)
            source = {"heads": str(checkpoint), "interpolation": ckpt["interpolation"]}
        record = embeddings.write(c, heads.visual_proj, heads.text_projection, embeddings_dir, source)
        click.echo(f"wrote {record['images']} image and {record['captions']} text embeddings "
                   f"({record['dim']}-d float16) with metadata to {embeddings_dir}")
        return
    from . import extract
    _, ckpt = probe.load_checkpoint(checkpoint or DEFAULT_CHECKPOINT)
    arch, config = extract.export(ckpt, out)
    register = f"open_clip.add_model_config({str(config)!r}); " if config else ""
    click.echo(f"wrote {out}; load it with {register}open_clip.create_model_and_transforms({arch!r}, "
               f"pretrained={str(out)!r})")


# ---------------------------------------------------------------- search

@cli.command("search")
@click.argument("query")
@click.option("--cache", "cache_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=DEFAULT_CACHE, show_default=True)
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="probed heads (default: the cached pretrained heads)")
@click.option("--k", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--split", type=click.Choice(["all", "train", "val", "test"]), default="all", show_default=True)
@click.option("--images", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="image root for thumbnails (default: the one recorded in the cache)")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write a self-contained page with thumbnails, scores and captions")
@friendly_errors
def search_cmd(query, cache_path, checkpoint, k, split, images, html_path):
    """Rank the cached images for a text query.

    The query goes through the same text trunk and precision as the cache.

    \b
    Example:
      finetune-clip search "a dog running on a beach" --k 10 --html dog.html
    """
    from . import extract, probe, report
    c = _load_cache(cache_path)
    heads = probe.load_checkpoint(checkpoint, c)[0] if checkpoint else probe.Heads.from_cache(c)
    hits = probe.search(c, heads, extract.encode_queries(c.attrs, [query])[0], k, split)
    for h in hits:
        click.echo(f"{h['rank']:>3}  {h['score']:.4f}  {h['image']}  {h['captions'][0] if h['captions'] else ''}")
    if html_path:
        root = images or Path(c.attrs["image_root"])
        with replacing(html_path) as tmp:
            tmp.write_text(report.search_page(query, hits, root, str(checkpoint or "pretrained")), encoding="utf-8")
        click.echo(f"wrote {html_path}")


# ---------------------------------------------------------------- demo

SMALL_CLIP = (PRETRAINED / "ShapesCLIP.json", PRETRAINED / "ShapesCLIP.pt")


@cli.command()
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=Path("data/demo"), show_default=True)
@click.option("--images", "n_images", type=click.IntRange(min=20), default=3000, show_default=True)
@click.option("--model", "which", type=click.Choice(["small-pretrained", "random-vit-b-32"]),
              default="small-pretrained", show_default=True,
              help="the project's small pretrained CLIP on a shifted world, or a random-init ViT-B/32")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=1, show_default=True)
@friendly_errors
def demo(root, n_images, which, seed, workers):
    """The whole pipeline on a generated collection, offline.

    By default: ShapesCLIP, a small CLIP shipped with this package and
    pretrained on flat-background shapes with templated captions, adapted to
    a shifted "target world": textured, noisy JPEGs of other sizes, captioned
    in sentences with words it never saw. Zero-shot works there, but not
    well; the probe adapts the two heads. With --model random-vit-b-32: the
    real ViT-B/32 architecture, randomly initialised, whose zero-shot is at
    chance (it shows how much the heads alone can learn, nothing more).

    \b
    Example:
      finetune-clip demo
    """
    from . import extract, probe, worlds
    if which == "small-pretrained":
        world, size, (config, weights) = "target", 64, SMALL_CLIP
        model_args = dict(model=str(config), pretrained=str(weights))
        click.echo("model: ShapesCLIP, the small CLIP shipped with this package, pretrained on the source world")
    else:
        world, size, model_args = "source", 160, dict(model="ViT-B-32", pretrained="none", seed=seed)
        click.echo("model: ViT-B/32 with random weights (zero-shot is at chance)")
    annotations = worlds.make_dataset(root / world, world, n_images=n_images, seed=seed, size=size)
    click.echo(f"demo dataset: {n_images} {world}-world images, 5 captions each, in {root / world}")
    cache_path = Path("cache") / f"demo_{world}_{n_images}_{which}_fp32.h5"
    summary = extract.extract(extract.ExtractSettings(annotations=annotations, images=root / world / "images",
                                                      cache=cache_path, workers=workers, **model_args))
    _echo_extract_summary(summary)
    c = _load_cache(cache_path)
    _train_and_report(c, probe.ProbeSettings(seed=seed), DEFAULT_CHECKPOINT, DEFAULT_HISTORY)
    _evaluate_and_report(c, "test", DEFAULT_CHECKPOINT, DEFAULT_RESULTS)
    prog = click.get_current_context().find_root().info_name  # 'cli.py' from a checkout, else 'finetune-clip'
    prog = f"python {prog}" if prog.endswith(".py") else prog
    click.echo(f"search it: {prog} search --cache {cache_path} \"a red circle\" --checkpoint {DEFAULT_CHECKPOINT} "
               "--html artifacts/search.html")


# ---------------------------------------------------------------- shards

@cli.command("shards")
@click.option("--annotations", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="folder for the tars")
@click.option("--per-shard", type=click.IntRange(min=1), default=1000, show_default=True, help="images per tar")
@friendly_errors
def shards_cmd(annotations, images, out, per_shard):
    """Write a collection as img2dataset-style tar shards.

    Each image becomes KEY.jpg (its bytes), KEY.txt (its first caption) and
    KEY.json (its name and split) in 00000.tar, 00001.tar, ..., which
    `extract --shards` reads in place.

    \b
    Example:
      finetune-clip shards --annotations data/demo/target/annotations.csv \\
          --images data/demo/target/images --out data/demo/shards
    """
    from . import shards
    df, _ = data.read_annotations(annotations)
    written = shards.write_shards(df, images, out, per_shard=per_shard)
    click.echo(f"wrote {len(written)} shard(s) of at most {per_shard} images to {out}")


def main() -> None:
    """The console command, `finetune-clip`."""
    cli(prog_name="finetune-clip")
