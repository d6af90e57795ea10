"""int8-ort's text trunk against torch fp32, timed in alternation so that a noisy machine's drift cancels: each
round encodes the next 512 Flickr-like captions (as extraction does: sorted windows, batches of 64) with every
candidate in a shuffled order, and the ratio to fp32 is taken within the round. Prints the median of those
paired ratios and their quartiles, for int8-ort as shipped (attention written out for export, ``ExportBlocks``)
and as open_clip's blocks export without it. Random-init ViT-B/32, the thread count torch has.

    .venv/bin/python tools/int8_text_pairs.py [ROUNDS]     # 20 rounds take about 8 minutes on 2 AVX2 cores
"""
import copy
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench  # noqa: E402
import extract  # noqa: E402
import model as model_mod  # noqa: E402
import onnx_int8  # noqa: E402


def main(rounds: int = 20, n: int = 512, batch: int = 64) -> None:
    torch.manual_seed(0)
    name, _ = bench.cpu_name_and_flags()
    print(f"{name} (flags: {bench.isa_flags()}); torch {torch.__version__}, {torch.get_num_threads()} threads")
    loaded = model_mod.load_model("ViT-B-32", "none")
    model = loaded.model
    model_mod.take_heads(model)
    tokens = loaded.tokenizer(bench.flickr_like_captions(rounds * n))
    candidates = {"fp32": model}
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        for label, written_out in (("int8-ort (attention written out, shipped)", True),
                                   ("int8-ort (open_clip's blocks as exported)", False)):
            folder = Path(tmp) / str(written_out)
            folder.mkdir()
            onnx_int8._export(model, folder, written_out)
            onnx_int8._quantize(folder, written_out=written_out)
            q = copy.deepcopy(model)
            q.transformer = onnx_int8.OnnxTrunk(folder / "transformer.onnx", torch.get_num_threads())
            candidates[label] = q
        times = {k: [] for k in candidates}
        order, rng = list(candidates), random.Random(0)
        with torch.no_grad():
            for q in candidates.values():
                extract.encode_window(q, tokens[:batch], batch, "cpu")  # warm-up
            for r in range(rounds):
                rng.shuffle(order)
                for k in order:
                    t = time.perf_counter()
                    extract.encode_window(candidates[k], tokens[r * n:(r + 1) * n], batch, "cpu")
                    times[k].append(time.perf_counter() - t)
    for k in list(candidates)[1:]:
        ratios = [f / t for f, t in zip(times["fp32"], times[k])]
        q1, med, q3 = statistics.quantiles(ratios, n=4)
        print(f"{k:44} text {med:.2f}x fp32 (median of {rounds} paired ratios; quartiles {q1:.2f}-{q3:.2f})")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))
