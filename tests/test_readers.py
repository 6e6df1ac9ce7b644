import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from remedis.data import ImageReadError, read_image, read_image_bytes
from remedis.data.synthetic import write_dicom


def test_png_reads_to_unit_range(tmp_path):
    arr = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    Image.fromarray(arr).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.float32 and out.shape == (8, 8)
    assert np.allclose(out, arr / 255.0)


def test_dicom_matches_pydicom_voi_pipeline(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(200, 3000, size=(32, 40)).astype(np.uint16)
    write_dicom(tmp_path / "x.dcm", pixels, patient_id="P1", site="S")
    ds = pydicom.dcmread(tmp_path / "x.dcm")
    reference = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds) / (2 ** ds.BitsStored - 1)
    assert np.allclose(read_image(tmp_path / "x.dcm"), reference, atol=1e-6)


def test_pydicom_corpus_sample_decodes_or_fails_cleanly():
    from pydicom.data import get_testdata_file

    ct = read_image(get_testdata_file("CT_small.dcm"))
    assert ct.shape == (128, 128) and np.isfinite(ct).all() and 0 <= ct.min() < ct.max() <= 1
    mr = read_image(get_testdata_file("MR_small_RLE.dcm"))  # compressed transfer syntax (RLE)
    assert mr.shape == (64, 64) and np.isfinite(mr).all()


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"hello world, not an image", "not a readable image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "image"),
])
def test_bad_bytes_raise_clear_errors(data, reason):
    with pytest.raises(ImageReadError, match=reason):
        read_image_bytes(data, name="upload.png")


def test_dicom_without_pixels_is_named(tmp_path):
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    with pytest.raises(ImageReadError, match="nopix.dcm: DICOM file has no pixel data"):
        read_image(tmp_path / "nopix.dcm")


def test_nifti_slices(tmp_path):
    import nibabel as nib

    vol = np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii.gz")
    mid = read_image(tmp_path / "v.nii.gz")  # the middle slice of the last axis by default
    s = vol[..., 2]
    assert np.allclose(mid, (s - s.min()) / (s.max() - s.min()))
    assert read_image(tmp_path / "v.nii.gz", frame="all").shape == (4, 6, 5)
    assert read_image(tmp_path / "v.nii.gz", frame=0, channels=3).shape == (6, 5, 3)
    with pytest.raises(ImageReadError, match="v.nii.gz: image too large"):
        read_image(tmp_path / "v.nii.gz", max_pixels=100)
    (tmp_path / "bad.nii").write_bytes(b"not nifti")
    with pytest.raises(ImageReadError, match="bad.nii: not a readable NIfTI file"):
        read_image(tmp_path / "bad.nii")


def test_rgb_channels_layout(tmp_path):
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0] = 255
    Image.fromarray(rgb).save(tmp_path / "red.png")
    out = read_image(tmp_path / "red.png", channels=3)
    assert out.shape == (4, 6, 3) and np.allclose(out[..., 0], 1) and np.allclose(out[..., 1:], 0)
    gray = read_image(tmp_path / "red.png")
    assert gray.shape == (4, 6) and np.allclose(gray, 76 / 255, atol=1 / 255)  # PIL's L = 0.299 R
