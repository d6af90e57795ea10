"""Two generated worlds of captioned images: the one the small CLIP was pretrained on, and a shifted one.

- **source**: flat backgrounds, square images, short templated captions with a fixed vocabulary.
  `pretrain.py` trains the project's small CLIP on it (in memory, never written to disk).
- **target**: the same kinds of scenes, shifted the way Flickr30k is shifted from CLIP's web pretraining:
  textured and noisy backgrounds, a warm colour cast, slight blur, other sizes and aspect ratios saved as
  ordinary JPEGs; and sentence captions composed of a subject and optional clauses, using the source's
  word half the time and otherwise one it never saw. `cli.py demo` adapts the pretrained model to it.

Both draw scenes from one sampler, so an attribute (colour, shape, ...) means the same thing in both.
numpy and pillow only; nothing here imports torch.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from . import data

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 70, 220), "yellow": (240, 220, 30),
           "purple": (140, 40, 170), "orange": (245, 140, 20), "white": (250, 250, 250), "black": (15, 15, 15)}
BACKGROUNDS = {"grey": (128, 128, 128), "sky-blue": (150, 200, 245), "pink": (245, 180, 200),
               "dark green": (20, 80, 40), "beige": (225, 210, 170), "navy": (20, 25, 80)}
SHAPES = ("circle", "square", "triangle", "cross", "star", "ring")
SIZES = {"small": 0.16, "medium": 0.26, "large": 0.38}
POSITIONS = {"top left": (0.3, 0.3), "top right": (0.7, 0.3), "centre": (0.5, 0.5),
             "bottom left": (0.3, 0.7), "bottom right": (0.7, 0.7)}
SOURCE_TEMPLATES = (
    "a {size} {colour} {shape} on a {bg} background",
    "a {colour} {shape} in the {pos} of the picture",
    "there is a {size} {shape} coloured {colour} against {bg}",
    "{bg} backdrop with a {colour} {shape} at the {pos}",
    "an image showing one {size} {colour} {shape}",
    "a drawing of a {shape}, {colour}, placed {pos}",
    "simple picture: {colour} {shape} over a {bg} background",
)

# The target world's words for the same attributes. The source word (first) is used now and then,
# so zero-shot keeps a foothold; the others are words the pretrained model never saw.
SOURCE_WORD = 0.5
TARGET_WORDS = {
    "colour": {"red": ["red", "crimson", "scarlet"], "green": ["green", "emerald", "lime-coloured"],
               "blue": ["blue", "cobalt", "royal blue"], "yellow": ["yellow", "golden", "lemon"],
               "purple": ["purple", "violet", "plum"], "orange": ["orange", "amber", "tangerine"],
               "white": ["white", "snowy", "ivory"], "black": ["black", "jet-black", "charcoal"]},
    "shape": {"circle": ["circle", "disc", "round dot"], "square": ["square", "box", "block"],
              "triangle": ["triangle", "wedge", "three-sided shape"], "cross": ["cross", "plus sign", "plus"],
              "star": ["star", "five-pointed star", "starburst"], "ring": ["ring", "hoop", "donut"]},
    "size": {"small": ["small", "tiny", "little"], "medium": ["medium", "mid-sized", "modest"],
             "large": ["large", "big", "huge"]},
    "pos": {"top left": ["top left", "upper left corner", "upper-left area"],
            "top right": ["top right", "upper right corner", "upper-right area"],
            "centre": ["centre", "middle", "very center"],
            "bottom left": ["bottom left", "lower left corner", "lower-left area"],
            "bottom right": ["bottom right", "lower right corner", "lower-right area"]},
    "bg": {"grey": ["grey", "gray", "concrete-coloured"], "sky-blue": ["sky-blue", "pale blue", "baby blue"],
           "pink": ["pink", "rosy", "salmon"], "dark green": ["dark green", "forest green", "deep green"],
           "beige": ["beige", "sandy", "cream"], "navy": ["navy", "midnight blue", "dark blue"]},
}
TEXTURES = ("stripes", "checks", "speckles", "gradient")
CONTRAST = (12, 24)  # texture amplitude, in 8-bit levels
CAST = (1.12, 1.0, 0.82)  # a warm white balance on every target photo (per-channel gain, RGB)
# Target captions are composed like Flickr's: the subject always, the rest only sometimes, so that an
# attribute a caption leaves out does not matter (a query for "a red circle" must not pick a place).
MENTION = 0.75  # how often a caption mentions the size, the place, the background (each on its own)
TARGET_OPENERS = ("{subject}", "In this photo you can see {subject}", "Someone has drawn {subject}",
                  "There appears to be {subject}", "The picture shows {subject}", "Here is {subject}")
TARGET_PLACES = ("in the {pos}", "near the {pos}", "toward the {pos}", "close to the {pos}")
TARGET_GROUNDS = ("on a {texture} {bg} background", "against {bg} {texture}",
                  "over a {bg} surface covered in {texture}", "resting on {texture} in {bg} tones")


def sample_scene(rng: np.random.Generator) -> dict:
    scene = {"shape": SHAPES[rng.integers(len(SHAPES))],
             "colour": list(COLOURS)[rng.integers(len(COLOURS))],
             "bg": list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
             "size": list(SIZES)[rng.integers(len(SIZES))],
             "pos": list(POSITIONS)[rng.integers(len(POSITIONS))],
             "jitter": tuple(rng.uniform(-0.05, 0.05, size=2))}
    if scene["colour"] == "white" and scene["bg"] == "beige":
        scene["bg"] = "navy"  # keep every shape visible against its background
    return scene


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, int(r / 3)))
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "cross":
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:  # five-pointed star
        pts = [(cx + (r if k % 2 == 0 else r / 2.5) * math.sin(k * math.pi / 5),
                cy - (r if k % 2 == 0 else r / 2.5) * math.cos(k * math.pi / 5)) for k in range(10)]
        draw.polygon(pts, fill=fill)


def render_source(scene: dict, size: int = 64) -> Image.Image:
    """A flat background and one shape, square: the world the small CLIP learned."""
    im = Image.new("RGB", (size, size), BACKGROUNDS[scene["bg"]])
    fx, fy = POSITIONS[scene["pos"]]
    jx, jy = scene["jitter"]
    _draw_shape(ImageDraw.Draw(im), scene["shape"], (fx + jx) * size, (fy + jy) * size,
                SIZES[scene["size"]] * size, COLOURS[scene["colour"]])
    return im


def _texture(kind: str, w: int, h: int, base, rng: np.random.Generator) -> np.ndarray:
    """A background of ``base`` colour with a pattern around it, as float RGB [h, w, 3]."""
    img = np.zeros((h, w, 3)) + np.asarray(base, float)
    yy, xx = np.mgrid[0:h, 0:w]
    contrast = rng.uniform(CONTRAST[0], CONTRAST[1])
    if kind == "stripes":
        angle, period = rng.uniform(0, math.pi), rng.uniform(8, 18)
        wave = np.sign(np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period))
    elif kind == "checks":
        cell = rng.integers(8, 16)
        wave = ((xx // cell + yy // cell) % 2) * 2.0 - 1
    elif kind == "speckles":
        wave = np.clip(rng.normal(size=(h, w)) * 1.2, -1.5, 1.5)
    else:  # a linear gradient across the picture
        angle = rng.uniform(0, 2 * math.pi)
        ramp = xx * math.cos(angle) + yy * math.sin(angle)
        wave = (ramp - ramp.mean()) / (np.abs(ramp).max() + 1e-9) * 1.6
    return img + contrast * wave[..., None]


def render_target(scene: dict, rng: np.random.Generator) -> Image.Image:
    """Textured, noisy, of another size and aspect ratio, slightly blurred: the shifted world."""
    h = int(rng.integers(96, 200))
    w = int(round(h * rng.uniform(0.8, 1.25)))
    bg = _texture(scene["texture"], w, h, BACKGROUNDS[scene["bg"]], rng)
    im = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    fx, fy = POSITIONS[scene["pos"]]
    jx, jy = scene["jitter"]
    side = min(w, h)  # open_clip's preprocessing keeps the central square: place the shape inside it
    cx, cy = w / 2 + (fx + jx - 0.5) * side, h / 2 + (fy + jy - 0.5) * side
    tint = np.clip(np.asarray(COLOURS[scene["colour"]]) + rng.normal(0, 12, 3), 0, 255).astype(int)
    _draw_shape(ImageDraw.Draw(im), scene["shape"], cx, cy, SIZES[scene["size"]] * side, tuple(tint))
    im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    noisy = np.asarray(im, float) * np.asarray(CAST) + rng.normal(0, rng.uniform(6, 16), (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def source_caption(scene: dict, template: int) -> str:
    return SOURCE_TEMPLATES[template].format(**scene)


def _target_word(options: list, rng: np.random.Generator) -> str:
    """The source word (options[0]) half the time, else one of the words the source never used."""
    return options[0] if rng.random() < SOURCE_WORD else options[1 + rng.integers(len(options) - 1)]


def target_caption(scene: dict, rng: np.random.Generator) -> str:
    words = {k: _target_word(opts[scene[k]], rng) for k, opts in TARGET_WORDS.items()}
    size = f"{words['size']} " if rng.random() < MENTION else ""
    parts = [TARGET_OPENERS[rng.integers(len(TARGET_OPENERS))].format(subject=f"a {size}{words['colour']} "
                                                                              f"{words['shape']}")]
    if rng.random() < MENTION:
        parts.append(TARGET_PLACES[rng.integers(len(TARGET_PLACES))].format(**words))
    if rng.random() < MENTION:
        parts.append(TARGET_GROUNDS[rng.integers(len(TARGET_GROUNDS))].format(texture=scene["texture"], **words))
    text = " ".join(parts)
    return text[0].upper() + text[1:] + "."


def make_dataset(root: str | os.PathLike, world: str = "target", n_images: int = 600, seed: int = 0,
                 size: int = 64) -> Path:
    """Write a world in the Flickr30k layout and return its annotations CSV.

    ``root/images/*.jpg`` plus ``root/annotations.csv`` (``image,caption,split``), five
    differently worded captions per image, split 80/10/10 by image, and ``root/scenes.csv``,
    what each image really shows (for checking search results). Deterministic for a seed.
    ``size`` is the side of the (square) source images; target images pick their own sizes.
    """
    if world not in ("source", "target"):
        raise ValueError(f"unknown world {world!r}; choose 'source' or 'target'")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows, truth = [], []
    for i in range(n_images):
        scene = sample_scene(rng)
        name = f"{world}_{i:05d}.jpg"
        if world == "source":
            render_source(scene, size).save(root / "images" / name, quality=92)
            captions = [source_caption(scene, t) for t in rng.choice(len(SOURCE_TEMPLATES), 5, replace=False)]
        else:
            scene["texture"] = TEXTURES[rng.integers(len(TEXTURES))]
            render_target(scene, rng).save(root / "images" / name, quality=int(rng.integers(70, 92)))
            captions = list(dict.fromkeys(target_caption(scene, rng) for _ in range(12)))[:5]
        rows.extend((name, c) for c in captions)
        truth.append({"image": name, **{k: v for k, v in scene.items() if k != "jitter"}})
    df = data.assign_splits(pd.DataFrame(rows, columns=["image", "caption"]).assign(split=None), seed=seed)
    out = root / "annotations.csv"
    data.write_csv_atomic(df, out)
    pd.DataFrame(truth).to_csv(root / "scenes.csv", index=False)
    return out
