"""The one definition of how an image becomes a network input.

Training, evaluation and serving all call `Preprocessing.__call__`, and every model folder records
the `Preprocessing` it was trained with, so the three always see the same pixels.

Example:
    >>> pre = Preprocessing(image_size=64, in_chans=1)
    >>> x = pre(read_image("a.png"))            # torch.float32 (1, 64, 64)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Preprocessing:
    image_size: int = 64
    in_chans: int = 1
    mean: float = 0.5  # applied after the reader maps intensities to [0, 1]
    std: float = 0.25

    def resize(self, image: np.ndarray) -> torch.Tensor:
        """(H, W) float array in [0, 1] -> (1, S, S) float32 tensor, antialiased bilinear resize."""
        t = torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32))[None, None]
        if t.shape[-2:] != (self.image_size, self.image_size):
            t = F.interpolate(t, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False)
        return t[0].clamp_(0.0, 1.0)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(..., 1, S, S) in [0, 1] -> normalised, repeated to `in_chans` channels."""
        x = (x - self.mean) / self.std
        if self.in_chans != 1:
            x = x.expand(*x.shape[:-3], self.in_chans, *x.shape[-2:])
        return x

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.normalize(self.resize(image))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        return cls(**d)
