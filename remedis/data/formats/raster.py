"""Raster images through PIL: PNG, JPEG, TIFF (multi-page), BMP. Registered last: it claims every file no
other format claimed, and its error says what the bytes are not."""

from __future__ import annotations

import io
import warnings

import numpy as np

from remedis.data.formats import register_format
from remedis.data.formats.base import ImageReadError, ImageTooLargeError, SourceInfo, code, one_line, source_bytes, to_unit

MAGIC = {"png": (b"\x89PNG\r\n\x1a\n",), "jpeg": (b"\xff\xd8\xff",), "tiff": (b"II*\x00", b"MM\x00*")}
PNG_SIGNATURE = MAGIC["png"][0]


@register_format
class Raster:
    """PIL's formats (PNG, JPEG, TIFF, BMP, ...)."""

    name = "raster"
    suffixes = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
    fallback = True  # asked after every other format

    def claims(self, name, head):
        """Everything: the fallback (PIL names what it cannot read)."""
        return True

    def kind(self, head):
        """'png', 'jpeg' or 'tiff' from the magic number, else None."""
        return next((fmt for fmt, heads in MAGIC.items() if any(head.startswith(h) for h in heads)), None)

    def read(self, source, name, *, window, frame, channels, limit):
        """One frame (or all with frame "all") as grey or RGB in [0, 1]; 16-bit and float images min-max scaled."""
        from PIL import Image, UnidentifiedImageError

        data = source_bytes(source)
        Image.MAX_IMAGE_PIXELS = max(limit, 1)  # PIL's own guard as a backstop behind the header check below
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as img:
                    return _frames(img, name, frame, channels, limit)
        except ImageReadError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            # PIL's own header check (Image.open) fired first: same refusal, its numbers.
            raise ImageReadError(f"{name}: image too large ({one_line(exc, 120)}; limit {limit} pixels)") from None
        except UnidentifiedImageError:
            raise ImageReadError(f"{name}: not a readable image (DICOM, PNG, JPEG or TIFF)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageReadError(f"{name}: corrupt or truncated image ({one_line(exc)})") from None

    def describe(self, source, name, hint=None, tags=(), require_pixels=False):
        """Size, frames and colour from the header and the mode; nothing is decoded."""
        from PIL import Image, UnidentifiedImageError

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:  # lazy: the header
                    cols, rows = img.size
                    photometric, channels = _colour(img)
                    fmt = (img.format or "unknown").lower()
                    frames = int(getattr(img, "n_frames", 1) or 1)
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(f"{name}: image too large ({one_line(exc, 120)})") from None
        except UnidentifiedImageError:
            raise ImageReadError(f"{name}: not a readable image (DICOM, PNG, JPEG, TIFF or NIfTI)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageReadError(f"{name}: corrupt or truncated image header ({type(exc).__name__})") from None
        return SourceInfo(fmt, code(hint), photometric, channels, int(rows), int(cols), frames)

    def bits(self, source, name):
        """16 for 16-bit PNG and PIL modes I;16 / I / F, else 8 (JPEG is 8: PIL does not read 12-bit JPEG)."""
        data = source_bytes(source)
        if data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR":
            return 16 if data[24] > 8 else 8  # IHDR bit depth per sample
        if data[:3] == b"\xff\xd8\xff":
            return 8
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:  # lazy: the header only
            return 16 if img.mode in ("I", "F") or img.mode.startswith("I;16") else 8


def _frames(img, name: str, frame, channels: int, limit: int) -> np.ndarray:
    """The requested frame(s) of an open PIL image, after the header's size is checked against `limit`."""
    n_frames = int(getattr(img, "n_frames", 1) or 1)
    w, h = img.size
    # The header is all PIL has read so far: refuse bombs before decoding a pixel.
    if w * h * n_frames > limit:
        raise ImageReadError(f"{name}: image too large ({h}x{w}x{n_frames} pixels, limit {limit})")
    if frame == "all":
        out = []
        for i in range(n_frames):
            img.seek(i)
            out.append(_pixels(img, name, channels))
        return np.stack(out)
    index = n_frames // 2 if frame == "middle" else int(frame or 0)
    if not -n_frames <= index < n_frames:
        raise ImageReadError(f"{name}: frame {frame} out of range (the file has {n_frames} frame(s))")
    if index % n_frames:
        img.seek(index % n_frames)
    img.load()
    return _pixels(img, name, channels)


def _pixels(img, name: str, channels: int) -> np.ndarray:
    """One decoded frame: 8-bit modes by their full scale, 16-bit and float ones min-max scaled."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = to_unit(np.asarray(img, dtype=np.float32), name)  # 16-bit/float: no fixed full scale
        return np.repeat(arr[..., None], 3, axis=-1) if channels == 3 else arr
    return np.asarray(img.convert("RGB" if channels == 3 else "L"), dtype=np.float32) / 255.0


def _colour(img) -> tuple[str, int]:
    """(photometric, channels) from a PIL image's mode, without decoding pixels."""
    mode = img.mode
    if mode in ("P", "PA"):
        pal = img.palette
        raw = bytes(pal.palette) if pal is not None else b""
        stride = len(pal.mode) if pal is not None and pal.mode else 3
        rgb = np.frombuffer(raw[: len(raw) // stride * stride], np.uint8).reshape(-1, stride)[:, :3]
        grey = len(rgb) > 0 and bool((rgb == rgb[:, :1]).all())
        return ("MONOCHROME2", 1) if grey else ("PALETTE COLOR", 3)
    if mode in ("1", "L", "LA", "La", "I", "F") or mode.startswith("I;16"):
        return "MONOCHROME2", 1
    if mode == "YCbCr":
        return "YBR_FULL", 3
    return "RGB", 3  # RGB, RGBA, RGBX, CMYK, LAB, HSV
