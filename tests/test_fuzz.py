"""Property-based fuzzing of the image readers and the service's upload parsing (issue 9).

Real files (pydicom's test corpus, PNG/JPEG written here, a breast-ultrasound PNG when ../shared is
present) are mutated: byte flips, overwrites, truncations, insertions and inflated header dimensions.
Every input must end in a decoded image (finite, in [0, 1]) or a typed error (ImageReadError for the
reader, UploadError with a 4xx status for the service), within a per-input time bound (hypothesis
`deadline`). REMEDIS_FUZZ_EXAMPLES raises the number of inputs for a longer local run.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.data import get_testdata_file

from remedis.data.readers import ImageReadError, read_image_bytes

EXAMPLES = int(os.environ.get("REMEDIS_FUZZ_EXAMPLES", "1000"))
FUZZ = settings(max_examples=EXAMPLES, deadline=timedelta(seconds=10), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DICOM_SEEDS = ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm", "SC_rgb_small_odd.dcm",
               "JPEG-lossy.dcm", "SC_rgb_rle.dcm"]


def _png(shape=(40, 56), bits=8) -> bytes:
    arr = (np.linspace(0, 1, shape[0] * shape[1]).reshape(shape) * (255 if bits == 8 else 65535))
    img = Image.fromarray(arr.astype(np.uint8 if bits == 8 else np.uint16))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((32, 48)) * 255).astype(np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _seeds() -> list[tuple[str, bytes]]:
    local = [get_testdata_file(name, download=False) for name in DICOM_SEEDS]  # never download at test time
    seeds = [(os.path.basename(p), open(p, "rb").read()) for p in local if p]
    seeds += [("a.png", _png()), ("b16.png", _png(bits=16)), ("c.jpg", _jpeg())]
    from conftest import SHARED_DATA

    bus = SHARED_DATA / "breast-ultrasound" / "images" / "busi"
    if bus.is_dir():
        first = sorted(bus.glob("*.png"))[:1]
        seeds += [(p.name, p.read_bytes()) for p in first]
    return seeds


SEEDS = _seeds()


@st.composite
def mutated(draw):
    name, data = draw(st.sampled_from(SEEDS))
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "overwrite", "truncate", "insert", "dims"]))
        if not buf:
            break
        pos = draw(st.integers(0, len(buf) - 1))
        if op == "flip":
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            buf[pos:pos + len(chunk)] = chunk
        elif op == "truncate":
            del buf[pos:]
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        else:  # huge declared sizes: 0xFFFF/0xFFFFFFFF over a 2- or 4-byte field
            width = draw(st.sampled_from([2, 4]))
            buf[pos:pos + width] = b"\xff" * width
    return name, bytes(buf)


def _check_image(pixels: np.ndarray) -> None:
    assert isinstance(pixels, np.ndarray) and pixels.ndim == 2 and min(pixels.shape) >= 1
    assert np.isfinite(pixels).all() and pixels.min() >= 0.0 and pixels.max() <= 1.0


@FUZZ
@given(mutated())
def test_reader_gives_an_image_or_a_typed_error(case):
    name, data = case
    try:
        pixels = read_image_bytes(data, name=name, max_pixels=20_000_000)
    except ImageReadError as exc:
        assert name in str(exc)  # the error names the file
        return
    _check_image(pixels)


@FUZZ
@given(mutated(), st.sampled_from([None, "application/octet-stream", "image/png", "application/dicom", "image/jpeg", "text/plain"]))
def test_service_upload_parsing_answers_4xx_or_an_image(case, declared):
    from serving.inputs import UploadError, check_upload, decode
    from serving.settings import LimitSettings

    _, data = case
    try:
        pixels = decode(check_upload(data, declared, LimitSettings(max_pixels=20_000_000)))
    except UploadError as exc:
        assert 400 <= exc.status < 500 and exc.reason
        return
    _check_image(pixels)


def _png_with_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width,height", [(100_000, 100_000), (2**31 - 1, 1), (1, 0)])
def test_decompression_bomb_headers_are_refused_before_decoding(width, height):
    with pytest.raises(ImageReadError):
        read_image_bytes(_png_with_header(width, height), name="bomb.png")


def test_unknown_vr_in_pixel_data_is_a_typed_error():
    """Regression (found by the fuzzer): a damaged VR made pydicom raise NotImplementedError on access."""
    data = bytearray(open(get_testdata_file("SC_rgb_small_odd.dcm", download=False), "rb").read())
    tag = data.rfind(b"\xe0\x7f\x10\x00")
    assert tag > 0 and data[tag + 4:tag + 6] in (b"OW", b"OB")
    data[tag + 4:tag + 6] = b"NW"
    with pytest.raises(ImageReadError, match="bad.dcm"):
        read_image_bytes(bytes(data), name="bad.dcm")
