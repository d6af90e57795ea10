"""Adapt CLIP's projection heads to an image-caption collection on a CPU: extract features once, probe often.

The stages, each a module with one main function: ``extract`` (frozen trunks -> HDF5 cache), ``probe`` (train the
two heads on the cache), ``metrics`` (Recall@K). ``cli`` is the command line on top of them.
"""
from pathlib import Path

__version__ = "0.9.0"
PRETRAINED = Path(__file__).resolve().parent / "pretrained"  # ShapesCLIP, shipped with the package
