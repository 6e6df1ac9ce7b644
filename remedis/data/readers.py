"""Read one medical image (DICOM, PNG, JPEG, TIFF, NIfTI) into a float32 array with a known layout.

Default output: (H, W) float32 grayscale in [0, 1]. Options (keywords, same for every format):
  channels=1 | 3   (H, W) luminance, or (H, W, 3) RGB (grayscale repeated)
  frame=None       the default frame: the first of a multi-frame DICOM/TIFF, the middle slice of a
                   NIfTI volume; an index picks one, "middle" the middle one, "all" returns (F, H, W[, 3])
  window="auto"    DICOM grayscale intensity mapping: the file's VOI LUT / window, else min-max;
                   "minmax", "raw" (modality units, e.g. Hounsfield for CT, unscaled), or (center, width)
  max_pixels=None  decompression-bomb limit on rows x columns x frames, checked on the header before
                   decoding (None: the module's MAX_PIXELS)

DICOM goes through `remedis.data.dicom` (pydicom + pylibjpeg codecs, modality LUT, VOI, MONOCHROME1,
YBR/palette colour, enhanced multi-frame), PNG/JPEG/TIFF through PIL, NIfTI through nibabel. Every
failure is an ImageReadError whose one-line message names the file and the reason, so a job can
skip and count bad files.

Example:
    >>> arr = read_image("scan.dcm")                        # (H, W) float32 in [0, 1]
    >>> hu = read_image("ct.dcm", window="raw")              # Hounsfield units
    >>> arr = read_image_bytes(upload_bytes, name="upload.png")
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np

MAX_PIXELS = 64_000_000  # decompression-bomb guard: rows x columns (x frames) above this are refused
DICOM_SUFFIXES = {".dcm", ".dicom", ""}
NIFTI_SUFFIXES = (".nii", ".nii.gz")


class ImageReadError(ValueError):
    """An image could not be read; the message names the file and the reason."""


def is_dicom_bytes(head: bytes) -> bool:
    return len(head) >= 132 and head[128:132] == b"DICM"


def read_image(path: str | Path, *, window: Any = "auto", frame: int | str | None = None, channels: int = 1,
               max_pixels: int | None = None) -> np.ndarray:
    """Read one image file; see the module docstring for the options and the output layout."""
    path = Path(path)
    _check_options(path, window, frame, channels)
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return _read_nifti(path, frame, channels, max_pixels)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    return read_image_bytes(data, name=str(path), window=window, frame=frame, channels=channels, max_pixels=max_pixels)


def read_image_bytes(data: bytes, name: str = "<upload>", *, window: Any = "auto", frame: int | str | None = None,
                     channels: int = 1, max_pixels: int | None = None) -> np.ndarray:
    """Decode bytes (DICOM detected by its preamble, else by a .dcm suffix; other formats by PIL)."""
    _check_options(name, window, frame, channels)
    if not data:
        raise ImageReadError(f"{name}: empty file")
    limit = MAX_PIXELS if max_pixels is None else int(max_pixels)
    suffix = Path(name).suffix.lower()
    if is_dicom_bytes(data[:132]) or suffix in (".dcm", ".dicom"):
        from remedis.data.dicom import DicomError, read_dicom_bytes

        try:
            return read_dicom_bytes(data, name, window=window, frame=0 if frame is None else frame, channels=channels, max_pixels=limit)
        except DicomError as exc:
            raise ImageReadError(f"{name}: {exc}") from None
    return _read_pil(data, name, frame, channels, limit)


def _check_options(name, window, frame, channels) -> None:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if not (window in ("auto", "minmax", "raw") or (isinstance(window, (tuple, list)) and len(window) == 2)):
        raise ValueError(f"window must be 'auto', 'minmax', 'raw' or (center, width), got {window!r}")
    if not (frame is None or frame in ("all", "middle") or isinstance(frame, (int, np.integer))):
        raise ValueError(f"frame must be an index, 'middle' or 'all', got {frame!r}")


def _to_unit(arr: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(arr)):
        raise ImageReadError(f"{name}: pixels are not finite (NaN or infinity)")
    lo, hi = float(arr.min()), float(arr.max())
    if hi - lo < 1e-12:
        return np.zeros_like(arr, dtype=np.float32)
    return ((arr - lo) / (hi - lo)).astype(np.float32)


def _pil_frame(img, name: str, channels: int) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = _to_unit(np.asarray(img, dtype=np.float32), name)  # 16-bit/float: no fixed full scale
        return np.repeat(arr[..., None], 3, axis=-1) if channels == 3 else arr
    return np.asarray(img.convert("RGB" if channels == 3 else "L"), dtype=np.float32) / 255.0


def _read_pil(data: bytes, name: str, frame: int | str | None = None, channels: int = 1, limit: int = MAX_PIXELS) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = max(limit, 1)  # PIL's own guard as a backstop behind the header check below
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                n_frames = int(getattr(img, "n_frames", 1) or 1)
                w, h = img.size
                # The header is all PIL has read so far: refuse bombs before decoding a pixel.
                if w * h * n_frames > limit:
                    raise ImageReadError(f"{name}: image too large ({h}x{w}x{n_frames} pixels, limit {limit})")
                if frame == "all":
                    out = []
                    for i in range(n_frames):
                        img.seek(i)
                        out.append(_pil_frame(img, name, channels))
                    return np.stack(out)
                index = n_frames // 2 if frame == "middle" else int(frame or 0)
                if not -n_frames <= index < n_frames:
                    raise ImageReadError(f"{name}: frame {frame} out of range (the file has {n_frames} frame(s))")
                if index % n_frames:
                    img.seek(index % n_frames)
                img.load()
                return _pil_frame(img, name, channels)
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # PIL's own header check (Image.open) fired first: same refusal, its numbers.
        raise ImageReadError(f"{name}: image too large ({' '.join(str(exc).split())[:120]}; limit {limit} pixels)") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{name}: not a readable image (DICOM, PNG, JPEG or TIFF)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageReadError(f"{name}: corrupt or truncated image ({' '.join(str(exc).split())[:160]})") from None


def _read_nifti(path: Path, frame: int | str | None = None, channels: int = 1, max_pixels: int | None = None) -> np.ndarray:
    """2-D slices of a NIfTI volume: the middle slice of the last axis by default, a chosen slice
    index, or `frame="all"`."""
    try:
        import nibabel as nib

        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
    except Exception as exc:
        raise ImageReadError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") from None
    limit = MAX_PIXELS if max_pixels is None else int(max_pixels)
    if int(np.prod(shape)) > limit:
        raise ImageReadError(f"{path}: image too large ({'x'.join(map(str, shape))} voxels, limit {limit})")
    try:
        vol = np.asarray(img.get_fdata(), dtype=np.float32)
    except Exception as exc:
        raise ImageReadError(f"{path}: cannot decode NIfTI data ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") from None
    while vol.ndim > 3:
        vol = vol[..., 0]  # time / extra dimensions: first volume
    if vol.ndim == 2:
        slices = [vol]
    elif frame == "all":
        slices = [vol[..., k] for k in range(vol.shape[-1])]
    else:
        k = vol.shape[-1] // 2 if frame in (None, "middle") else int(frame)
        if not 0 <= k < vol.shape[-1]:
            raise ImageReadError(f"{path}: slice {frame} out of range (the volume has {vol.shape[-1]})")
        slices = [vol[..., k]]
    out = [_to_unit(s, str(path)) for s in slices]
    if channels == 3:
        out = [np.repeat(o[..., None], 3, axis=-1) for o in out]
    return np.stack(out) if frame == "all" and vol.ndim == 3 else out[0]
