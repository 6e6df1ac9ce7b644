"""DICOM pixels at full fidelity: one DICOM file (bytes) -> float32 array with a known layout.

Order of operations (DICOM PS3.3 C.11): decode (pydicom + pylibjpeg codecs; YBR is converted to RGB
by pydicom), per frame the Modality LUT / rescale slope-intercept (from the enhanced multi-frame
functional groups when present), then the VOI LUT sequence or window centre/width (LINEAR,
LINEAR_EXACT, SIGMOID), MONOCHROME1 inverted, PALETTE COLOR expanded through its LUT.

`window` chooses the intensity mapping of grayscale images:
  "auto"  VOI LUT or window from the file when present, else the image's min-max -> [0, 1]
  "minmax" modality values min-max scaled -> [0, 1] (ignores the file's window)
  "raw"   modality values unscaled (Hounsfield units for CT), float32, no MONOCHROME1 inversion
  (center, width) an explicit LINEAR window -> [0, 1], e.g. (40, 400) for CT soft tissue
Colour images are scaled by their bit depth to [0, 1].

The pixel limit (rows x columns x frames) is checked on the header, before any decoding, so a
decompression bomb costs nothing. Every failure is a DicomError whose message is one line.

Example:
    >>> arr = read_dicom_bytes(open("ct.dcm", "rb").read(), "ct.dcm", window="raw")   # HU, (H, W)
    >>> frames = read_dicom_bytes(data, "cine.dcm", frame="all", channels=3)         # (F, H, W, 3)
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as DICOM YBR_FULL uses


class DicomError(ValueError):
    """One line: what is wrong with a DICOM file (the caller prefixes the file name)."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


def parse(data: bytes, stop_before_pixels: bool = False):
    """Parse DICOM bytes (pixels too unless `stop_before_pixels`); DicomError with the reason, never a value."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns on every odd-but-readable header
            return pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=stop_before_pixels)
    except Exception as exc:  # pydicom raises many types on garbage (struct.error, KeyError, ...)
        raise DicomError(f"not a readable DICOM file ({_one_line(exc)})") from None


def _int(ds, keyword: str, default: int) -> int:
    try:
        v = ds.get(keyword, default)
        return int(v if v not in (None, "") else default)
    except (TypeError, ValueError):
        raise DicomError(f"invalid {keyword} {ds.get(keyword)!r}") from None


def geometry(ds) -> tuple[int, int, int, int]:
    """(rows, columns, frames, samples per pixel) from the header, validated."""
    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    frames, samples = _int(ds, "NumberOfFrames", 1), _int(ds, "SamplesPerPixel", 1)
    if rows <= 0 or cols <= 0:
        raise DicomError("DICOM Rows/Columns missing or zero")
    if frames <= 0:
        raise DicomError(f"invalid NumberOfFrames {frames}")
    if samples not in (1, 3):
        raise DicomError(f"unsupported SamplesPerPixel {samples}")
    return rows, cols, frames, samples


def _frame_transform(ds, index: int) -> dict[str, Any]:
    """Rescale and window of one frame: enhanced multi-frame files keep them in functional groups."""
    out: dict[str, Any] = {}
    for seq_name in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        seq = ds.get(seq_name)
        if not seq:
            continue
        item = seq[0] if seq_name.startswith("Shared") else (seq[index] if index < len(seq) else None)
        if item is None:
            continue
        for group, keys in (
            ("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept")),
            ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction")),
        ):
            g = item.get(group)
            if g:
                for k in keys:
                    if k in g[0]:
                        out[k] = g[0][k].value
    return out


def _first(v) -> float:
    if isinstance(v, (list, tuple)) or (hasattr(v, "__len__") and not isinstance(v, (str, bytes))):
        v = v[0]
    return float(v)


def window(x: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing, output normalised to [0, 1]."""
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        if width <= 0:
            raise DicomError(f"invalid window width {width}")
        return (1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))).astype(np.float32)
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise DicomError(f"invalid window width {width}")
        return np.clip((x - center) / width + 0.5, 0.0, 1.0).astype(np.float32)
    if width < 1:
        raise DicomError(f"invalid window width {width}")
    if width == 1:  # degenerate LINEAR window is a threshold at the centre
        return (x > center - 0.5).astype(np.float32)
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0).astype(np.float32)


def minmax(arr: np.ndarray) -> np.ndarray:
    """Min-max scaling to [0, 1] (a constant image becomes zeros)."""
    arr = np.asarray(arr, dtype=np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    if hi - lo < 1e-12:
        return np.zeros_like(arr, dtype=np.float32)
    return ((arr - lo) / (hi - lo)).astype(np.float32)


def _linear_rescale(ds, frame: dict[str, Any]) -> tuple[float, float] | None:
    """(slope, intercept) of the Modality LUT when it is linear (almost always); None for a LUT
    sequence. Same precedence as pydicom's apply_modality_lut: the sequence, then slope+intercept."""
    if "RescaleSlope" in frame or "RescaleIntercept" in frame:
        return float(frame.get("RescaleSlope", 1.0)), float(frame.get("RescaleIntercept", 0.0))
    if "ModalityLUTSequence" in ds:
        return None
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope in (None, "") or intercept in (None, ""):
        return 1.0, 0.0
    return float(slope), float(intercept)


def _file_window(ds, frame: dict[str, Any]) -> tuple[float, float, str] | None:
    center = frame.get("WindowCenter", ds.get("WindowCenter"))
    width = frame.get("WindowWidth", ds.get("WindowWidth"))
    if center in (None, "") or width in (None, ""):
        return None
    try:
        return _first(center), _first(width), str(frame.get("VOILUTFunction", ds.get("VOILUTFunction", "LINEAR")) or "LINEAR").upper()
    except (TypeError, ValueError, IndexError):
        return None  # malformed window in the header: the caller falls back to the image's range


def _grayscale(arr: np.ndarray, ds, index: int, mode, monochrome1: bool) -> np.ndarray:  # noqa: C901 - the LUT rules of PS3.3 C.11
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    frame = _frame_transform(ds, index)
    lin = None if arr.dtype.kind == "f" else _linear_rescale(ds, frame)

    def values() -> np.ndarray:
        if arr.dtype.kind == "f":  # float pixel data is already in real-world units
            return arr.astype(np.float32)
        if lin is None:
            return np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
        out = arr.astype(np.float32)
        if lin != (1.0, 0.0):
            out *= lin[0]
            out += lin[1]
        return out

    if mode == "raw":
        return values()
    out = None
    win = None
    if isinstance(mode, (tuple, list)):
        win = (float(mode[0]), float(mode[1]), "LINEAR")
    elif mode == "auto":
        if ds.get("VOILUTSequence") and "WindowCenter" not in frame:
            desc = ds.VOILUTSequence[0].get("LUTDescriptor")
            if desc is not None and ds.VOILUTSequence[0].get("LUTData") is not None:
                lut_bits = int(desc[2]) if int(desc[2]) in range(1, 17) else 16
                out = np.clip(np.asarray(apply_voi_lut(values(), ds), np.float32) / float(2**lut_bits - 1), 0.0, 1.0)
        if out is None:
            win = _file_window(ds, frame)
    if out is None and win is not None:
        center, width, function = win
        if lin is not None and function in ("LINEAR", "LINEAR_EXACT") and width > (1 if function == "LINEAR" else 0):
            # Rescale and window are both affine: one fused pass over the pixels, then the clip.
            den = (width - 1) if function == "LINEAR" else width
            shift = (center - 0.5) if function == "LINEAR" else center
            out = arr.astype(np.float32)
            out *= lin[0] / den
            out += (lin[1] - shift) / den + 0.5
            np.clip(out, 0.0, 1.0, out=out)
        else:
            try:
                out = window(values(), center, width, function)
            except DicomError:
                if isinstance(mode, (tuple, list)):
                    raise
                out = None  # the file's window is invalid: fall back to the image's own range
    if out is None:
        out = minmax(values())
    if monochrome1:
        out = 1.0 - out
    return out


def _colour(arr: np.ndarray, ds) -> np.ndarray:
    """(H, W, 3) colour -> float32 RGB in [0, 1], scaled by bit depth (not by the image's range)."""
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(arr, ds)
        bits = 16 if arr.dtype.itemsize == 2 else 8
        top = float(arr.max())
        # Some files declare 16-bit LUT entries holding 8-bit values; scale by what is really there.
        scale = 255.0 if bits == 16 and top <= 255 else float(2**bits - 1)
        return np.clip(arr.astype(np.float32) / scale, 0.0, 1.0)
    if arr.dtype.kind == "f":
        return minmax(arr)
    bits = _int(ds, "BitsStored", 8)
    bits = bits if 1 <= bits <= 32 else 8
    if _int(ds, "PixelRepresentation", 0) == 1:
        return np.clip((arr.astype(np.float32) + 2 ** (bits - 1)) / float(2**bits - 1), 0.0, 1.0)
    return np.clip(arr.astype(np.float32) / float(2**bits - 1), 0.0, 1.0)


def _layout(out: np.ndarray, channels: int, is_colour: bool) -> np.ndarray:
    if channels == 1 and is_colour:
        return out @ LUMA
    if channels == 3 and not is_colour:
        return np.repeat(out[..., None], 3, axis=-1)
    return out


def read_dicom_bytes(data: bytes, name: str = "<dicom>", *, window: Any = "auto", frame: int | str = 0,
                     channels: int = 1, max_pixels: int = 64_000_000) -> np.ndarray:
    """Decode a DICOM file; see the module docstring. Raises DicomError (one line, no file name)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # odd-but-readable values warn on every access in pydicom
        try:
            return _read(data, window, frame, channels, max_pixels)
        except (DicomError, MemoryError):
            raise
        except Exception as exc:  # pydicom parses elements lazily: a damaged one (unknown VR, bad length)
            # raises on first access, anywhere above; it is a bad file, not a crash (found by fuzzing)
            raise DicomError(f"malformed DICOM element ({_one_line(exc)})") from None


def _read(data: bytes, window: Any, frame: int | str, channels: int, max_pixels: int) -> np.ndarray:
    from pydicom.pixels import pixel_array

    ds = parse(data)
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DicomError("DICOM file has no pixel data")
    rows, cols, frames, _samples = geometry(ds)
    if rows * cols * frames > max_pixels:
        raise DicomError(f"image too large ({rows}x{cols}x{frames} pixels, limit {max_pixels})")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if frame == "all":
        indices = list(range(frames))
    elif frame == "middle":
        indices = [frames // 2]
    else:
        if not isinstance(frame, (int, np.integer)) or not -frames <= frame < frames:
            raise DicomError(f"frame {frame!r} out of range (the file has {frames} frame(s))")
        indices = [int(frame) % frames]
    if "PixelData" in ds and len(ds.PixelData or b"") == 0:
        raise DicomError("DICOM pixel data element is empty")
    try:
        if frames == 1:
            decoded = [pixel_array(ds)]
        elif len(indices) == 1:
            decoded = [pixel_array(ds, index=indices[0])]  # decodes only that frame
        else:
            whole = pixel_array(ds)
            decoded = [whole[i] for i in indices]
    except Exception as exc:  # decoders raise anything from ValueError to RuntimeError on bad data
        raise DicomError(f"cannot decode DICOM pixel data ({_one_line(exc)})") from None
    images = []
    for i, arr in zip(indices, decoded):
        arr = np.asarray(arr)
        is_colour = arr.ndim == 3 or photometric == "PALETTE COLOR"
        if arr.ndim == 3 and arr.shape[-1] != 3:
            raise DicomError(f"unexpected decoded shape {arr.shape}")
        if photometric == "PALETTE COLOR" or arr.ndim == 3:
            out = _colour(arr, ds)
        else:
            out = _grayscale(arr, ds, i, window, photometric == "MONOCHROME1")
        if not np.all(np.isfinite(out)):
            raise DicomError("decoded pixels are not finite (NaN or infinity)")
        images.append(_layout(out.astype(np.float32, copy=False), channels, is_colour))
    return np.stack(images) if frame == "all" else images[0]
