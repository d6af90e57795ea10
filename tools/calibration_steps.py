"""Where a first `--precision auto` calibration spends its time: a measurement aid.

    .venv/bin/python tools/calibration_steps.py [N_IMAGES]
    .venv/bin/python tools/no_amx.py tools/calibration_steps.py      # as on a Xeon without AMX

Runs bench.auto_precision as `cli.py extract --precision auto` does for a first job (an empty record) of N_IMAGES
images (default 1,024) and five captions each, on random-init ViT-B/32 with random pixels and Flickr-length captions,
and prints each path's measurement (its preparation, and every timing by the number of items), any second timing
where two paths came close (bench.time_again_where_close), the whole calibration's seconds and what auto took.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cli  # noqa: E402

cli.keep_freed_memory()  # as the command line runs it
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="calibration-steps-")  # a first-time user: no record

import torch  # noqa: E402

import bench  # noqa: E402
import model as model_mod  # noqa: E402


def main(n_images: int = 1024) -> None:
    print(f"machine: {bench.cpu_name_and_flags()[0]}; flags: {bench.isa_flags()}; {torch.get_num_threads()} threads")
    loaded = model_mod.load_model("ViT-B-32", "none", 0)
    model_mod.take_heads(loaded.model)
    pixels = torch.randn(bench.CAL_IMAGES, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    tokens = loaded.tokenizer(bench.flickr_like_captions(bench.CAL_CAPTIONS))
    calls: dict[str, list] = {}  # path -> [(items, seconds)] in the order timed
    current = []
    real_measure, real_timed = bench.measure_path, bench._timed

    def measure(model, name, device, px, *args, **kwargs):
        current.append(f"{name} on {len(px)} images")
        calls[current[-1]] = []
        t0 = time.perf_counter()
        m = real_measure(model, name, device, px, *args, **kwargs)
        timed = ", ".join(f"{n}: {s:.3f}" for n, s in calls[current[-1]])
        print(f"{current[-1]}: {time.perf_counter() - t0:.2f} s (prepare {m[0]['setup_s']:.2f} s; timed, items: "
              f"seconds: {timed})")
        return m

    def timed(fn, n, device):
        seconds, out = real_timed(fn, n, device)
        calls[current[-1]].append((n, seconds))
        return seconds, out

    real_again = bench.time_again_where_close

    def again(*args, **kwargs):
        current.append("timed again where close")
        calls[current[-1]] = []
        real_again(*args, **kwargs)
        if calls[current[-1]]:
            print(f"{current[-1]}, items: seconds: " + ", ".join(f"{n}: {s:.3f}" for n, s in calls[current[-1]]))

    bench.measure_path, bench._timed, bench.time_again_where_close = measure, timed, again
    t0 = time.perf_counter()
    _, _, line = bench.auto_precision(loaded.model, "cpu", pixels, tokens, n_images, 5 * n_images,
                                      bench.model_id(loaded), 64)
    print(f"calibration: {time.perf_counter() - t0:.1f} s; {line}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
