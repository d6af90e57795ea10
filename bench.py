"""`make bench`: each speed figure beside its reference, as a ratio (shared/DESIGN.md budgets).

Timings use a random-init ViT-B/32 (speed does not depend on the weights) and
synthetic inputs, so the bench runs offline. Nothing here is asserted.
"""
from __future__ import annotations

import copy
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import cache
import extract
import probe
from data import make_demo_dataset

FLICKR_IMAGES, FLICKR_CAPTIONS = 31_783, 158_915
WORDS = ("a man woman dog child girl boy in the red blue shirt is running on grass beach street with two "
         "people playing sitting near water ball black white young standing front of building").split()


def best_of(fn, repeat=3) -> float:
    fn()  # warm-up: first calls pay for allocation and kernel selection
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def gemm_gflops() -> float:
    """The machine's fp32 matrix-multiply rate on the trunk's own shape (a batch of 64 x 50 tokens
    through the MLP), best of several: the ceiling the image trunk is measured against."""
    a, b = torch.randn(3200, 768), torch.randn(768, 3072)
    return 2 * 3200 * 768 * 3072 / best_of(lambda: a @ b, 10) / 1e9


def flickr_like_captions(n: int, seed: int = 0) -> list[str]:
    """Word counts like Flickr30k's captions (mean about 12.3, sd about 5.3, a tail past 40)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.rint(rng.gamma(5.4, 2.28, n)), 3, 70).astype(int)
    return [" ".join(rng.choice(WORDS, k)) + " ." for k in lengths]


def model_flops_per_image(model) -> float:
    """Analytic forward FLOPs of a ViT image tower (2 per multiply-add): patch embedding, the
    transformer's linear layers, and attention scores and mixing. ViT-B/32 at 224 px: about 8.8 GFLOP.
    (torch's FlopCounterMode misses the fused attention fast path, so it undercounts.)"""
    v = model.visual
    width, grid = v.conv1.out_channels, v.grid_size[0]
    tokens, patch = grid * grid + 1, v.conv1.kernel_size[0]
    per_layer = tokens * (4 * width * width + 2 * width * v.transformer.resblocks[0].mlp.c_fc.out_features) \
        + 2 * tokens * tokens * width
    return 2.0 * (len(v.transformer.resblocks) * per_layer + (tokens - 1) * 3 * patch * patch * width)


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    loaded = extract.load_model("ViT-B-32", "none")
    ref = copy.deepcopy(loaded.model)
    model = loaded.model
    extract.take_heads(model)
    rows = []

    # Text: bucketed pre-projection (one extraction window) vs encode_text on the full 77-token context.
    settings = extract.ExtractSettings(annotations=Path("."), images=Path("."), cache=Path("."))
    caps = flickr_like_captions(settings.text_window)
    tokens = loaded.tokenizer(caps)
    t_b = best_of(lambda: extract.encode_window(model, tokens, settings.text_batch_size, "cpu"), 1)
    sample = tokens[:256]  # the reference is slow; its rate does not depend on the captions

    def full():
        with torch.no_grad():
            for s in range(0, len(sample), settings.text_batch_size):
                ref.encode_text(sample[s:s + settings.text_batch_size])
    t_f = best_of(full, 1) * len(tokens) / len(sample)
    cap_rate = len(caps) / t_b
    rows.append(("text: bucketed vs encode_text@77", f"{cap_rate:.0f} vs {len(caps) / t_f:.0f} cap/s "
                 f"(batch {settings.text_batch_size}, window {settings.text_window})", f"{t_f / t_b:.2f}x", ">= 6x"))
    # Why the default text batch is small: within one window, bigger batches span more lengths (more padding).
    t_256 = best_of(lambda: extract.encode_window(model, tokens, 256, "cpu"), 1)
    rows.append((f"text: batch {settings.text_batch_size} vs 256 (default check)",
                 f"{cap_rate:.0f} vs {len(caps) / t_256:.0f} cap/s", f"{t_256 / t_b:.2f}x", "> 1x"))

    # Image, fp32: images/s against the machine's measured GEMM rate, counted in model FLOPs.
    gflops = gemm_gflops()
    flops = model_flops_per_image(model)
    px = torch.randn(64, 3, 224, 224)
    t_img = best_of(lambda: extract.image_features(model, px), 2)
    img_rate = len(px) / t_img
    bound = gflops * 1e9 / flops
    rows.append(("image fp32 vs GEMM bound", f"{img_rate:.2f} vs {bound:.2f} img/s "
                 f"({flops / 1e9:.2f} GFLOP/img, GEMM {gflops:.0f} GFLOP/s)", f"{img_rate / bound:.0%}", ">= 80%"))

    # bf16 trunk weights: speed and agreement with fp32.
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    px16 = px[:8]
    t16 = best_of(lambda: extract.image_features(m16, px16), 1)
    t32 = best_of(lambda: extract.image_features(model, px16), 1)
    cos = torch.nn.functional.cosine_similarity(extract.image_features(m16, px16),
                                                extract.image_features(model, px16)).min()
    rows.append(("image bf16 vs fp32", f"{8 / t16:.2f} vs {8 / t32:.2f} img/s, min cosine {cos:.5f}",
                 f"{t32 / t16:.2f}x", ">= 2x, cos >= 0.999"))

    # Probe epoch on a Flickr30k-sized synthetic cache vs an epoch that runs the trunks.
    rows += probe_rows(img_rate, cap_rate)

    # Projected whole-Flickr30k extract time (fp32, this machine).
    minutes = (FLICKR_IMAGES / img_rate + FLICKR_CAPTIONS / cap_rate) / 60
    rows.append(("projected Flickr30k extract, fp32", f"{FLICKR_IMAGES / img_rate / 60:.1f} min images + "
                 f"{FLICKR_CAPTIONS / cap_rate / 60:.1f} min captions", f"{minutes:.0f} min", "<= 50 min"))
    rows.append(memory_row())
    width = max(len(r[0]) for r in rows)
    print(f"\n{'figure':{width}}  {'measured':>10}  {'budget':>20}  detail")
    for name, detail, ratio, budget in rows:
        print(f"{name:{width}}  {ratio:>10}  {budget:>20}  {detail}")


def probe_rows(img_rate: float, cap_rate: float) -> list:
    n_img, n_cap = 25_426, 127_130
    rng = np.random.default_rng(0)
    idx = np.repeat(np.arange(n_img), 5)
    x_img = torch.from_numpy(rng.standard_normal((n_img, 768), dtype=np.float32))
    x_txt = torch.from_numpy(rng.standard_normal((n_cap, 512), dtype=np.float32))
    settings = probe.ProbeSettings()
    init = probe.Heads(torch.randn(768, 512) / 28, torch.randn(512, 512) / 23, torch.tensor(4.6))
    heads = probe.Heads(*(t.clone().requires_grad_(True) for t in (init.visual_proj, init.text_projection,
                                                                  init.logit_scale)))
    opt = torch.optim.AdamW([heads.visual_proj, heads.text_projection, heads.logit_scale], lr=settings.lr)
    sampler = probe.CaptionSampler(idx, n_img)
    gen = torch.Generator().manual_seed(0)
    t_epoch = best_of(lambda: probe._train_epoch(heads, init, opt, x_img, x_txt, sampler, settings, gen), 2)
    trunk_epoch = n_img / img_rate + n_img / cap_rate  # one image and one caption per image, through the trunks
    view = cache.SplitView("test", np.arange(1000), np.arange(5000), x_img[:1000].numpy(), x_txt[:5000].numpy(),
                           idx[:5000])
    t_eval = best_of(lambda: probe.evaluate_heads(init, view), 3)
    return [("probe epoch, Flickr-sized cache", f"{t_epoch:.2f} s (budget 3 s) vs {trunk_epoch / 60:.0f} min with "
             "the trunks", f"{trunk_epoch / t_epoch:.0f}x", ">= 500x, <= 3 s"),
            ("eval, 1,000-image split", f"{t_eval * 1000:.0f} ms (5,000 captions)", f"{t_eval:.2f} s", "<= 1 s")]


def memory_row() -> tuple:
    """Peak RSS of two real extract runs, one 4x the other: flat means streaming works."""
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (30, 120):
            ann = make_demo_dataset(Path(tmp) / f"d{n}", n_images=n, size=64)
            code = ("import resource, sys, extract; from pathlib import Path\n"
                    f"extract.extract(extract.ExtractSettings(annotations=Path(r'{ann}'), images=Path(r'{ann.parent}')"
                    f" / 'images', cache=Path(r'{tmp}') / 'c{n}.h5', pretrained='none', workers=1), log=open('/dev/null', 'w'))\n"
                    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            peaks[n] = int(out.stdout.split()[-1]) / 1024
    return ("extract peak memory, 30 vs 120 images", f"{peaks[30]:.0f} vs {peaks[120]:.0f} MiB",
            f"{peaks[120] / peaks[30]:.2f}x", "flat (~1.0x)")


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
