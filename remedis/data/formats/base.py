"""What every image format shares: the read error, the header facts (`SourceInfo`) and small helpers."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

GREY = ("MONOCHROME1", "MONOCHROME2")
_CODE = re.compile(r"[A-Z0-9_ ]{1,16}")  # a DICOM code string (CS); anything else is never echoed


class ImageReadError(ValueError):
    """An image could not be read; the message names the file and the reason."""


class ImageTooLargeError(ImageReadError):
    """The header declares more pixels than the decoder's bomb guard allows."""


@dataclass(frozen=True)
class SourceInfo:
    """Header facts of one source image: no pixels, never an identifier.

    Args:
        format: "dicom", "png", "jpeg", "tiff", "nifti", ... (the format's name, lower case).
        modality: DICOM Modality (0008,0060), or for other files the manifest's `modality` column; None: unknown.
        photometric: DICOM PhotometricInterpretation, or derived from the PIL mode ("MONOCHROME2" for
            grey, "RGB" for colour, "PALETTE COLOR" for a colour palette); None: unknown.
        channels: 1 grey, 3 colour (samples per pixel; RGBA counts 3, a colour palette 3).
        rows: image height in pixels (one frame).
        columns: image width in pixels.
        frames: frames (multi-frame DICOM/TIFF) or slices (NIfTI) in the file.
        tags: DICOM attributes asked for by keyword (`remedis data index`: site, patient, label), as text.

    Example:
        >>> describe_file("scan.dcm")
        SourceInfo(format='dicom', modality='US', photometric='MONOCHROME2', channels=1, rows=96, columns=96, frames=1)
    """

    format: str
    modality: str | None = None
    photometric: str | None = None
    channels: int = 1
    rows: int = 0
    columns: int = 0
    frames: int = 1
    tags: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def colour(self) -> bool:
        """True for a colour source (3 samples, or a colour photometric interpretation)."""
        return self.channels >= 3 or (self.photometric is not None and self.photometric not in GREY)


def code(value) -> str | None:
    """A header code string upper-cased, or None when absent or not a plain code string."""
    if value is None:
        return None
    text = str(value).strip().upper()
    return text if _CODE.fullmatch(text) else None


def to_unit(arr: np.ndarray, name: str) -> np.ndarray:
    """Min-max scaling to [0, 1] float32 (a constant image becomes zeros); non-finite pixels are an error."""
    arr = np.asarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(arr)):
        raise ImageReadError(f"{name}: pixels are not finite (NaN or infinity)")
    lo, hi = float(arr.min()), float(arr.max())
    if hi - lo < 1e-12:
        return np.zeros_like(arr, dtype=np.float32)
    return ((arr - lo) / (hi - lo)).astype(np.float32)


def one_line(exc: BaseException, limit: int = 160) -> str:
    """An exception's text on one line, cut at `limit` characters."""
    return " ".join(str(exc).split())[:limit]


def source_bytes(source: Path | bytes) -> bytes:
    """The bytes of a file or of bytes already read (a read failure names the file)."""
    if isinstance(source, bytes):
        return source
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise ImageReadError(f"{source}: cannot read file ({exc.strerror or exc})") from None
