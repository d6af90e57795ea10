"""What a person looks at: the search page and the PNG pictures beside the JSON artifacts.

The HTML page is self-contained (thumbnails embedded as data URIs) and escapes
everything that comes from the data. Pictures need matplotlib, an optional extra;
without it the caller is told how to get them.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from PIL import Image

from .atomic import replacing

PLOTS_HINT = "pictures need matplotlib: .venv/bin/pip install matplotlib (the 'plots' extra)"


def _thumbnail_uri(path: Path, size: int = 192) -> str | None:
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85)
    except (OSError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def search_page(query: str, hits: list[dict], image_root: Path, heads: str) -> str:
    """``hits``: dicts with rank, score, image (name relative to the root) and captions."""
    e = html.escape
    cards = []
    for h in hits:
        uri = _thumbnail_uri(Path(image_root) / h["image"])
        picture = f'<img src="{uri}" alt="{e(h["image"])}">' if uri else '<div class="missing">image unavailable</div>'
        captions = "".join(f"<li>{e(c)}</li>" for c in h["captions"])
        cards.append(f'<figure>{picture}<figcaption><b>#{h["rank"]}</b> score {h["score"]:.4f}<br>'
                     f'<code>{e(h["image"])}</code><ul>{captions}</ul></figcaption></figure>')
    return ("<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>search: {e(query)}</title><style>"
            "body{font-family:sans-serif;margin:2em} figure{display:inline-block;vertical-align:top;width:240px;"
            "margin:0 1em 1em 0} img{max-width:100%} .missing{height:120px;background:#eee;text-align:center}"
            "ul{padding-left:1.2em;font-size:90%}</style></head><body>"
            f"<h1>{e(query)}</h1><p>heads: {e(heads)}; {len(hits)} results</p>{''.join(cards)}</body></html>\n")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def _save(fig, plt, path: Path) -> None:
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")  # the temp name's suffix is .tmp, so say the format
    plt.close(fig)


def plot_history(history: list[dict], path: Path) -> str:
    """Training and validation loss, and validation mean recall, per epoch. Returns what was done."""
    plt = _pyplot()
    if plt is None:
        return PLOTS_HINT
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs[1:], [h["train_loss"] for h in history[1:]], label="train loss")
    ax1.plot(epochs, [h["val_loss"] for h in history], label="val loss")
    ax1.set_xlabel("epoch")
    ax1.legend()
    ax2.plot(epochs, [h["val_mean_recall"] for h in history], color="C2")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("val mean recall (%)")
    fig.tight_layout()
    _save(fig, plt, Path(path))
    return f"wrote {path}"


def plot_recalls(result: dict, path: Path, names=("baseline", "probe")) -> str:
    """Baseline vs probed Recall@K in both directions, as grouped bars."""
    plt = _pyplot()
    if plt is None:
        return PLOTS_HINT
    keys = ("R@1", "R@5", "R@10")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (d, title) in zip(axes, (("text_to_image", "text -> image"), ("image_to_text", "image -> text"))):
        for j, name in enumerate(n for n in names if n in result):
            ax.bar([i + 0.4 * j for i in range(3)], [result[name][d][k] for k in keys], width=0.4, label=name)
        ax.set_xticks([i + 0.2 for i in range(3)], keys)
        ax.set_title(title)
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("recall (%)")
    axes[0].legend()
    fig.suptitle(f"{result['split']}: {result['n_images']} images, {result['n_captions']} captions")
    fig.tight_layout()
    _save(fig, plt, Path(path))
    return f"wrote {path}"
