"""Measure the probe's settings where users stand (`make sweep`): the project's small pretrained
CLIP adapted to the shifted target world, the same cache `make demo` builds.

    .venv/bin/python benchmarks/sweep.py [--images 3000] [--seeds 0,1,2]

Stages run one after another; each starts from the previous stage's winner, chosen by mean
validation recall over the seeds (never by test). Every row prints validation mean recall
(what chooses) and test Recall@1/5/10 both ways (what a user gets), as mean ± sd over seeds.
The last table is the evidence for interpolation: zero-shot, the trained heads (alpha 1) and
the WiSE-FT heads chosen on validation, with the chosen settings.
"""
from __future__ import annotations

import argparse
import io
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from finetune_clip import cache, cli, extract, metrics, probe, worlds

STAGES = [
    ("learning rate x loss", [dict(lr=lr, loss=loss) for lr in (1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
                              for loss in ("single", "multi")]),
    ("decay toward zero vs toward the pretrained heads",
     [dict(weight_decay=0.0), dict(weight_decay=0.1), dict(weight_decay=0.0, reg_to_init=1e-3),
      dict(weight_decay=0.0, reg_to_init=1e-2), dict(weight_decay=0.0, reg_to_init=1e-1)]),
    ("batch size", [dict(batch_size=b) for b in (64, 128, 256)]),
    ("temperature", [dict(train_logit_scale=True), dict(train_logit_scale=False)]),
]
COLUMNS = [("text_to_image", "R@1"), ("text_to_image", "R@5"), ("text_to_image", "R@10"),
           ("image_to_text", "R@1"), ("image_to_text", "R@5"), ("image_to_text", "R@10")]


def demo_cache(n_images: int) -> cache.Cache:
    """The cache `cli.py demo --images N` makes (built here if it is not there yet)."""
    path = Path("cache") / f"demo_target_{n_images}_small-pretrained_fp32.h5"
    if not path.is_file():
        config, weights = cli.SMALL_CLIP
        ann = worlds.make_dataset(Path("data/demo/target"), "target", n_images=n_images, seed=0)
        extract.extract(extract.ExtractSettings(annotations=ann, images=ann.parent / "images", cache=path,
                                                model=str(config), pretrained=str(weights)), log=io.StringIO())
    return cache.load(path)


def run(c: cache.Cache, settings: probe.ProbeSettings, seeds) -> dict:
    """Validation mean recall and test metrics of one setting, per seed."""
    vals, tests = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            out = Path(tmp) / "p.pt"
            result = probe.train(c, replace(settings, seed=seed), out, log=io.StringIO())
            vals.append(result["val_mean_recall"])
            tests.append(probe.evaluate(c, "test", out)["probe"])
    return {"val": np.array(vals), "test": tests}


def attribute_search(c: cache.Cache, settings: probe.ProbeSettings, seeds) -> str:
    """For all 48 "a {colour} {shape}" queries, how many of the top 5 images show both (as the tests count)."""
    import pandas as pd

    truth = pd.read_csv(Path("data/demo/target/scenes.csv")).set_index("image")
    queries = [(colour, shape) for colour in worlds.COLOURS for shape in worlds.SHAPES]
    feats = extract.encode_queries(c.attrs, [f"a {colour} {shape}" for colour, shape in queries])

    def hits(heads) -> float:
        shown = [[tuple(truth.loc[h["image"], ["colour", "shape"]]) for h in probe.search(c, heads, f, 5)]
                 for f in feats]
        return float(np.mean([top.count(query) for top, query in zip(shown, queries)]))
    out = [f"zero-shot {hits(probe.Heads.from_cache(c)):.2f}"]
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            probe.train(c, replace(settings, seed=seed), Path(tmp) / "p.pt", log=io.StringIO())
            out.append(f"probe seed {seed} {hits(probe.load_checkpoint(Path(tmp) / 'p.pt', c)[0]):.2f}")
    return "; ".join(out)


def fmt(xs) -> str:
    xs = np.asarray(xs, float)
    return f"{xs.mean():5.1f} ± {xs.std(ddof=1) if len(xs) > 1 else 0:3.1f}"


def row(label: str, r: dict) -> str:
    cells = [fmt(r["val"])] + [fmt([t[d][k] for t in r["test"]]) for d, k in COLUMNS]
    return f"| {label} | " + " | ".join(cells) + " |"


HEADER = ("| setting | val mean recall | test T→I R@1 | T→I R@5 | T→I R@10 "
          "| I→T R@1 | I→T R@5 | I→T R@10 |\n"
          "|---|---|---|---|---|---|---|---|")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--only-interpolation", action="store_true", help="skip the stages; use the defaults")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    c = demo_cache(args.images)
    zero = probe.evaluate(c, "test", None)["baseline"]
    zero_val = metrics.mean_recall(probe.evaluate_heads(probe.Heads.from_cache(c), c.split("val")))
    print(f"cache {c.path}: {c.split('train').n_images} train / {c.split('val').n_images} val / "
          f"{c.split('test').n_images} test images; seeds {seeds}")
    zero_row = {"val": [zero_val], "test": [zero]}
    base = probe.ProbeSettings()
    for title, options in [] if args.only_interpolation else STAGES:
        print(f"\n### {title} (from {_describe(base, options[0])})\n\n{HEADER}")
        print(row("zero-shot", zero_row))
        results = []
        for option in options:
            r = run(c, replace(base, **option), seeds)
            results.append((r["val"].mean(), option, r))
            print(row(", ".join(f"{k}={v}" for k, v in option.items()), r), flush=True)
        best = max(results, key=lambda x: x[0])
        base = replace(base, **best[1])
        print(f"\nchosen on validation: {best[1]}")
    print(f"\n### interpolation (settings: {_describe(base, {})})\n\n{HEADER}")
    print(row("zero-shot", zero_row))
    print(row("probe, trained heads (alpha 1)", run(c, replace(base, interpolate=False), seeds)))
    print(row("probe, WiSE-FT alpha chosen on val", run(c, base, seeds)))
    print(f"\nattribute search, top 5 of 48 colour x shape queries: {attribute_search(c, base, seeds)}")
    overshoot = replace(base, lr=0.1)
    print(f"\n### interpolation when the probe overshoots (lr=0.1, the rest as above)\n\n{HEADER}")
    print(row("zero-shot", zero_row))
    print(row("probe, trained heads (alpha 1)", run(c, replace(overshoot, interpolate=False), seeds)))
    print(row("probe, WiSE-FT alpha chosen on val", run(c, overshoot, seeds)))


def _describe(settings: probe.ProbeSettings, shown: dict) -> str:
    keys = ("lr", "loss", "weight_decay", "reg_to_init", "batch_size", "train_logit_scale")
    return ", ".join(f"{k}={getattr(settings, k)}" for k in keys if k not in shown)


if __name__ == "__main__":
    main()
