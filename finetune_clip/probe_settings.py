"""The probe's settings, apart from the probe itself: the command line shows their defaults in `probe --help`
without importing torch, which `probe` needs (a second and more of every command's start, `--help` included)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))  # 0.0, 0.1, ..., 1.0
LOSSES = ("single", "multi")


class ProbeError(ValueError):
    """Bad settings, or a checkpoint that does not belong to the cache."""


# The defaults were chosen by validation recall on a model that has learned (ShapesCLIP on its shifted world, three
# seeds a setting): docs/probe-defaults.md has the tables, `make sweep` reruns them.
@dataclass(frozen=True)
class ProbeSettings:
    lr: float = 3e-3              # AdamW learning rate (the best of 1e-5..1e-2)
    weight_decay: float = 0.1     # AdamW decay toward zero, on the heads only (0 and 0.1 tie)
    reg_to_init: float = 0.0      # L2 penalty on the distance from the pretrained heads (sum of squares)
    train_logit_scale: bool = False  # keep the pretrained temperature, or learn it too (they tie)
    batch_size: int = 128         # distinct images per batch (64, 128 and 256 tie)
    loss: str = "multi"           # 'multi': all captions of an image are positives; 'single': one at random
    epochs: int = 100             # upper bound; early stopping usually ends sooner
    patience: int = 10            # epochs without a better validation recall before stopping
    seed: int = 0                 # batch order and caption choice
    interpolate: bool = True      # WiSE-FT: choose alpha*trained + (1-alpha)*pretrained on validation
    alphas: tuple = ALPHAS        # the grid of alpha tried; must hold values in [0, 1]

    def record(self) -> dict:
        """The settings as plain JSON values (checkpoints and history files carry them)."""
        return {**asdict(self), "alphas": [float(a) for a in self.alphas]}

    def check(self) -> None:
        for name in ("lr", "batch_size", "epochs"):
            if getattr(self, name) <= 0:
                raise ProbeError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("weight_decay", "reg_to_init", "patience"):
            if getattr(self, name) < 0:
                raise ProbeError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.loss not in LOSSES:
            raise ProbeError(f"unknown loss {self.loss!r}; choose one of {list(LOSSES)}")
        if not self.alphas or any(not 0.0 <= a <= 1.0 for a in self.alphas):
            raise ProbeError(f"interpolation alphas must be a non-empty list of values in [0, 1], got "
                             f"{list(self.alphas)}")
