"""Write a file so no reader ever sees half of it: a temp name beside the target, then os.replace.

    with replacing("artifacts/x.json") as tmp:
        tmp.write_text(...)
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | os.PathLike):
    """Yield a temp path in the target's folder; on success it replaces the target, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # same folder: os.replace is atomic only within one filesystem
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
