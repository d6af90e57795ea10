"""A Flickr30k-like synthetic collection: JPEGs of 500x375 or 375x500 (about 67 KiB, photo-like), 5 captions each
of Flickr-like length, and a split column. N = 31,783 is Flickr30k's size; 16 cores make it in about 40 s.

    python benchmarks/flickr_like.py OUT N     (OUT/images/*.jpg and OUT/ann.csv)

From ../shared/gpu/make_flickr_like.py, made importable so that benchmarks/gpu_check.py and bench.py can build it
wherever they run (the device machine sees only the repository).
"""
import os
import random
import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = ("a man woman child dog girl boy people group two three young old standing sitting walking running "
         "playing wearing red blue white black green yellow shirt jacket hat street water grass beach snow "
         "field building city park table front of in on at with near the while holding looking up down "
         "ball bike car crowd stage guitar music smiling camera background sidewalk bench tree trees").split()


def image(args) -> None:
    folder, i = args
    r = np.random.default_rng(i)
    w, h = (500, 375) if r.random() < 0.65 else (375, 500)
    low = r.integers(0, 256, (r.integers(4, 24), r.integers(4, 24), 3), dtype=np.uint8)
    a = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), dtype=np.float32)
    a += r.normal(0, 10, a.shape)
    Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(f"{folder}/{i:08d}.jpg", quality=90)


def caption(r: random.Random) -> str:
    k = min(60, 6 + int(r.expovariate(1 / 7)))
    return "A " + " ".join(r.choice(WORDS) for _ in range(k)) + " ."


def make(out: Path, n: int, processes: int | None = None) -> Path:
    """Write the collection under ``out``; returns its annotations CSV (images in ``out / 'images'``)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    jobs = [(str(out / "images"), i) for i in range(n)]
    if processes == 1 or n < 64:
        for job in jobs:
            image(job)
    else:
        with Pool(processes or os.cpu_count()) as pool:
            pool.map(image, jobs, chunksize=64)
    r = random.Random(0)
    with open(out / "ann.csv", "w") as f:
        f.write("image,caption,split\n")
        for i in range(n):
            split = "test" if i < n * 1000 // 31783 else "val" if i < n * 2014 // 31783 else "train"
            for _ in range(5):
                f.write(f"{i:08d}.jpg,{caption(r)},{split}\n")
    return out / "ann.csv"


if __name__ == "__main__":
    ann = make(Path(sys.argv[1]), int(sys.argv[2]))
    sizes = [p.stat().st_size for p in (ann.parent / "images").iterdir()]
    print(f"made {len(sizes)} images, {sum(sizes) / len(sizes) / 1024:.0f} KiB each on average")
