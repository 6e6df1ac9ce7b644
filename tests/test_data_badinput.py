"""Bad input: every broken file or manifest gets one clear line naming it, or a counted skip."""

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

import remedis.data.readers as readers
from remedis.data import ImageReadError, ManifestError, Preprocessing, Record, load_images, read_image, read_manifest


def ct_small() -> Path:
    return Path(get_testdata_file("CT_small.dcm", download=False))


def png(path: Path, size=(24, 24), seed=0) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, size, dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def bad_files(tmp_path):
    files = {}
    files["missing"] = tmp_path / "gone.png"
    files["empty"] = tmp_path / "empty.dcm"
    files["empty"].write_bytes(b"")
    data = ct_small().read_bytes()
    files["truncated_dicom"] = tmp_path / "half.dcm"
    files["truncated_dicom"].write_bytes(data[: len(data) // 2])
    files["text"] = tmp_path / "notes.png"
    files["text"].write_text("patient notes, not an image\n")
    full = png(tmp_path / "full.png", (64, 64)).read_bytes()
    files["truncated_png"] = tmp_path / "cut.png"
    files["truncated_png"].write_bytes(full[: len(full) // 2])
    ds = pydicom.dcmread(ct_small())
    del ds.PixelData
    files["no_pixels"] = tmp_path / "nopix.dcm"
    ds.save_as(files["no_pixels"])
    return files


EXPECTED = {
    "missing": "cannot read file (No such file or directory)",
    "empty": "empty file",
    "truncated_dicom": "cannot decode DICOM pixel data",
    "text": "not a readable image (DICOM, PNG, JPEG or TIFF)",
    "truncated_png": "corrupt or truncated image",
    "no_pixels": "DICOM file has no pixel data",
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_bad_file_gives_one_line_naming_it(bad_files, kind):
    path = bad_files[kind]
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and EXPECTED[kind] in msg and "\n" not in msg


def test_load_images_skips_and_counts_bad_files(bad_files, tmp_path):
    good = [png(tmp_path / f"ok{i}.png", seed=i) for i in range(3)]
    records = [Record(p, "a", "s", f"p{i}") for i, p in enumerate([good[0], *bad_files.values(), *good[1:]])]
    for kwargs in ({}, {"cache_dir": tmp_path / "cache"}, {"cache_dir": tmp_path / "cache"}):  # miss, then hit
        cache = load_images(records, Preprocessing(16), **kwargs)
        assert [r.image for r in cache.records] == good and cache.pixels.shape == (3, 1, 16, 16)
        reasons = dict(cache.failures)
        assert len(reasons) == len(bad_files)
        for kind, path in bad_files.items():
            assert EXPECTED[kind] in reasons[path.name], (kind, reasons[path.name])


def test_decompression_bombs_refused_before_decoding(tmp_path, monkeypatch):
    # PNG: the header says 3000 x 3000; the limit is checked on the header.
    Image.new("L", (3000, 3000)).save(tmp_path / "big.png")
    with pytest.raises(ImageReadError, match=r"big\.png: image too large \(.*9000000 pixels.*limit 1000000"):
        read_image(tmp_path / "big.png", max_pixels=1_000_000)
    # A multi-frame TIFF: each frame is small, the frames together are over the limit.
    frames = [Image.new("L", (100, 100)) for _ in range(5)]
    frames[0].save(tmp_path / "stack.tif", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageReadError, match=r"stack\.tif: image too large \(100x100x5 pixels, limit 40000\)"):
        read_image(tmp_path / "stack.tif", max_pixels=40_000)
    assert read_image(tmp_path / "stack.tif", frame="all").shape == (5, 100, 100)
    monkeypatch.setattr(readers, "MAX_PIXELS", 4_000_000)  # the module default applies when not given
    with pytest.raises(ImageReadError, match="image too large"):
        read_image(tmp_path / "big.png")
    # DICOM whose header claims 60000 x 60000 over a few bytes of pixel data.
    ds = pydicom.dcmread(ct_small())
    ds.Rows = ds.Columns = 60000
    ds.save_as(tmp_path / "bomb.dcm")
    with pytest.raises(ImageReadError, match=r"bomb\.dcm: image too large \(60000x60000x1 pixels"):
        read_image(tmp_path / "bomb.dcm")


def test_non_finite_pixels_are_an_error_not_a_silent_zero(tmp_path):
    Image.fromarray(np.array([[0.0, np.nan], [1.0, 2.0]], dtype=np.float32), mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(ImageReadError, match="nan.tif: pixels are not finite"):
        read_image(tmp_path / "nan.tif")


def test_bad_reader_options_are_named():
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        read_image(ct_small(), channels=2)
    with pytest.raises(ValueError, match="window must be"):
        read_image(ct_small(), window="soft")
    with pytest.raises(ImageReadError, match="invalid window width 0"):
        read_image(ct_small(), window=(40, 0))


# --- manifests ------------------------------------------------------------------------------------


def write(tmp_path, text, name="m.csv") -> Path:
    for n in ("a.png", "b.png"):
        if not (tmp_path / n).exists():
            png(tmp_path / n, (8, 8))
    p = tmp_path / name
    p.write_text(text) if isinstance(text, str) else p.write_bytes(text)
    return p


@pytest.mark.parametrize("text,error", [
    ("", r"missing required column\(s\) image, label, site, patient_id.*no header"),
    ("image,label,site,patient_id\n", "manifest has a header but no rows"),
    ("image,label,site\na.png,x,s\n", r"missing required column\(s\) patient_id"),
    ("image,label,site,patient_id,label\na.png,x,s,p,y\n", "column\\(s\\) label appear more than once"),
    ("image,label,site,patient_id\na.png,x,s,p,extra\n", "row 2: more fields than the header has columns"),
    ("image,label,site,patient_id\na.png,x,,p\n", "row 2: empty 'site'"),
    ("image,label,site,patient_id\na.png,x||y,s,p\n", "row 2: label 'x||y' has an empty part"),
    ("image,label,site,patient_id\na.png,x,s,p\na.png,y,s,p\n", "row 3: image a.png already listed in row 2"),
    (b"image,label,site,patient_id\na.png,caf\xe9,s,p\n", "not UTF-8 text"),
    ("image,label,site,patient_id,split\na.png,x,s,p,holdout\n", "row 2: split 'holdout' is not one of"),
])
def test_malformed_manifests_name_file_row_and_field(tmp_path, text, error):
    p = write(tmp_path, text)
    with pytest.raises(ManifestError, match=error) as info:
        read_manifest(p)
    assert str(info.value).startswith(f"{p}: ")


def test_duplicate_rows_are_skipped_and_counted(tmp_path):
    m = read_manifest(write(tmp_path, "image,label,site,patient_id\na.png,x,s,p\nb.png,y,s,q\na.png,x,s,p\na.png,x,s,p\n"))
    assert len(m) == 2 and m.duplicates_skipped == 2 and m.row_numbers == [2, 3]


def test_unknown_labels_are_named(tmp_path):
    p = write(tmp_path, "image,label,site,patient_id\na.png,benign,s,p\nb.png,benign|cyst,s,q\n")
    assert len(read_manifest(p, labels=["benign", "cyst"])) == 2
    with pytest.raises(ManifestError, match=r"1 row\(s\) with a label not among \['benign', 'malignant'\] \(row 3: 'benign\|cyst'\)"):
        read_manifest(p, labels=["benign", "malignant"])
