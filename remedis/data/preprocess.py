"""The one definition of how an image becomes a network input.

Training, evaluation and serving all call `Preprocessing.__call__`, and every model folder records
the `Preprocessing` it was trained with, so the three always see the same pixels.

Args (fields):
    image_size: the network input side S (square).
    in_chans: the network's input channels (1, or 3 for RGB backbones and external RGB weights).
    mean, std: applied after the reader maps intensities to [0, 1].
    channels: the channels read and kept per image: 1 (luminance) or 3 (RGB: colour images keep their
        colour; a grey image is repeated). `in_chans` 3 with `channels` 1 repeats the grey channel at
        the network input, so a grey corpus is stored once.
    aspect: how a non-square image becomes S x S: "pad" (resize the long side to S, centre it on a
        black canvas: nothing cut, nothing stretched), "crop" (resize the short side to S, centre-crop)
        or "stretch" (the pre-0.2 behaviour, which model folders without this field keep).

Example:
    >>> pre = Preprocessing(image_size=64, in_chans=1)
    >>> x = pre(read_image("a.png"))            # torch.float32 (1, 64, 64)
    >>> rgb = Preprocessing(224, in_chans=3, channels=3, aspect="pad")
    >>> x = rgb(read_image("lesion.jpg", **rgb.read_options()))   # (3, 224, 224), colour kept
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ASPECTS = ("pad", "crop", "stretch")
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's convert("L")


@dataclass(frozen=True)
class Preprocessing:
    """How images become network input: reading options, size, channels, aspect handling and normalisation;
    recorded in every model folder so training, evaluation and serving see the same pixels."""

    image_size: int = 64
    in_chans: int = 1
    mean: float = 0.5
    std: float = 0.25
    channels: int = 1
    aspect: str = "stretch"

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"preprocessing channels must be 1 or 3, got {self.channels!r}")
        if self.in_chans not in (1, 3):
            raise ValueError(f"preprocessing in_chans must be 1 or 3, got {self.in_chans!r}")
        if self.channels == 3 and self.in_chans == 1:
            raise ValueError("colour images (channels 3) need a 3-channel network (in_chans 3), not in_chans 1")
        if self.aspect not in ASPECTS:
            raise ValueError(f"preprocessing aspect must be one of {ASPECTS}, got {self.aspect!r}")

    def read_options(self) -> dict[str, Any]:
        """Reader keywords that this preprocessing needs (`read_image(path, **pre.read_options())`)."""
        return {"channels": self.channels}

    def resize(self, image: np.ndarray) -> torch.Tensor:
        """(H, W) or (H, W, 3) float array in [0, 1] -> (channels, S, S) float32 tensor (antialiased
        bilinear resize; the aspect ratio handled by `aspect`). A colour array becomes luminance for
        `channels` 1, a grey one is repeated for `channels` 3."""
        arr = np.asarray(image, dtype=np.float32)
        if arr.ndim == 3 and arr.shape[-1] in (3, 4):
            arr = arr[..., :3]
            t = torch.as_tensor(np.ascontiguousarray(arr)).permute(2, 0, 1)
            if self.channels == 1:
                t = (t * torch.tensor(LUMA).view(3, 1, 1)).sum(0, keepdim=True)
        elif arr.ndim == 2:
            t = torch.as_tensor(np.ascontiguousarray(arr))[None]
            if self.channels == 3:
                t = t.expand(3, -1, -1)
        else:
            raise ValueError(f"expected an (H, W) or (H, W, 3) image, got shape {arr.shape}")
        return self._fit(t[None].contiguous())[0].clamp_(0.0, 1.0)

    def _fit(self, t: torch.Tensor) -> torch.Tensor:
        s = self.image_size
        h, w = t.shape[-2:]
        if (h, w) == (s, s):
            return t
        if self.aspect == "stretch" or h == w:
            return _interp(t, s, s)
        if self.aspect == "crop":
            scale = s / min(h, w)
            nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
            t = _interp(t, nh, nw)
            top, left = (nh - s) // 2, (nw - s) // 2
            return t[..., top:top + s, left:left + s]
        scale = s / max(h, w)  # pad
        nh, nw = max(1, min(s, round(h * scale))), max(1, min(s, round(w * scale)))
        t = _interp(t, nh, nw)
        out = t.new_zeros(*t.shape[:-2], s, s)
        top, left = (s - nh) // 2, (s - nw) // 2
        out[..., top:top + nh, left:left + nw] = t
        return out

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(..., channels, S, S) in [0, 1] -> normalised, a grey channel repeated to `in_chans`."""
        x = (x - self.mean) / self.std
        if self.in_chans != x.shape[-3]:
            x = x.expand(*x.shape[:-3], self.in_chans, *x.shape[-2:])
        return x

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """A decoded image (H, W[, 3]) in [0, 1] -> the normalised network input (C, S, S)."""
        return self.normalize(self.resize(image))

    def to_dict(self) -> dict[str, Any]:
        """The form recorded in model folders and resume keys."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        """A `Preprocessing` from its recorded form."""
        return cls(**d)


def _interp(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    if tuple(t.shape[-2:]) == (h, w):
        return t
    return F.interpolate(t, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
