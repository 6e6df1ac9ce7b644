"""A dataset as the bytes of a DICOM Part-10 file."""

from __future__ import annotations

import io

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.filewriter import correct_ambiguous_vr


def encode(ds: pydicom.Dataset) -> bytes:
    """`ds` written as a Part-10 file (preamble, file meta) into bytes, in its file meta's transfer syntax.

    The same bytes as `ds.save_as`, written in time linear in the size of the content tree: pydicom corrects
    ambiguous VRs once per nested dataset that was not read from a file, walking that dataset's whole subtree
    each time, which made a TID 1500 SR of 50 images (some 2,000 nested datasets) about a third slower to write.
    Here the whole tree is corrected once and every dataset in it is marked as already in the output encoding.
    """
    syntax = pydicom.uid.UID(ds.file_meta.TransferSyntaxUID)
    if not syntax.is_compressed and syntax != pydicom.uid.DeflatedExplicitVRLittleEndian:
        correct_ambiguous_vr(ds, syntax.is_little_endian)
        _mark_encoded(ds, syntax.is_implicit_VR, syntax.is_little_endian)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _mark_encoded(ds: pydicom.Dataset, implicit: bool, little: bool) -> None:
    """Mark `ds` and every dataset nested in it that was built in memory (not read from a file, no element left
    undecoded) as encoded in (`implicit`, `little`) in its own character set; pydicom converts the others."""
    in_memory = ds.original_encoding == (None, None)
    for elem in ds.elements():
        if isinstance(elem, RawDataElement):
            in_memory = False
        elif elem.VR == "SQ":
            for item in elem.value:
                _mark_encoded(item, implicit, little)
    if in_memory:
        ds.set_original_encoding(implicit, little, ds._character_set)
