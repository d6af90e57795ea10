"""In-place MLP activations against open_clip's own, prepared trunks otherwise the same: a measurement aid.

    .venv/bin/python tools/in_place_ab.py [ARCH [PRECISION ...]]     # default ViT-B-32-quickgelu fp32 int8-fbgemm
    .venv/bin/python tools/no_amx.py tools/in_place_ab.py             # as on a Xeon without AMX

Random-init ARCH, 64 random images and 512 Flickr-length captions (sorted, batches of 64); each precision prepared
as extraction prepares it (model.prepare: InPlaceActivation in every MLP) and once more with open_clip's activation
modules put back. The variants run interleaved, eight rounds, and each keeps its best time: on a shared 2-core
machine one run of a batch can read 20% slow. Prints images/s and captions/s, the ratio to the same precision with
open_clip's activations, and whether the features are the same to the bit.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import bench  # noqa: E402
import cli  # noqa: E402
import extract  # noqa: E402
import model as model_mod  # noqa: E402


def main(arch: str = "ViT-B-32-quickgelu", *precisions: str) -> None:
    cli.keep_freed_memory()  # as the command line runs it
    name, _ = bench.cpu_name_and_flags()
    print(f"machine: {name}; flags: {bench.isa_flags()}; {torch.get_num_threads()} threads; {arch}, random init")
    loaded = model_mod.load_model(arch, "none", 0)
    model_mod.take_heads(loaded.model)
    pixels = torch.randn(64, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    tokens = loaded.tokenizer(bench.flickr_like_captions(512))
    tokens = tokens[tokens.argmax(-1).argsort()]
    nets = {}
    for precision in precisions or ("fp32", "int8-fbgemm"):
        nets[precision] = model_mod.prepare(model_mod.sharing_copy(loaded.model), precision, "cpu")
        theirs = model_mod.prepare(model_mod.sharing_copy(loaded.model), precision, "cpu")
        for m in theirs.modules():
            if isinstance(getattr(m, "gelu", None), model_mod.InPlaceActivation):
                m.gelu = m.gelu.activation
        nets[f"{precision}, open_clip's activations"] = theirs
    runs = (lambda net: model_mod.image_features(net, pixels),
            lambda net: extract.encode_window(net, tokens, 64, "cpu"))
    best, feats = {k: [float("inf")] * 2 for k in nets}, {}
    with torch.no_grad():
        for k, net in nets.items():
            feats[k] = [run(net) for run in runs]  # also the first call, which pays for allocation
        for _ in range(8):
            for k, net in nets.items():
                for trunk, run in enumerate(runs):
                    t0 = time.perf_counter()
                    run(net)
                    best[k][trunk] = min(best[k][trunk], time.perf_counter() - t0)
    for k in nets:
        if k.endswith("activations"):
            continue
        base = f"{k}, open_clip's activations"
        same = all(torch.equal(a, b) for a, b in zip(feats[k], feats[base]))
        print(f"{k}: images {64 / best[k][0]:.1f}/s ({best[base][0] / best[k][0]:.3f}x), captions "
              f"{512 / best[k][1]:.0f}/s ({best[base][1] / best[k][1]:.3f}x) against open_clip's activations; "
              f"features the same to the bit: {same}")


if __name__ == "__main__":
    main(*sys.argv[1:])
