"""Image formats: a registry where a new format is one registered class in its own file.

A format says whether a file is its kind (`claims`: from the name and the first bytes), reads its pixels
(`read`), its header facts without decoding pixels (`describe`: modality, photometric interpretation,
channels, size, frames) and the bit depth its pixels are stored with (`bits`). Readers, the input contract,
`remedis data index`, the shard writer and the service's upload check all ask the registry, so they agree
on what a file is.

Formats are asked in registration order and the first that claims a file reads it; the raster format
(PIL: PNG, JPEG, TIFF, BMP) is the fallback, asked last, and claims everything else, so its error names
what the bytes are not. To add a format: write `remedis/data/formats/<name>.py` with a class decorated by
`@register_format`, and import it below.

Example:
    >>> fmt = format_of("scan.dcm", head=open("scan.dcm", "rb").read(132))
    >>> fmt.name, fmt.describe(Path("scan.dcm"), "scan.dcm").rows
    ('dicom', 512)
    >>> sniff_kind(open("photo.jpg", "rb").read(16))
    'jpeg'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from remedis.data.formats.base import GREY, ImageReadError, ImageTooLargeError, SourceInfo, code, to_unit
from remedis.registry import Registry

HEAD_BYTES = 132  # what `claims` and `kind` see: enough for the DICOM preamble and every magic number


class ImageFormat(Protocol):
    """What a registered format provides.

    Attributes:
        name: its name ("dicom", "nifti", "raster").
        suffixes: file-name endings it claims (lower case).
    """

    name: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]]
    fallback: ClassVar[bool]  # asked after every other format (raster: PIL names what it cannot read)

    def claims(self, name: str, head: bytes) -> bool:
        """True when the file called `name`, starting with `head` (up to HEAD_BYTES), is this format."""
        ...

    def kind(self, head: bytes) -> str | None:
        """The specific kind the leading bytes prove ("dicom", "png", ...), or None (not provable from bytes)."""
        ...

    def read(self, source: Path | bytes, name: str, *, window: Any, frame: Any, channels: int, limit: int) -> np.ndarray:
        """Pixels of a file or its bytes, in [0, 1] (`remedis.data.readers` documents the options)."""
        ...

    def describe(self, source: Path | bytes, name: str, hint: str | None = None, tags: tuple[str, ...] = (),
                 require_pixels: bool = False) -> SourceInfo:
        """Header facts without decoding pixels; `tags`: DICOM attributes to return as text; `require_pixels`:
        refuse a file that holds no pixel data (a DICOM report)."""
        ...

    def bits(self, source: Path | bytes, name: str) -> int:
        """8 or 16: the depth the pixels are stored with (8 when the header cannot tell)."""
        ...


FORMATS = Registry("image format")
register_format = FORMATS.register  # class decorator: one instance under its `name`


def format_of(name: str, head: bytes = b"") -> ImageFormat:
    """The first registered format that claims a file called `name` starting with `head` (fallbacks last)."""
    for fmt in sorted(FORMATS.values(), key=lambda f: bool(getattr(f, "fallback", False))):
        if fmt.claims(name, head):
            return fmt
    raise ImageReadError(f"{name}: no image format claims it")  # unreachable while `raster` claims everything


def format_of_file(path: Path) -> tuple[ImageFormat, bytes]:
    """The format of a file on disk, from its name and first bytes (returned too)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(HEAD_BYTES)
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    return format_of(str(path), head), head


def sniff_kind(head: bytes) -> str | None:
    """What the leading bytes prove the file is ("dicom", "png", "jpeg", "tiff", ...), or None."""
    for fmt in FORMATS.values():
        kind = fmt.kind(head)
        if kind is not None:
            return kind
    return None


def suffixes() -> tuple[str, ...]:
    """Every file-name ending a registered format claims."""
    return tuple(s for fmt in FORMATS.values() for s in fmt.suffixes)


__all__ = ["FORMATS", "GREY", "HEAD_BYTES", "ImageFormat", "ImageReadError", "ImageTooLargeError", "SourceInfo", "code",
           "format_of", "format_of_file", "register_format", "sniff_kind", "suffixes", "to_unit"]

# The registered formats (importing a module registers it), in the order they are asked (the fallback last).
# isort: off
from remedis.data.formats import nifti  # noqa: E402,F401
from remedis.data.formats import dicom  # noqa: E402,F401
from remedis.data.formats import raster  # noqa: E402,F401
# isort: on
