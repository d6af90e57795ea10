"""JPEGs decoded and preprocessed in batches on the trunks' device (nvJPEG on a GPU), PIL for the rest.

The decoding workers only read a plain JPEG's bytes; the main process decodes a whole batch
with ``torchvision.io.decode_jpeg(list, device=...)`` (nvJPEG on CUDA) and resizes it there the
way open_clip's preprocessing does. Anything else takes the CPU path of extract, one image at a time,
exactly as without this module: PNG, CMYK and other modes, EXIF rotation, a file without its end
marker (cut short), a file PIL refuses. A batch the device cannot decode is decoded image by image;
an image it still cannot decode goes through PIL, whose verdict (pixels, or a failed row with its
reason) is final. So a broken file is a failed row with the same reason on either path.

The pixels are not PIL's: the device decodes with its own inverse DCT and chroma upsampling, and
resizes in float before rounding. extract --decode says which path a cache used; the cache records it.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import torch
import torchvision
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from . import data

SOI, EOI = b"\xff\xd8", b"\xff\xd9"


@dataclass(frozen=True)
class Preprocess:
    """open_clip's image preprocessing, read off its torchvision Compose, as tensor operations."""
    resize: int
    crop: tuple
    mean: tuple
    std: tuple

    @classmethod
    def of(cls, compose) -> "Preprocess | None":
        """The spec of Resize(int, bicubic) > CenterCrop > convert to RGB > to tensor > Normalize; None otherwise."""
        steps = list(getattr(compose, "transforms", []))
        kinds = [type(t).__name__ for t in steps]
        if kinds != ["Resize", "CenterCrop", "MaybeConvertMode", "MaybeToTensor", "Normalize"] and \
                kinds != ["Resize", "CenterCrop", "function", "ToTensor", "Normalize"]:
            return None
        resize, crop, *_, norm = steps
        size = resize.size if isinstance(resize.size, int) else (resize.size[0] if len(resize.size) == 1 else None)
        if size is None or resize.interpolation != InterpolationMode.BICUBIC or resize.max_size is not None:
            return None
        return cls(size, tuple(crop.size), tuple(norm.mean), tuple(norm.std))

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        """uint8 CHW RGB images (any sizes, on one device) -> the normalized batch, in order."""
        out = torch.empty(len(images), 3, *self.crop, device=images[0].device)
        by_shape: dict = {}
        for i, im in enumerate(images):
            by_shape.setdefault(tuple(im.shape), []).append(i)
        mean = torch.tensor(self.mean, device=out.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=out.device).view(1, 3, 1, 1)
        for rows in by_shape.values():  # one resize per image size (Flickr has a few dozen)
            x = torch.stack([images[i] for i in rows]).float()
            x = TF.resize(x, self.resize, InterpolationMode.BICUBIC, antialias=True)
            x = TF.center_crop(x, list(self.crop)).round_().clamp_(0, 255)  # PIL rounds to 8 bits here
            out[rows] = (x / 255 - mean) / std
        return out


def decodes_on(device) -> str | None:
    """None if torchvision decodes a JPEG on ``device`` here (a build without nvJPEG cannot); else why not."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, "JPEG")
    raw = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    try:
        torchvision.io.decode_jpeg(raw, mode=torchvision.io.ImageReadMode.RGB, device=device)
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    return None


def plain_jpeg(raw: bytes) -> bool:
    """A JPEG the device decodes as PIL would open it: RGB or greyscale, no EXIF rotation, its end marker present.

    Reads the header only (PIL opens lazily); anything it does not like goes the CPU path, which says why.
    """
    if not (raw.startswith(SOI) and raw.rstrip(b"\0").endswith(EOI)):
        return False
    try:
        with Image.open(io.BytesIO(raw)) as im:
            return im.format == "JPEG" and im.mode in ("RGB", "L") and im.getexif().get(0x0112, 1) == 1
    except Exception:  # PIL's verdict, and its reason, come from the CPU path
        return False


def decode(raws: list[torch.Tensor], device) -> list:
    """Decode JPEG byte tensors on ``device``: a uint8 CHW RGB tensor per image, or None where it failed."""
    read = torchvision.io.ImageReadMode.RGB
    try:
        return list(torchvision.io.decode_jpeg(raws, mode=read, device=device))
    except Exception:  # one bad image fails the batch: decode them one by one to find it
        out = []
        for raw in raws:
            try:
                out.append(torchvision.io.decode_jpeg(raw, mode=read, device=device))
            except Exception:
                out.append(None)
        return out


def pixels(items: list, device, prep: Preprocess, cpu_preprocess, labels: list) -> tuple:
    """A batch's items (pixel tensors from the CPU path, or JPEG byte tensors) -> (pixels on device, failures).

    ``failures`` maps an item's index to its PIL reason where neither the device nor PIL could decode it;
    ``pixels`` holds the others, in order.
    """
    jpegs = [i for i, it in enumerate(items) if it.dtype == torch.uint8]
    decoded = dict(zip(jpegs, decode([items[i] for i in jpegs], device))) if jpegs else {}
    ready, failures = {i: it for i, it in enumerate(items) if it.dtype != torch.uint8}, {}
    for i in (i for i in jpegs if decoded[i] is None):  # the device refused it: PIL decides
        try:
            ready[i] = cpu_preprocess(data.decode_image(io.BytesIO(items[i].numpy().tobytes()), labels[i]))
        except data.ImageLoadError as exc:
            failures[i] = str(exc)
    keep = [i for i in range(len(items)) if i not in failures]
    if not keep:
        return None, failures
    out = torch.empty(len(keep), 3, *prep.crop, device=device)
    row = {i: k for k, i in enumerate(keep)}
    on_device = [i for i in jpegs if decoded[i] is not None]
    if on_device:
        out[[row[i] for i in on_device]] = prep([decoded[i] for i in on_device])
    for i, px in ready.items():
        out[row[i]] = px.to(device, non_blocking=True)
    return out, failures
