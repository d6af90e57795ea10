"""Pretrain the project's small CLIP from scratch on the generated source world (`make pretrain`).

    python benchmarks/pretrain.py          # writes finetune_clip/pretrained/ShapesCLIP.pt (fp16 state dict)

The architecture is open_clip's own CLIP, built from ``finetune_clip/pretrained/ShapesCLIP.json`` (4-layer
towers, 64 px images in 8 px patches, CLIP's BPE tokenizer). It learns contrastively, with
open_clip's ``ClipLoss``, from source-world scenes rendered in memory, each step pairing every
image with one of its templated captions at random. Seeded: the same torch build on the same
CPU gives the same weights. About 10 minutes on 2 CPU cores.

This stands in for OpenAI's pretraining: a model whose trunks and heads already work, so that
the probe's claims (it helps, which defaults are best, int8 keeps recall) are measured where a
real user stands. It is committed so nobody has to wait for it.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from finetune_clip import metrics, worlds
from finetune_clip import model as model_mod
from finetune_clip.atomic import replacing
from finetune_clip.cli import SMALL_CLIP

CONFIG, WEIGHTS = SMALL_CLIP


def render_pool(n: int, rng: np.random.Generator, size: int) -> tuple[torch.Tensor, list[dict]]:
    """n source scenes rendered as uint8 [n, 3, size, size], with the scenes themselves."""
    scenes = [worlds.sample_scene(rng) for _ in range(n)]
    pixels = np.stack([np.asarray(worlds.render_source(s, size)) for s in scenes])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), scenes


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """What open_clip's eval transform does to an image already at the model's size."""
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (pixels.float() / 255 - mean) / std


def embed(net, tokenizer, pixels: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    img = net.encode_image(normalise(pixels), normalize=True)
    # The trimmed text forward is exact (see model.text_features) and skips the padding.
    txt = F.normalize(model_mod.text_features(net, tokenizer(captions)) @ net.text_projection, dim=-1)
    return img, txt


def param_groups(net: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's convention: no decay on gains, biases, embeddings or the temperature."""
    decay, rest = [], []
    for name, p in net.named_parameters():
        no_decay = p.ndim < 2 or "embedding" in name or "logit_scale" in name or "bn" in name or "ln" in name
        (rest if no_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


@torch.no_grad()
def held_out_recall(net, tokenizer, pixels: torch.Tensor, scenes: list[dict], rng: np.random.Generator) -> dict:
    net.eval()
    captions = [worlds.source_caption(s, int(rng.integers(len(worlds.SOURCE_TEMPLATES)))) for s in scenes]
    img, txt = embed(net, tokenizer, pixels, captions)
    net.train()
    return metrics.retrieval_metrics(img, txt, torch.arange(len(scenes)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=640)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--pool", type=int, default=24000, help="distinct training scenes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=WEIGHTS)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    name, _ = model_mod.register_config(CONFIG)
    with model_mod._quiet():
        net = open_clip.create_model(name, pretrained=None)
    tokenizer = open_clip.get_tokenizer(name)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"{name}: {n_params / 1e6:.2f} M parameters, the two heads "
          f"{(net.visual.proj.numel() + net.text_projection.numel()) / n_params:.2%} of them", flush=True)
    size = net.visual.image_size[0] if isinstance(net.visual.image_size, tuple) else net.visual.image_size
    pool, scenes = render_pool(args.pool, rng, size)
    held_px, held_scenes = render_pool(1000, np.random.default_rng(args.seed + 1), size)
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(param_groups(net, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(
        math.pi * min(1.0, max(0, s - warmup) / max(1, args.steps - warmup))))))
    net.train()
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = rng.choice(len(pool), args.batch_size, replace=False)
        captions = [worlds.source_caption(scenes[i], int(rng.integers(len(worlds.SOURCE_TEMPLATES)))) for i in idx]
        img, txt = embed(net, tokenizer, pool[torch.from_numpy(idx)], captions)
        loss = loss_fn(img, txt, net.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            net.logit_scale.clamp_(0, math.log(100))
        if step % 100 == 0 or step == args.steps:
            r = held_out_recall(net, tokenizer, held_px, held_scenes, np.random.default_rng(7))
            print(f"step {step:5d}  loss {loss.item():.3f}  held-out source T->I R@1 "
                  f"{r['text_to_image']['R@1']:5.1f} R@5 {r['text_to_image']['R@5']:5.1f}  "
                  f"{time.perf_counter() - t0:6.0f} s", flush=True)
    state = {k: v.detach().half() for k, v in net.state_dict().items()}
    with replacing(args.out) as tmp:
        torch.save(state, tmp)
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB, fp16)", file=sys.stderr)


if __name__ == "__main__":
    main()
