"""The GPU measurement, one prepared script: the project's extract against the naive loop, in one run.

    python benchmarks/gpu_check.py OUT                       # on the GPU: a Flickr30k-sized set (31,783 images)
    python benchmarks/gpu_check.py OUT --device cpu --images 16 \
        --model finetune_clip/pretrained/ShapesCLIP.json                # tiny, on a CPU

It makes the synthetic collection (benchmarks/flickr_like.py), then times each run as a fresh process, from its
start to its sealed cache (model load included):
  - `cli.py extract --device D --precision bf16` and `--precision fp32`, every other option left to the defaults;
  - the same bf16 run with `--decode cpu` (PIL in the workers), for what decoding on the device buys;
  - the naive loop (benchmarks/naive_peer.py), fp32 and bf16 autocast, with every core but one decoding.
Then fidelity against CPU fp32 on the first 256 images and their captions: the device's fp32 with PIL decoding
(max relative error: the 1e-5 claim), and what bf16 and decoding on the device each change (min cosine). It prints a
markdown table and writes OUT/gpu_check.json. Nothing here is part of the test suite's timing; tests/test_gpu_check.py
runs it tiny.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list, log: Path) -> tuple[float, str]:
    """Seconds from the process's start to its end, and its stdout; its output kept in ``log``."""
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    log.write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({out.returncode}); see {log}: {out.stderr[-500:]}")
    return seconds, out.stdout


def extract_cmd(ann: Path, cache: Path, device: str, model: str, *options) -> list:
    return [sys.executable, "cli.py", "extract", "--annotations", str(ann), "--images", str(ann.parent / "images"),
            "--cache", str(cache), "--pretrained", "none", "--model", model, "--device", device, *options]


def features(path: Path, rows: int | None = None) -> tuple:
    from finetune_clip import cache
    c = cache.load(path)
    n = rows or len(c.image_features)
    caps = np.flatnonzero(c.text_image_index < n)
    return c.image_features[:n], c.text_features[caps]


def rel_err(x, y) -> float:
    return float(np.abs(x - y).max() / np.abs(y).max())


def min_cos(x, y) -> float:
    return float(((x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)).min())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--images", type=int, default=31783)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--reference-images", type=int, default=256, help="images the CPU fp32 reference extracts")
    args = ap.parse_args(argv)
    import flickr_like
    import torch
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "no GPU (a CPU run)"
    print(f"{gpu}; {cores} cores; torch {torch.__version__}", flush=True)
    t = time.perf_counter()
    ann = flickr_like.make(out / "set", args.images)
    print(f"made {args.images} images in {time.perf_counter() - t:.0f} s", flush=True)

    runs = {}
    for name, options in (("project bf16", ["--precision", "bf16"]), ("project fp32", ["--precision", "fp32"]),
                          ("project bf16, --decode cpu", ["--precision", "bf16", "--decode", "cpu"])):
        # "project bf16" and "project fp32" leave everything else to the defaults (on a GPU: --decode device)
        cache = out / f"{name.replace(' ', '_').replace(',', '').replace('--', '')}.h5"
        cache.unlink(missing_ok=True)
        seconds, _ = timed(extract_cmd(ann, cache, args.device, args.model, *options), out / f"{cache.stem}.log")
        runs[name] = {"total_s": seconds, "cache": str(cache)}
        print(f"{name}: {seconds:.1f} s", flush=True)
    for precision in ("fp32", "bf16"):
        name = f"naive loop {precision}"
        _, stdout = timed([sys.executable, "benchmarks/naive_peer.py", str(ann), str(ann.parent / "images"), precision,
                           str(max(1, cores - 1)), args.device, args.model], out / f"naive_{precision}.log")
        runs[name] = json.loads(stdout.strip().splitlines()[-1])
        print(f"{name}: {runs[name]['total_s']:.1f} s", flush=True)

    # Fidelity against CPU fp32 on the first images: the device's fp32 with PIL decoding (the 1e-5 claim), and
    # what bf16 and decoding on the device each change.
    import pandas as pd
    df = pd.read_csv(ann)
    n = min(args.reference_images, args.images)
    ref_ann = ann.parent / "reference.csv"  # beside the images
    df[df["image"].isin(df["image"].unique()[:n])].to_csv(ref_ann, index=False)
    caches = {}
    for name, device in (("cpu", "cpu"), ("device", args.device)):
        caches[name] = out / f"reference_{name}_fp32_pil.h5"
        caches[name].unlink(missing_ok=True)
        timed(extract_cmd(ref_ann, caches[name], device, args.model, "--decode", "cpu", "--precision", "fp32"),
              out / f"reference_{name}.log")
    cpu_img, cpu_txt = features(caches["cpu"])
    fidelity = {}
    for name, path in (("fp32, PIL decoding", caches["device"]),
                       ("fp32, --decode auto", Path(runs["project fp32"]["cache"])),
                       ("bf16, PIL decoding", Path(runs["project bf16, --decode cpu"]["cache"])),
                       ("bf16, --decode auto", Path(runs["project bf16"]["cache"]))):
        img, txt = features(path, n)
        fidelity[name] = {"image_max_rel_err": rel_err(img, cpu_img), "text_max_rel_err": rel_err(txt, cpu_txt),
                          "image_min_cos": min_cos(img, cpu_img), "text_min_cos": min_cos(txt, cpu_txt)}
    a, _ = features(Path(runs["project bf16"]["cache"]))
    b, _ = features(Path(runs["project bf16, --decode cpu"]["cache"]))
    fidelity["bf16: --decode auto vs cpu, every image"] = {"image_min_cos": min_cos(a, b)}

    report = {"gpu": gpu, "cores": cores, "torch": torch.__version__, "images": args.images,
              "captions": int(len(df)), "model": args.model, "runs": runs, "fidelity": fidelity}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    naive_bf16 = runs["naive loop bf16"]["total_s"]
    print(f"\n{gpu}, {cores} cores, {args.images} images + {len(df)} captions, random-init {args.model}\n")
    print("| run | total, process start to sealed cache | vs naive bf16 |\n|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {r['total_s']:.1f} s | {naive_bf16 / r['total_s']:.2f}x |")
    print(f"\n| {args.device} against CPU fp32 (first {n} images) | image | text |\n|---|---|---|")
    for name, f in fidelity.items():
        if "text_min_cos" not in f:
            print(f"| {name} | min cos {f['image_min_cos']:.6f} | |")
            continue
        print(f"| {name} | max rel err {f['image_max_rel_err']:.1e}, min cos {f['image_min_cos']:.6f} | "
              f"max rel err {f['text_max_rel_err']:.1e}, min cos {f['text_min_cos']:.6f} |")
    return report


if __name__ == "__main__":
    main()
