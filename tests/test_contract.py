"""The input contract (remedis.data.contract): header facts of real files, a fit/check round trip, that a
site's own held-out images conform, and that other modalities are flagged with a reason (the real CT,
dermoscopy, chest X-ray and breast-ultrasound kits of ../shared/data when present, pydicom's files always)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from PIL import Image

from remedis.data.contract import InputContract, SourceInfo, describe_bytes, describe_file
from remedis.data.dataset import load_images
from remedis.data.manifest import read_manifest
from remedis.data.preprocess import Preprocessing
from remedis.data.readers import ImageReadError, read_image

PRE = Preprocessing(image_size=64)


def _pydicom_file(name: str) -> str:
    from pydicom.data import get_testdata_file

    return get_testdata_file(name)  # CT_small.dcm, JPEG2000.dcm: shipped with pydicom, no download


def _save(path, arr, fmt: str | None = None, **kw):
    Image.fromarray(arr).save(path, format=fmt, **kw)
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Small synthetic ultrasound (sites A, B as PNG, C as DICOM with Modality US): the train images'
    contract and the held-out test images."""
    from remedis.data.synthetic import SyntheticSpec, generate_synthetic

    spec = SyntheticSpec(patients_per_site=40, image_size=64)
    manifest = read_manifest(generate_synthetic(tmp_path_factory.mktemp("synth"), spec, seed=0))
    train = load_images(manifest.select(split="train"), PRE)
    test = load_images(manifest.select(split="test"), PRE)
    contract = InputContract.fit([describe_file(r.image, r.meta.get("modality")) for r in train.records], train.pixels)
    return {"contract": contract, "train": train, "test": test}


def _check_file(contract: InputContract, path) -> list[str]:
    return contract.check(describe_file(path), PRE.resize(read_image(path)))


# ---- header facts ------------------------------------------------------------------------------------

def test_describe_reads_dicom_headers_and_bytes_agree():
    ct, nm = _pydicom_file("CT_small.dcm"), _pydicom_file("JPEG2000.dcm")
    info = describe_file(ct)
    assert info == SourceInfo("dicom", "CT", "MONOCHROME2", 1, 128, 128, 1)
    assert describe_bytes(open(ct, "rb").read(), "upload.dcm") == info
    assert describe_file(nm).modality == "NM" and (describe_file(nm).rows, describe_file(nm).columns) == (1024, 256)
    assert describe_file(ct, modality_hint="US").modality == "CT"  # the header wins over the manifest's hint


def test_describe_png_jpeg_and_palette_from_the_header(tmp_path):
    rng = np.random.default_rng(0)
    grey = _save(tmp_path / "g.png", (rng.random((30, 40)) * 255).astype(np.uint8))
    assert describe_file(grey) == SourceInfo("png", None, "MONOCHROME2", 1, 30, 40, 1)
    assert describe_file(grey, modality_hint="us").modality == "US"
    deep = _save(tmp_path / "d.png", (rng.random((8, 9)) * 60000).astype(np.uint16))
    assert describe_file(deep).photometric == "MONOCHROME2" and describe_file(deep).channels == 1
    rgb = _save(tmp_path / "c.jpg", (rng.random((20, 24, 3)) * 255).astype(np.uint8), "JPEG")
    assert describe_file(rgb) == SourceInfo("jpeg", None, "RGB", 3, 20, 24, 1)
    rgba = io.BytesIO()
    Image.fromarray(np.zeros((5, 6, 4), np.uint8)).save(rgba, format="PNG")
    assert describe_bytes(rgba.getvalue()).channels == 3
    # A palette image is grey when its palette is, colour otherwise (no pixel is decoded for either).
    p_grey = Image.fromarray((rng.random((10, 10)) * 255).astype(np.uint8)).convert("P")
    p_grey.save(tmp_path / "pg.png")
    assert describe_file(tmp_path / "pg.png").channels == 1
    p_col = Image.fromarray((rng.random((10, 10, 3)) * 255).astype(np.uint8)).convert("P", palette=Image.ADAPTIVE)
    p_col.save(tmp_path / "pc.png")
    assert describe_file(tmp_path / "pc.png").photometric == "PALETTE COLOR" and describe_file(tmp_path / "pc.png").channels == 3


def test_describe_nifti_from_its_header(tmp_path):
    nib = pytest.importorskip("nibabel")
    nib.save(nib.Nifti1Image(np.zeros((20, 30, 5), np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    info = describe_file(tmp_path / "v.nii.gz", modality_hint="MR")
    assert info == SourceInfo("nifti", "MR", "MONOCHROME2", 1, 20, 30, 5)
    assert describe_bytes((tmp_path / "v.nii.gz").read_bytes(), "v.nii.gz", modality_hint="MR") == info


def test_describe_errors_name_the_file_and_are_image_read_errors(tmp_path):
    bad = tmp_path / "scan_7.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match="scan_7.png: not a readable image"):
        describe_file(bad)
    with pytest.raises(ImageReadError, match="missing.png: cannot read file"):
        describe_file(tmp_path / "missing.png")
    with pytest.raises(ImageReadError, match="upload: empty file"):
        describe_bytes(b"", "upload")
    import pydicom

    ds = pydicom.dcmread(_pydicom_file("CT_small.dcm"))
    del ds.Rows
    ds.save_as(tmp_path / "norows.dcm")
    with pytest.raises(ImageReadError, match="norows.dcm: DICOM header has no image size"):
        describe_file(tmp_path / "norows.dcm")


# ---- fit / check -------------------------------------------------------------------------------------

def test_fit_records_the_training_set_and_round_trips_through_json(synthetic):
    c = synthetic["contract"]
    assert c.modalities == ["US"] and c.channels == [1] and c.formats == ["dicom", "png"]
    assert c.photometric == ["MONOCHROME2"] and c.rows == [64, 64] and c.columns == [64, 64]
    assert c.n_images == len(synthetic["train"]) and c.image_size == 64
    assert set(c.intensity) >= {"mean", "std"} and c.profile["threshold"] > 0
    back = InputContract.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back == c
    x = synthetic["test"].pixels[0].float()
    assert back.check(describe_file(synthetic["test"].records[0].image), x) == c.check(describe_file(synthetic["test"].records[0].image), x)
    # Missing keys are unknown facts: an empty contract checks nothing.
    empty = InputContract.from_dict({"modalities": ["US"]})
    assert empty.channels == [] and empty.profile == {}
    assert empty.check(SourceInfo("dicom", "US", "RGB", 3, 9000, 9000), torch.zeros(1, 64, 64)) == []
    with pytest.raises(ValueError, match="aligned"):
        InputContract.fit([None], torch.zeros(2, 1, 8, 8))


def test_held_out_images_of_the_training_sites_conform(synthetic):
    c, test = synthetic["contract"], synthetic["test"]
    reasons = [c.check(describe_file(r.image), x) for r, x in zip(test.records, test.pixels)]
    flagged = [r for r in reasons if r]
    assert len(test) >= 40 and len(flagged) <= 0.01 * len(test), flagged[:3]
    # Pixels of another size are resized to the contract's: the same verdict.
    r0 = test.records[0]
    assert c.check(describe_file(r0.image), Preprocessing(96).resize(read_image(r0.image))) == []


def test_mismatches_are_named_without_identifiers(synthetic, tmp_path):
    c = synthetic["contract"]
    grey = SourceInfo("png", None, "MONOCHROME2", 1, 64, 64)
    x = synthetic["test"].pixels[0].float()
    assert c.check(grey, x) == []
    assert c.check(SourceInfo("jpeg", None, "RGB", 3, 64, 64), x) == ["colour image (3 channels), model trained on grey (1)"]
    assert c.check(SourceInfo("dicom", "CT", "MONOCHROME2", 1, 64, 64), x) == ["modality CT, model trained on US"]
    assert c.check(SourceInfo("png", None, "MONOCHROME2", 1, 28, 28), x) == ["image 28x28 px, model trained on 64-64 x 64-64 px"]
    assert c.check(SourceInfo("png", None, "MONOCHROME2", 1, 100, 120), x) == []  # within 2x: not a mismatch
    assert c.check(SourceInfo("dicom", None, "PALETTE COLOR", 1, 64, 64), x) == [
        "photometric interpretation PALETTE COLOR, model trained on MONOCHROME2"]
    # Pixels alone: a white image, and a smooth gradient whose mean and std are ordinary.
    white = c.check(None, torch.ones(1, 64, 64))
    assert "intensity std 0.00 outside the training range" in white[0]
    ramp = torch.linspace(0.2, 0.7, 64).expand(64, 64)
    assert any("profile" in r for r in c.check(grey, ramp))
    # A DICOM header full of identifiers: only modality and code strings reach a reason.
    import pydicom

    ds = pydicom.dcmread(_pydicom_file("CT_small.dcm"))
    ds.PatientName, ds.PatientID = "Quixote^Dulcinea", "PID-93417"
    ds.save_as(tmp_path / "Quixote_PID-93417.dcm")
    reasons = _check_file(c, tmp_path / "Quixote_PID-93417.dcm")
    assert reasons[0] == "modality CT, model trained on US"
    assert not any(s in " ".join(reasons) for s in ("Quixote", "Dulcinea", "93417"))


# ---- other modalities --------------------------------------------------------------------------------

def test_nuclear_medicine_dicom_is_flagged_for_modality(synthetic):
    reasons = _check_file(synthetic["contract"], _pydicom_file("JPEG2000.dcm"))
    assert reasons[0] == "modality NM, model trained on US"


def _kit(name: str):
    path = SHARED_DATA / name / "manifest.csv"
    if not path.is_file():
        pytest.skip(f"real data kit {name} not present at {path.parent}")
    return read_manifest(path)


def test_real_ct_slices_are_flagged_against_ultrasound(synthetic):
    records = _kit("ct-dicom").records
    c = synthetic["contract"]
    reasons = [_check_file(c, r.image) for r in records]
    assert len(reasons) >= 50 and all(r and r[0] == "modality CT, model trained on US" for r in reasons)


def test_colour_dermoscopy_is_flagged_for_channels(synthetic):
    records = _kit("dermoscopy").records[:50]
    for r in records:
        assert "colour image (3 channels), model trained on grey (1)" in _check_file(synthetic["contract"], r.image)


def test_breast_ultrasound_contract_passes_its_own_modality_and_flags_others():
    """Fitted on BUS-BRA (PNG, modality unknown): its held-out images and the other ultrasound site
    (BUSI) mostly conform, CT slices and adult chest X-rays are flagged on their pixels alone."""
    from remedis.data.splits import assign_splits

    bus = _kit("breast-ultrasound")
    records = assign_splits(bus.select(site="BUS-BRA"), (0.8, 0.1, 0.1), seed=0)
    train = load_images([r for r in records if r.split == "train"], PRE)
    contract = InputContract.fit([describe_file(r.image) for r in train.records], train.pixels)
    assert contract.modalities == [] and contract.channels == [1]

    def flagged(recs) -> float:
        cache = load_images(recs, PRE)
        return float(np.mean([bool(contract.check(describe_file(r.image), x)) for r, x in zip(cache.records, cache.pixels)]))

    assert flagged([r for r in records if r.split == "test"]) <= 0.01
    assert flagged(bus.select(site="BUSI")) <= 0.08
    assert flagged(_kit("ct-dicom").records) >= 0.9
    assert flagged(_kit("chest-xray").select(site="NIH")[::4]) >= 0.8


def test_grey_ultrasound_stored_as_rgb_is_read_as_grey_and_a_colour_photo_is_still_colour(synthetic, tmp_path):
    """What most ultrasound scanners send: grey content in RGB. The service's `prepare` reads it as grey
    (no 'colour image' reason against a grey model); a true colour dermoscopy image is still flagged."""
    from remedis.data.contract import stored_grey
    from serving.answer import prepare
    from serving.inputs import check_upload
    from serving.settings import LimitSettings

    busi = next(r for r in _kit("breast-ultrasound").records if r.site == "BUSI")
    rgb = Image.open(busi.image).convert("L").convert("RGB")
    path = tmp_path / "grey-in-rgb.png"
    rgb.save(path)
    derm = _kit("dermoscopy").records[0].image
    assert stored_grey(np.asarray(rgb)) and not stored_grey(np.asarray(Image.open(derm).convert("RGB")))
    contract = synthetic["contract"]
    assert "colour image (3 channels), model trained on grey (1)" in _check_file(contract, path)  # header alone
    for file, flagged in ((path, False), (derm, True)):
        up = check_upload(Path(file).read_bytes(), "image/png" if str(file).endswith(".png") else "image/jpeg", LimitSettings())
        _, reasons = prepare(up, PRE, contract)
        assert ("colour image (3 channels), model trained on grey (1)" in reasons) is flagged, reasons
