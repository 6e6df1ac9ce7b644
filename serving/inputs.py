"""Uploads -> checked images: format from the bytes (the declared type is checked, never trusted),
size and pixel limits before decoding, zip expansion with bomb guards, and errors that are safe to
return (a status code and a reason; never a file name, a tag value or a decoder's message, which
could carry a patient identifier).

Decoding itself is `remedis.data.readers.read_image_bytes`, the reader training uses, so served
pixels equal offline pixels.

Example:
    >>> img = check_upload(data, declared="image/png", limits=LimitSettings())
    >>> pixels = decode(img)                      # (H, W) float32 in [0, 1]
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass

import numpy as np

from remedis.data.contract import ImageTooLargeError, SourceInfo, describe_bytes
from remedis.data.formats import format_of, sniff_kind
from remedis.data.readers import ImageReadError, read_image_bytes
from serving.settings import LimitSettings

DECLARED = {  # declared media type -> the format it promises
    "image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg", "image/pjpeg": "jpeg",
    "image/tiff": "tiff", "application/dicom": "dicom", "image/dicom": "dicom", "application/x-dicom": "dicom",
}
UNTYPED = {"", "application/octet-stream", "binary/octet-stream"}  # no promise: the bytes decide


class UploadError(ValueError):
    """A client mistake: HTTP `status` and a reason that names the problem (and nothing private)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


# Read with the header, for the prediction log only (serving.monitoring): the key's UID and the device facts.
HEADER_TAGS = ("SOPInstanceUID", "Manufacturer", "ManufacturerModelName")


@dataclass
class Upload:
    """A checked upload: its bytes, the sniffed format and, when the header parsed, its header facts
    (`remedis.data.contract.describe_bytes`; `source` is None when it did not: the reader then gives
    the precise reason on decoding)."""

    data: bytes
    format: str  # dicom | png | jpeg | tiff
    source: SourceInfo | None = None

    @property
    def modality(self) -> str | None:
        """DICOM Modality as a code string (never an identifier), or None."""
        return self.source.modality if self.source is not None and self.format == "dicom" else None

    @property
    def rows(self) -> int:
        """Image height from the header (0: unknown)."""
        return self.source.rows if self.source is not None else 0

    @property
    def columns(self) -> int:
        """Image width from the header (0: unknown)."""
        return self.source.columns if self.source is not None else 0


def sniff(data: bytes) -> str | None:
    """What the leading bytes prove: an image kind of the format registry ("dicom", "png", "jpeg", "tiff"),
    "zip" (a batch archive), or None."""
    if data[:4] == b"PK\x03\x04":
        return "zip"
    return sniff_kind(data[:132])


def _media(declared: str | None) -> str:
    return (declared or "").split(";")[0].strip().lower()


def check_upload(data: bytes, declared: str | None, limits: LimitSettings, filename: str | None = None) -> Upload:
    """Format, size and pixel checks; raises UploadError (4xx) for every client mistake."""
    if not data:
        raise UploadError(400, "empty upload (0 bytes)")
    if len(data) > limits.max_upload_bytes:
        raise UploadError(413, f"upload is {len(data)} bytes, above this service's limit of {limits.max_upload_bytes}")
    media = _media(declared)
    fmt = sniff(data)
    if fmt is None and (DECLARED.get(media) == "dicom" or format_of(filename or "", b"").name == "dicom"):
        fmt = "dicom"  # a DICOM dataset without the Part-10 preamble: only on the client's word, the reader checks it
    if fmt is None or fmt == "zip":
        got = "a zip archive (use predict_batch)" if fmt == "zip" else "not DICOM, PNG, JPEG or TIFF (unrecognised leading bytes)"
        raise UploadError(415, f"unsupported image format: {got}")
    if media not in UNTYPED:
        promised = DECLARED.get(media)
        if promised is None:
            raise UploadError(415, f"content type {media!r} is not accepted (send DICOM, PNG, JPEG or TIFF)")
        if promised != fmt:
            raise UploadError(415, f"declared content type {media!r} does not match the bytes, which are {fmt.upper()}")
    up = Upload(data, fmt)
    _check_header(up, limits)
    return up


def _check_header(up: Upload, limits: LimitSettings) -> None:
    """The header facts (`describe_bytes`: modality, photometric, channels, size), and the declared
    dimensions against the pixel limit, before anything is decoded."""
    try:
        up.source = (describe_bytes(up.data, name="upload.dcm", tags=HEADER_TAGS) if up.format == "dicom"
                     else describe_bytes(up.data, name=f"upload.{up.format}"))
    except ImageTooLargeError:
        raise UploadError(413, f"image dimensions are above this service's limit of {limits.max_pixels} pixels") from None
    except Exception:  # a broken header: the reader gives the precise (safe) reason on decoding
        return
    rows, cols, frames = up.source.rows, up.source.columns, up.source.frames if up.format == "dicom" else 1
    if rows * cols * frames > limits.max_pixels:
        raise UploadError(413, f"image is {rows}x{cols}" + (f"x{frames}" if frames > 1 else "")
                          + f" pixels, above this service's limit of {limits.max_pixels}")


def safe_reason(exc: ImageReadError) -> str:
    """The reader's reason without the file name or the decoder's own words (which may quote tags)."""
    text = str(exc).split(": ", 1)[-1]
    return text.split(" (", 1)[0].strip() or "cannot read image"


def decode(up: Upload, channels: int = 1) -> np.ndarray:
    """Pixels via the training reader ((H, W), or (H, W, 3) with `channels` 3, the model's
    `Preprocessing.channels`); UploadError(422) when the bytes do not decode."""
    name = "upload.dcm" if up.format == "dicom" else f"upload.{up.format}"
    try:
        pixels = read_image_bytes(up.data, name=name, channels=channels)
    except ImageReadError as exc:
        raise UploadError(422, f"cannot read {up.format.upper()} image: {safe_reason(exc)}") from None
    except MemoryError:
        raise UploadError(413, "image too large to decode") from None
    except Exception as exc:  # a decoder bug on hostile bytes is still the upload's problem, not a 500
        raise UploadError(422, f"cannot decode {up.format.upper()} image ({type(exc).__name__})") from None
    if pixels.ndim != (2 if channels == 1 else 3) or min(pixels.shape) < 1:
        raise UploadError(422, f"decoded {up.format.upper()} image has unusable shape {tuple(pixels.shape)}")
    return pixels


def expand_zip(data: bytes, limits: LimitSettings) -> list[bytes]:
    """Member files of a zip upload, in archive order (folders and macOS metadata skipped)."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = [i for i in zf.infolist() if not i.is_dir() and not i.filename.startswith("__MACOSX/")
                 and not i.filename.rsplit("/", 1)[-1].startswith(".")]
    except (zipfile.BadZipFile, ValueError, OSError):
        raise UploadError(422, "cannot read zip archive (corrupt or truncated)") from None
    if not infos:
        raise UploadError(400, "zip archive holds no files")
    if len(infos) > limits.max_batch_files:
        raise UploadError(413, f"zip holds {len(infos)} files, above this service's limit of {limits.max_batch_files}")
    declared = sum(i.file_size for i in infos)
    if declared > limits.max_zip_bytes:
        raise UploadError(413, f"zip expands to {declared} bytes, above this service's limit of {limits.max_zip_bytes}")
    out, total = [], 0
    for info in infos:
        try:
            with zf.open(info) as fh:
                # Never trust the declared size: read at most one byte past the per-file limit.
                member = fh.read(limits.max_upload_bytes + 1)
        except (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError, EOFError, ValueError) as exc:
            raise UploadError(422, f"cannot read zip member {len(out)} ({type(exc).__name__})") from None
        total += len(member)
        if total > limits.max_zip_bytes:
            raise UploadError(413, f"zip content is above this service's limit of {limits.max_zip_bytes} bytes")
        out.append(member)
    return out
