"""Stage 2: train the two projection heads on cached features; checkpoints; evaluation.

Works from the cache alone: the trunks never run here, so an epoch is a few
small matrix products and takes seconds.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import cache as cache_mod
from . import metrics
from .atomic import replacing
from .probe_settings import ProbeError, ProbeSettings

CHECKPOINT_FORMAT = "finetune-clip-flickr30k/heads-v1"
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's own clamp on the temperature
# What rebuilds the model of a cache (a checkpoint carries them, for export).
CACHE_KEYS = ("model", "model_config", "pretrained", "pretrained_sha256", "precision", "seed")


@dataclass
class Heads:
    visual_proj: torch.Tensor     # [D_img, E]
    text_projection: torch.Tensor  # [D_txt, E]
    logit_scale: torch.Tensor     # [] (log of the inverse temperature)

    @classmethod
    def from_cache(cls, c: cache_mod.Cache) -> "Heads":
        return cls(*(torch.as_tensor(np.asarray(c.heads[k]), dtype=torch.float32).clone()
                     for k in ("visual_proj", "text_projection", "logit_scale")))

    def detached(self) -> "Heads":
        return Heads(*(t.detach().clone() for t in (self.visual_proj, self.text_projection, self.logit_scale)))

    def mix(self, other: "Heads", alpha: float) -> "Heads":
        """``alpha * other + (1 - alpha) * self``, every tensor (the temperature too)."""
        return Heads(*(torch.lerp(a.detach(), b.detach(), alpha) for a, b in
                       ((self.visual_proj, other.visual_proj), (self.text_projection, other.text_projection),
                        (self.logit_scale, other.logit_scale))))

    def embed(self, view: cache_mod.SplitView) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(view.image_features) @ self.visual_proj,
                torch.from_numpy(view.text_features) @ self.text_projection)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE; row i of ``img`` and ``txt`` are a pair, every other row a negative."""
    logits = logit_scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    target = torch.arange(len(img))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def multi_positive_loss(img: torch.Tensor, txt: torch.Tensor, owner: torch.Tensor,
                        logit_scale: torch.Tensor) -> torch.Tensor:
    """Contrastive loss with every caption of each image as a positive (soft targets, as in ALBEF).

    ``txt`` holds all captions of the batch's images, ``owner[j]`` the row of ``img`` caption j
    describes. Image->text: the target spreads evenly over the image's own captions.
    Text->image: each caption has exactly one right image.
    """
    logits = logit_scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T  # [B, T]
    positive = (owner[None, :] == torch.arange(len(img))[:, None]).float()
    i2t = -(F.log_softmax(logits, dim=1) * positive / positive.sum(1, keepdim=True)).sum(1).mean()
    return (i2t + F.cross_entropy(logits.T, owner)) / 2


class CaptionSampler:
    """Per image, its captions; draws one at random for each image of a batch."""

    def __init__(self, text_image_index: np.ndarray, n_images: int):
        order = np.argsort(text_image_index, kind="stable")
        counts = np.bincount(text_image_index, minlength=n_images)
        self.order = torch.from_numpy(order)
        self.start = torch.from_numpy(np.concatenate([[0], np.cumsum(counts)[:-1]]))
        self.count = torch.from_numpy(counts)
        self.images = torch.from_numpy(np.flatnonzero(counts > 0))  # images with at least one caption

    def draw(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        pick = (torch.rand(len(images), generator=gen) * self.count[images]).long()
        return self.order[self.start[images] + pick]

    def every(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All captions of ``images`` (rows), and for each the position of its image in ``images``."""
        owner = torch.repeat_interleave(torch.arange(len(images)), self.count[images])
        offset = torch.arange(len(owner)) - torch.repeat_interleave(
            torch.cumsum(self.count[images], 0) - self.count[images], self.count[images])
        return self.order[self.start[images][owner] + offset], owner


def _split(c: cache_mod.Cache, name: str) -> cache_mod.SplitView:
    view = c.split(name)
    if view.n_images < 2 or view.n_captions < 2:
        raise ProbeError(f"split {name!r} of {c.path} has {view.n_images} usable image(s); need at least 2")
    return view


def evaluate_heads(heads: Heads, view: cache_mod.SplitView) -> dict:
    with torch.no_grad():
        img, txt = heads.embed(view)
        return metrics.retrieval_metrics(img, txt, torch.from_numpy(view.text_image_index))


def _validate(heads: Heads, view: cache_mod.SplitView, first_caption: torch.Tensor, images: torch.Tensor,
              batch_size: int) -> tuple[dict, float]:
    """Validation recall, and contrastive loss with each image's first caption (fixed, so epochs compare).

    Both come from one projection of the validation features.
    """
    with torch.no_grad():
        img, txt = heads.embed(view)
        recall = metrics.retrieval_metrics(img, txt, torch.from_numpy(view.text_image_index))
        losses = [contrastive_loss(img[images[s:s + batch_size]], txt[first_caption[s:s + batch_size]],
                                   heads.logit_scale) * len(images[s:s + batch_size])
                  for s in range(0, len(images), batch_size)]
    return recall, float(sum(losses) / len(images))


def train(c: cache_mod.Cache, settings: ProbeSettings, out: Path, history_path: Path | None = None,
          log=None) -> dict:
    """Train from the cached pretrained heads; keep the heads with the best validation recall."""
    log = log or sys.stderr
    settings.check()
    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    train_view, val_view = _split(c, "train"), _split(c, "val")
    init = Heads.from_cache(c)
    heads = Heads(*(t.clone().requires_grad_(True)
                    for t in (init.visual_proj, init.text_projection, init.logit_scale)))
    heads.logit_scale.requires_grad_(settings.train_logit_scale)
    groups = [{"params": [heads.visual_proj, heads.text_projection], "weight_decay": settings.weight_decay}]
    if settings.train_logit_scale:
        groups.append({"params": [heads.logit_scale], "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=settings.lr)
    x_img = torch.from_numpy(train_view.image_features)
    x_txt = torch.from_numpy(train_view.text_features)
    sampler = CaptionSampler(train_view.text_image_index, train_view.n_images)
    val_sampler = CaptionSampler(val_view.text_image_index, val_view.n_images)
    val_first = val_sampler.order[val_sampler.start[val_sampler.images]]

    history, best, since_best = [], None, 0
    for epoch in range(0, settings.epochs + 1):
        t0 = time.perf_counter()
        train_loss = _train_epoch(heads, init, opt, x_img, x_txt, sampler, settings, gen) if epoch else None
        val, val_loss = _validate(heads, val_view, val_first, val_sampler.images, settings.batch_size)
        entry = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                 "val": val, "val_mean_recall": metrics.mean_recall(val),
                 "logit_scale": float(heads.logit_scale.detach()), "seconds": time.perf_counter() - t0}
        history.append(entry)
        improved = best is None or entry["val_mean_recall"] > best["val_mean_recall"]
        print(f"epoch {epoch:3d}  train loss {'-' if train_loss is None else f'{train_loss:.4f}':>7}  "
              f"val loss {entry['val_loss']:.4f}  val mean recall {entry['val_mean_recall']:6.2f}"
              f"{'  *' if improved else ''}", file=log)
        if improved:
            best, best_heads, since_best = entry, heads.detached(), 0
        else:
            since_best += 1
            if since_best >= settings.patience:
                print(f"early stop: no better validation recall for {settings.patience} epochs", file=log)
                break
    chosen, interpolation = best_heads, None
    if settings.interpolate:
        chosen, interpolation, val = interpolate(init, best_heads, val_view, settings.alphas)
        best = {**best, "val": val, "val_mean_recall": metrics.mean_recall(val)}
        print(f"interpolation: alpha {interpolation['alpha']} (1 = the trained heads, 0 = the pretrained ones), "
              f"val mean recall {best['val_mean_recall']:.2f}", file=log)
    save_checkpoint(out, chosen, c, settings, best, interpolation)
    if history_path is not None:
        write_json_atomic(history_path, {"settings": settings.record(), "cache_fingerprint": c.fingerprint,
                                         "best_epoch": best["epoch"], "interpolation": interpolation,
                                         "epochs": history})
    return {"best_epoch": best["epoch"], "val": best["val"], "val_mean_recall": best["val_mean_recall"],
            "interpolation": interpolation, "history": history, "checkpoint": str(out)}


def interpolate(init: Heads, trained: Heads, view: cache_mod.SplitView, alphas) -> tuple[Heads, dict, dict]:
    """WiSE-FT on the heads: ``alpha * trained + (1 - alpha) * pretrained``, alpha chosen on validation.

    Alpha 0 (the pretrained heads) is always a candidate unless the grid leaves it out, so on
    validation the result is never worse than zero-shot. Ties go to the smaller alpha: the
    heads nearer the pretrained ones keep more of what pretraining knew.
    """
    scores, best = {}, None
    for alpha in sorted(float(a) for a in alphas):
        heads = init.mix(trained, alpha)
        val = evaluate_heads(heads, view)
        scores[str(alpha)] = metrics.mean_recall(val)
        if best is None or scores[str(alpha)] > best[2]:
            best = (alpha, heads, scores[str(alpha)], val)
    alpha, heads, _, val = best
    return heads, {"alpha": alpha, "val_by_alpha": scores}, val


def _train_epoch(heads, init, opt, x_img, x_txt, sampler, settings, gen) -> float:
    images = sampler.images[torch.randperm(len(sampler.images), generator=gen)]
    total, n = 0.0, 0
    for s in range(0, len(images), settings.batch_size):
        batch = images[s:s + settings.batch_size]
        if len(batch) < 2:
            continue  # a lone pair has no negative to learn from
        img = x_img[batch] @ heads.visual_proj
        if settings.loss == "multi":
            caps, owner = sampler.every(batch)
            loss = multi_positive_loss(img, x_txt[caps] @ heads.text_projection, owner, heads.logit_scale)
        else:
            caps = sampler.draw(batch, gen)
            loss = contrastive_loss(img, x_txt[caps] @ heads.text_projection, heads.logit_scale)
        total += float(loss.detach()) * len(batch)
        n += len(batch)
        if settings.reg_to_init:
            loss = loss + settings.reg_to_init * ((heads.visual_proj - init.visual_proj).pow(2).sum()
                                                  + (heads.text_projection - init.text_projection).pow(2).sum())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            heads.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    return total / max(n, 1)


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(path: Path, heads: Heads, c: cache_mod.Cache, settings: ProbeSettings, entry: dict,
                    interpolation: dict | None = None) -> None:
    """Write to a temp file beside the target and rename, so a checkpoint is never half-written.

    ``interpolation`` is ``{"alpha": a, "val_by_alpha": {"0.0": ..., ...}}`` when the saved heads are
    the WiSE-FT mix chosen on validation, None when they are the trained heads as they are.
    """
    payload = {"format": CHECKPOINT_FORMAT,
               "visual_proj": heads.visual_proj.detach().clone(),
               "text_projection": heads.text_projection.detach().clone(),
               "logit_scale": heads.logit_scale.detach().clone(),
               "settings": settings.record(),
               "cache_fingerprint": c.fingerprint,
               "cache": {k: str(c.attrs.get(k, "")) for k in CACHE_KEYS},
               "epoch": entry["epoch"], "val": entry["val"], "val_mean_recall": entry["val_mean_recall"],
               "interpolation": interpolation}
    with replacing(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, c: cache_mod.Cache | None = None, log=None) -> tuple[Heads, dict]:
    """Load heads (``weights_only=True``: no code runs); refuse a checkpoint made from another cache.

    A checkpoint saved before interpolation existed holds the trained heads: it loads as alpha 1.
    """
    path = Path(path)
    if not path.is_file():
        raise ProbeError(f"checkpoint not found: {path} (run `python cli.py probe` first)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a foreign or damaged file
        raise ProbeError(f"{path} is not a readable checkpoint: {str(exc).splitlines()[0][:160]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ProbeError(f"{path} is not a probe checkpoint of this tool (format {CHECKPOINT_FORMAT})")
    if c is not None and ckpt["cache_fingerprint"] != c.fingerprint:
        raise ProbeError(f"checkpoint {path} was trained on cache {ckpt['cache_fingerprint']}, "
                         f"but {c.path} has fingerprint {c.fingerprint}")
    if "interpolation" not in ckpt:
        print(f"note: {path} was saved before interpolation existed; using its trained heads as they are "
              "(alpha 1)", file=log or sys.stderr)
        ckpt["interpolation"] = {"alpha": 1.0, "val_by_alpha": {}}
    return Heads(ckpt["visual_proj"], ckpt["text_projection"], ckpt["logit_scale"]), ckpt


def write_json_atomic(path: Path, obj) -> None:
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------- evaluation

def evaluate(c: cache_mod.Cache, split: str, checkpoint: Path | None) -> dict:
    """Baseline (the cached pretrained heads) beside the probed heads, in the results-JSON shape."""
    view = c.split(split)
    if view.n_images == 0 or view.n_captions == 0:
        raise ProbeError(f"split {split!r} of {c.path} has no usable images")
    result = {"split": split, "n_images": view.n_images, "n_captions": view.n_captions,
              "baseline": evaluate_heads(Heads.from_cache(c), view)}
    if checkpoint is not None:
        heads, _ = load_checkpoint(checkpoint, c)
        result["probe"] = {**evaluate_heads(heads, view), "checkpoint": str(checkpoint)}
        result["delta_pp"] = metrics.delta_pp(result["baseline"], result["probe"])
    result["cache"] = {"path": str(c.path), "fingerprint": c.fingerprint,
                       **{k: c.attrs.get(k) for k in ("model", "pretrained", "precision")}}
    return result


def compare(c: cache_mod.Cache, split: str, a: str, b: str) -> dict:
    """Two sets of heads on one split; ``a`` or ``b`` may be 'baseline' (the cached pretrained heads)."""
    view = c.split(split)

    def heads_of(which: str) -> Heads:
        return Heads.from_cache(c) if which == "baseline" else load_checkpoint(Path(which), c)[0]
    ma, mb = evaluate_heads(heads_of(a), view), evaluate_heads(heads_of(b), view)
    return {"split": split, "n_images": view.n_images, "n_captions": view.n_captions,
            "a": {**ma, "source": a}, "b": {**mb, "source": b}, "delta_pp": metrics.delta_pp(ma, mb),
            "cache": {"path": str(c.path), "fingerprint": c.fingerprint}}


def sweep(c: cache_mod.Cache, grid: list[ProbeSettings], out: Path, history_path: Path | None,
          log=None) -> dict:
    """Train every setting; choose by validation recall only (never test); keep the winner's checkpoint."""
    log = log or sys.stderr
    runs, best = [], None  # best: (run index, result, its checkpoint file)
    for i, settings in enumerate(grid):
        print(f"run {i + 1}/{len(grid)}: " + ", ".join(f"{k}={v}" for k, v in settings.record().items()), file=log)
        candidate = Path(out).with_name(f"{Path(out).stem}.run{i}{Path(out).suffix}")
        result = train(c, settings, candidate, None, log=log)
        runs.append({"settings": settings.record(), "best_epoch": result["best_epoch"],
                     "val_mean_recall": result["val_mean_recall"], "val": result["val"],
                     "history": result["history"]})
        if best is None or result["val_mean_recall"] > best[1]["val_mean_recall"]:
            if best is not None:
                best[2].unlink(missing_ok=True)
            best = (i, result, candidate)
        else:
            candidate.unlink(missing_ok=True)
    os.replace(best[2], out)
    summary = {"cache_fingerprint": c.fingerprint, "chosen_by": "val_mean_recall", "best_run": best[0],
               "runs": runs}
    if history_path is not None:
        write_json_atomic(history_path, summary)
    return summary


def search(c: cache_mod.Cache, heads: Heads, query_features: np.ndarray, k: int, split: str = "all") -> list[dict]:
    """The ``k`` cached images closest to one query (pre-projection text features), best first."""
    view = c.split(split)
    with torch.no_grad():
        img = F.normalize(torch.from_numpy(view.image_features) @ heads.visual_proj, dim=-1)
        q = F.normalize(torch.from_numpy(query_features).reshape(1, -1) @ heads.text_projection, dim=-1)
        scores = (q @ img.T)[0]
        top = torch.topk(scores, min(k, len(scores)))
    hits = []
    for rank, (score, local) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
        row = int(view.image_rows[local])
        hits.append({"rank": rank, "score": score, "image": str(c.image_names[row]), "split": str(c.image_split[row]),
                     "captions": [str(x) for x in c.captions[c.text_image_index == row]]})
    return hits
