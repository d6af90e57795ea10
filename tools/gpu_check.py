"""GPU check (run on a machine with CUDA): --device cuda extract equals the CPU cache; bf16 agrees.

    python tools/gpu_check.py OUTDIR
Prints max relative error and cosine of GPU features against CPU fp32 features,
and GPU throughput. Not part of the test suite (CI has no GPU).
"""
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cache  # noqa: E402
import model  # noqa: E402
import worlds  # noqa: E402
import extract  # noqa: E402


def run(out: Path, device: str, precision: str, ann: Path, batch: int = 64) -> tuple:
    path = out / f"c_{device}_{precision}.h5"
    t = time.perf_counter()
    s = extract.extract(extract.ExtractSettings(annotations=ann, images=ann.parent / "images", cache=path,
                                                pretrained="none", device=device, precision=precision,
                                                batch_size=batch, workers=4), log=open("/dev/null", "w"))
    return cache.load(path), time.perf_counter() - t, s


def compare(a, b, name):
    for kind in ("image_features", "text_features"):
        x, y = getattr(a, kind), getattr(b, kind)
        rel = np.abs(x - y).max() / np.abs(y).max()
        cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
        print(f"{name:28} {kind:15} max rel err {rel:.2e}  min cosine {cos.min():.6f}")


def main():
    out = Path(sys.argv[1])
    ann = worlds.make_dataset(out / "demo", "source", n_images=256, size=160)
    print("torch", torch.__version__, torch.cuda.get_device_name(0))
    cpu, t_cpu, _ = run(out, "cpu", "fp32", ann)
    gpu, t_gpu, s = run(out, "cuda", "fp32", ann)
    bf, t_bf, _ = run(out, "cuda", "bf16", ann)
    half, _, _ = run(out, "cuda", "fp16", ann)
    print(f"extract 256 images + 1280 captions: cpu fp32 {t_cpu:.1f} s, cuda fp32 {t_gpu:.1f} s, "
          f"cuda bf16 {t_bf:.1f} s (each including model load)")
    compare(gpu, cpu, "cuda fp32 vs cpu fp32")
    compare(bf, cpu, "cuda bf16 vs cpu fp32")
    compare(half, cpu, "cuda fp16 vs cpu fp32")
    print("fingerprints equal cpu/cuda:", cpu.fingerprint == gpu.fingerprint, "| images done:", s.images_done)
    # trunk throughput on the GPU alone (no decoding)
    lm = model.load_model("ViT-B-32", "none")
    model.take_heads(lm.model)
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        m = lm.model.to("cuda", dtype)
        px = torch.randn(256, 3, 224, 224, device="cuda")
        model.image_features(m, px)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(5):
            model.image_features(m, px)
        torch.cuda.synchronize()
        print(f"image trunk {precision}: {5 * 256 / (time.perf_counter() - t):.0f} img/s")


if __name__ == "__main__":
    main()
