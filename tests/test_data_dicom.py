"""DICOM reading at full fidelity: pydicom's test corpus, cross-checks against pydicom's own LUT
functions, and the real CT kit (Hounsfield units, vendor as site)."""

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

from remedis.data import ImageReadError, read_image, read_image_bytes

# Files of pydicom's corpus that hold pixel data yet cannot be loaded, and why. A new failure (or a
# file from this list that starts loading) makes the corpus test fail so the list stays honest.
KNOWN_FAILURES = {
    "JPEG-lossy.dcm": "12-bit JPEG Extended with a misplaced marker; pylibjpeg refuses it (GDCM too)",
    "JPEG2000-embedded-sequence-delimiter.dcm": "broken J2K codestream; pydicom's own pixel_array fails too",
    "MR_truncated.dcm": "pixel data truncated (8130 of 8192 bytes)",
    "badVR.dcm": "NumberOfFrames is '1A', not a number",
    "meta_missing_tsyntax.dcm": "no image pixel module (Rows/Columns absent)",
    "nested_priv_SQ.dcm": "no image pixel module (Rows/Columns absent)",
}
MIN_LOADED = 89  # every other corpus file with pixel data (pydicom 3.0.2's bundled corpus)


def local(name: str) -> str:
    path = get_testdata_file(name, download=False)  # never touch the network from a test
    if path is None:
        pytest.skip(f"{name} not in the local pydicom corpus")
    return path


def corpus_files() -> list[Path]:
    return [Path(f) for f in sorted(get_testdata_files()) if Path(f).is_file()]


def has_pixels(path: Path) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=False)
        return "PixelData" in ds
    except Exception:
        return False


def test_pydicom_corpus_loads_or_fails_with_one_line_reason():
    loaded, failed = {}, {}
    for path in corpus_files():
        if not has_pixels(path):
            continue
        try:
            arr = read_image(path)
            every = read_image(path, frame="all", channels=3)
        except ImageReadError as exc:
            msg = str(exc)
            assert msg.startswith(str(path)) and "\n" not in msg and len(msg) < len(str(path)) + 260
            failed[path.name] = msg
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        assert arr.shape == (ds.Rows, ds.Columns), path.name
        assert every.shape == (frames, ds.Rows, ds.Columns, 3), path.name
        for a in (arr, every):
            assert a.dtype == np.float32 and np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1, path.name
        loaded[path.name] = arr.shape
    assert set(failed) == set(KNOWN_FAILURES), {k: failed.get(k) for k in set(failed) ^ set(KNOWN_FAILURES)}
    assert len(loaded) >= MIN_LOADED


def pydicom_reference(path: str, frame: int = 0) -> np.ndarray:
    """pixel_array -> apply_modality_lut -> apply_voi_lut, normalised by the output range pydicom
    windows into (its y_min..y_max), MONOCHROME1 inverted; min-max when the file has no window."""
    ds = pydicom.dcmread(path)
    arr = pixel_array(ds, index=frame) if int(ds.get("NumberOfFrames", 1) or 1) > 1 else ds.pixel_array
    x = apply_modality_lut(arr, ds).astype(np.float64)
    if "WindowCenter" in ds:
        y = apply_voi_lut(x, ds)
        bits = ds.BitsStored
        lo, hi = (0, 2**bits - 1) if ds.PixelRepresentation == 0 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        if "RescaleSlope" in ds and "RescaleIntercept" in ds:
            lo, hi = lo * float(ds.RescaleSlope) + float(ds.RescaleIntercept), hi * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        ref = (y - lo) / (hi - lo)
    else:
        ref = (x - x.min()) / (x.max() - x.min())
    return 1 - ref if ds.PhotometricInterpretation == "MONOCHROME1" else ref


@pytest.mark.parametrize("name,frame", [
    ("CT_small.dcm", 0), ("MR_small.dcm", 0), ("MR_small_RLE.dcm", 0), ("MR_small_jp2klossless.dcm", 0),
    ("693_J2KI.dcm", 0), ("J2K_pixelrep_mismatch.dcm", 0), ("examples_overlay.dcm", 0), ("rtdose.dcm", 7),
    ("6154", 0), ("6247", 0), ("rtdose_rle.dcm", 3),
])
def test_matches_pydicom_lut_pipeline(name, frame):
    path = local(name)
    ours = read_image(path, frame=frame)
    assert np.allclose(ours, pydicom_reference(path, frame), atol=1e-5)


def test_raw_mode_is_pydicom_modality_lut():
    path = local("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = read_image(path, window="raw")
    assert np.array_equal(hu, apply_modality_lut(ds.pixel_array, ds).astype(np.float32))
    assert hu.min() < -500  # real Hounsfield units, not [0, 1]


def test_voi_lut_sequence_and_explicit_window(tmp_path):
    from pydicom.dataset import Dataset

    ds = pydicom.dcmread(local("MR_small.dcm"))
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 12]
    lut.add_new(0x00283006, "US", [min(4095, v) for v in range(0, 4096 * 2, 2)])  # LUTData: a steep ramp
    ds.VOILUTSequence = [lut]
    del ds.WindowCenter, ds.WindowWidth
    ds.save_as(tmp_path / "voi.dcm")
    ref = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds) / 4095.0
    assert np.allclose(read_image(tmp_path / "voi.dcm"), ref, atol=1e-6)
    # An explicit (center, width) overrides the file; checked against pydicom's windowing.
    ds2 = pydicom.dcmread(local("MR_small.dcm"))
    ds2.WindowCenter, ds2.WindowWidth = 300, 500
    ds2.save_as(tmp_path / "w.dcm")
    ours = read_image(local("MR_small.dcm"), window=(300, 500))
    assert np.allclose(ours, pydicom_reference(str(tmp_path / "w.dcm")), atol=1e-5)
    assert not np.allclose(ours, read_image(local("MR_small.dcm")), atol=1e-2)  # the file's own window differs


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(local("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm")
    assert np.allclose(read_image(tmp_path / "m1.dcm"), 1 - read_image(local("MR_small.dcm")), atol=1e-6)


def test_ybr_and_palette_colour():
    rgb = read_image(local("SC_rgb_rle.dcm"), channels=3)  # lossless RGB reference
    assert rgb.shape == (100, 100, 3)
    for name in ("SC_ybr_full_422_uncompressed.dcm", "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_dcmtk_+eb+cy+s2.dcm"):
        # YBR (uncompressed and JPEG) comes out as RGB, not as YCbCr read as RGB.
        assert np.abs(read_image(local(name), channels=3) - rgb).mean() < 0.01, name
    gray = read_image(local("SC_rgb_rle.dcm"))
    assert np.allclose(gray, rgb @ np.array([0.299, 0.587, 0.114]), atol=1e-5)
    pal = read_image(local("examples_palette.dcm"), channels=3)
    assert pal.shape[-1] == 3 and pal.std(axis=-1).mean() > 0.01  # truly coloured through the LUT


def test_multiframe_frame_choice():
    path = local("rtdose.dcm")
    every = read_image(path, frame="all")
    assert every.ndim == 3 and every.shape[0] == 15
    assert np.array_equal(read_image(path, frame=4), every[4])
    assert np.array_equal(read_image(path), every[0])
    with pytest.raises(ImageReadError, match="frame 15 out of range"):
        read_image(path, frame=15)


def test_pixel_limit_checked_before_decoding(monkeypatch):
    import pydicom.pixels

    calls = []
    monkeypatch.setattr(pydicom.pixels, "pixel_array", lambda *a, **k: calls.append(1))
    data = Path(local("rtdose.dcm")).read_bytes()  # 10 x 10 x 15 frames
    with pytest.raises(ImageReadError, match=r"image too large \(10x10x15 pixels, limit 1000\)"):
        read_image_bytes(data, "bomb.dcm", max_pixels=1000)
    assert calls == []  # refused from the header alone


# --- the real CT kit -------------------------------------------------------------------------


def test_ct_kit_hounsfield_units_and_vendor_site(shared_data):
    from remedis.data import read_manifest

    kit = shared_data / "ct-dicom" / "manifest.csv"
    if not kit.is_file():
        pytest.skip(f"{kit} not present")
    records = read_manifest(kit).records
    stats: dict[str, list] = {}
    for r in records:
        hu = read_image(r.image, window="raw")
        assert hu.shape == (512, 512) and np.isfinite(hu).all()
        # Air (inside the field of view; GE pads outside it with -2048/-3024) and the body.
        air, body = hu[(hu > -1100) & (hu < -500)], hu[hu > -400]
        stats.setdefault(r.site, []).append((np.median(air), np.median(body), ((body > -100) & (body < 100)).mean()))
    assert set(stats) == {"SIEMENS", "GE MEDICAL SYSTEMS"}
    for site, values in stats.items():
        air, body, soft = np.median(np.array(values), axis=0)
        assert -1030 < air < -930, (site, air)  # air is -1000 HU
        assert -100 < body < 80, (site, body)  # soft tissue / fat / water around 0 HU
        assert soft > 0.4, (site, soft)
    for r in records[:: max(1, len(records) // 6)]:
        ds = pydicom.dcmread(r.image, stop_before_pixels=True)
        assert ds.Manufacturer == r.site  # the kit's site is the scanner vendor in the header
        default = read_image(r.image)  # the file's own window, in [0, 1]
        assert default.min() >= 0 and default.max() <= 1 and default.std() > 0.05
