"""Read one medical image (DICOM, PNG, JPEG, TIFF, NIfTI) into a float32 grayscale array in [0, 1].

DICOM goes through pydicom (compressed transfer syntaxes through the pylibjpeg plugins): modality
LUT (rescale slope/intercept), then the VOI LUT or window when the file has one (else min-max),
MONOCHROME1 inverted, colour converted to luminance, first frame of multi-frame files. Everything
else goes through PIL, NIfTI through nibabel (middle slice). Every failure is an ImageReadError whose
message names the file and the reason, so a job can skip and count bad files.

Example:
    >>> arr = read_image("scan.dcm")          # (H, W) float32 in [0, 1]
    >>> arr = read_image_bytes(upload_bytes, name="upload.png")
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np

MAX_PIXELS = 64_000_000  # decompression-bomb guard: rows x columns (x frames) above this are refused
DICOM_SUFFIXES = {".dcm", ".dicom", ""}
NIFTI_SUFFIXES = (".nii", ".nii.gz")


class ImageReadError(ValueError):
    """An image could not be read; the message names the file and the reason."""


def is_dicom_bytes(head: bytes) -> bool:
    return len(head) >= 132 and head[128:132] == b"DICM"


def read_image(path: str | Path) -> np.ndarray:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return _read_nifti(path)
    return read_image_bytes(data, name=str(path))


def read_image_bytes(data: bytes, name: str = "<upload>") -> np.ndarray:
    """Decode bytes (DICOM detected by its preamble, else by a .dcm suffix; other formats by PIL)."""
    if not data:
        raise ImageReadError(f"{name}: empty file")
    suffix = Path(name).suffix.lower()
    if is_dicom_bytes(data[:132]) or suffix in (".dcm", ".dicom"):
        return _read_dicom(data, name)
    return _read_pil(data, name)


def _to_unit(arr: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(arr)):
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(arr.min()), float(arr.max())
    if hi - lo < 1e-12:
        return np.zeros_like(arr, dtype=np.float32)
    return ((arr - lo) / (hi - lo)).astype(np.float32)


def _read_pil(data: bytes, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                    arr = np.asarray(img, dtype=np.float32)
                    return _to_unit(arr, name)
                arr = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
                return arr
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        kind = "image too large" if "bomb" in type(exc).__name__.lower() else "not a readable image (DICOM, PNG, JPEG or TIFF)"
        raise ImageReadError(f"{name}: {kind}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{name}: corrupt or truncated image ({exc})") from None


def _read_dicom(data: bytes, name: str) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, OSError) as exc:
        raise ImageReadError(f"{name}: not a readable DICOM file ({type(exc).__name__}: {exc})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageReadError(f"{name}: DICOM file has no pixel data")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows <= 0 or cols <= 0:
        raise ImageReadError(f"{name}: DICOM Rows/Columns missing or zero")
    if rows * cols * frames > MAX_PIXELS:
        raise ImageReadError(f"{name}: image too large ({rows}x{cols}x{frames} pixels, limit {MAX_PIXELS})")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for broken/unsupported pixel data
        raise ImageReadError(f"{name}: cannot decode DICOM pixel data ({type(exc).__name__}: {exc})") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        arr = arr[0]  # first frame; each-frame-as-image arrives with the data-layer issue
    if samples == 3:
        if photometric.startswith("YBR") and not ds.file_meta.get("TransferSyntaxUID", "").is_compressed:
            from pydicom.pixels import convert_color_space

            arr = convert_color_space(arr, photometric, "RGB")
        arr = arr.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return _to_unit(arr, name)
    arr = apply_modality_lut(arr, ds)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        try:
            windowed = apply_voi_lut(arr, ds)
        except Exception:  # malformed window values: fall back to the image's own range
            windowed = None
        if windowed is not None:
            # The VOI output spans the stored bit range; scaling by that range (not the image's
            # min/max) keeps the absolute brightness the site's window intends.
            bits = int(ds.get("BitsStored", 8) or 8)
            signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
            lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
            arr = np.clip((np.asarray(windowed, np.float32) - lo) / float(hi - lo), 0.0, 1.0)
            return 1.0 - arr if photometric == "MONOCHROME1" else arr
    arr = _to_unit(arr, name)
    if photometric == "MONOCHROME1":
        arr = 1.0 - arr
    return arr


def _read_nifti(path: Path) -> np.ndarray:
    try:
        import nibabel as nib

        vol = np.asarray(nib.load(str(path)).get_fdata(), dtype=np.float32)
    except Exception as exc:
        raise ImageReadError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    while vol.ndim > 2:
        vol = vol[..., vol.shape[-1] // 2]  # middle slice of a volume
    return _to_unit(vol, str(path))
