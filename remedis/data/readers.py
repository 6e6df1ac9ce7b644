"""Read one medical image (DICOM, PNG, JPEG, TIFF, NIfTI) into a float32 array with a known layout.

Default output: (H, W) float32 grayscale in [0, 1]. Options (keywords, same for every format):
  channels=1 | 3   (H, W) luminance, or (H, W, 3) RGB (grayscale repeated)
  frame=None       the default frame: the first of a multi-frame DICOM/TIFF, the middle slice of a
                   NIfTI volume; an index picks one, "middle" the middle one, "all" returns (F, H, W[, 3])
  window="auto"    DICOM grayscale intensity mapping: the file's VOI LUT / window, else min-max;
                   "minmax", "raw" (modality units, e.g. Hounsfield for CT, unscaled), or (center, width)
  max_pixels=None  decompression-bomb limit on rows x columns x frames, checked on the header before
                   decoding (None: the module's MAX_PIXELS)

The format registry (`remedis.data.formats`) decides what a file is and reads it: DICOM through
`remedis.data.dicom` (pydicom + pylibjpeg codecs, modality LUT, VOI, MONOCHROME1, YBR/palette colour,
enhanced multi-frame), NIfTI through nibabel, PNG/JPEG/TIFF through PIL. Every
failure is an ImageReadError whose one-line message names the file and the reason, so a job can
skip and count bad files.

Example:
    >>> arr = read_image("scan.dcm")                        # (H, W) float32 in [0, 1]
    >>> hu = read_image("ct.dcm", window="raw")              # Hounsfield units
    >>> arr = read_image_bytes(upload_bytes, name="upload.png")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from remedis.data.formats import ImageReadError, format_of, format_of_file

MAX_PIXELS = 64_000_000  # decompression-bomb guard: rows x columns (x frames) above this are refused

__all__ = ["MAX_PIXELS", "ImageReadError", "read_image", "read_image_bytes"]


def read_image(path: str | Path, *, window: Any = "auto", frame: int | str | None = None, channels: int = 1,
               max_pixels: int | None = None) -> np.ndarray:
    """Read one image file; see the module docstring for the options and the output layout."""
    path = Path(path)
    _check_options(path, window, frame, channels)
    fmt, head = format_of_file(path)
    if not head:
        raise ImageReadError(f"{path}: empty file")
    return fmt.read(path, str(path), window=window, frame=frame, channels=channels, limit=_limit(max_pixels))


def read_image_bytes(data: bytes, name: str = "<upload>", *, window: Any = "auto", frame: int | str | None = None,
                     channels: int = 1, max_pixels: int | None = None) -> np.ndarray:
    """Decode bytes: the format from the leading bytes and the name (`remedis.data.formats.format_of`)."""
    _check_options(name, window, frame, channels)
    if not data:
        raise ImageReadError(f"{name}: empty file")
    fmt = format_of(name, data[:132])
    return fmt.read(data, name, window=window, frame=frame, channels=channels, limit=_limit(max_pixels))


def _limit(max_pixels: int | None) -> int:
    """The pixel limit: the argument, else the module's MAX_PIXELS (read at call time)."""
    return MAX_PIXELS if max_pixels is None else int(max_pixels)


def _check_options(name, window, frame, channels) -> None:
    """Refuse options no format understands (a caller's mistake, not the file's)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if not (window in ("auto", "minmax", "raw") or (isinstance(window, (tuple, list)) and len(window) == 2)):
        raise ValueError(f"window must be 'auto', 'minmax', 'raw' or (center, width), got {window!r}")
    if not (frame is None or frame in ("all", "middle") or isinstance(frame, (int, np.integer))):
        raise ValueError(f"frame must be an index, 'middle' or 'all', got {frame!r}")
