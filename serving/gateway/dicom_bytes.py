"""A dataset as the bytes of a DICOM Part-10 file."""

from __future__ import annotations

import io

import pydicom


def encode(ds: pydicom.Dataset) -> bytes:
    """`ds` written as a Part-10 file (preamble, file meta) into bytes."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
