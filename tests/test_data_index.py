"""`remedis data index` / `inspect`: manifests from DICOM folders and class sub-folders, pseudonymised
patients, and the inspection report (counts, unreadable files, split leakage)."""

import csv
import json

import numpy as np
import pydicom
import pytest
from PIL import Image

from remedis.data import read_manifest
from remedis.data.index import index_folder, load_salt, pseudonym
from remedis.data.inspect import inspect_manifest
from remedis.data.synthetic import write_dicom

SALT = b"0123456789abcdef0123456789abcdef"


def main(argv):
    """`remedis data ...` through the data stage's own parser (the full CLI imports every stage)."""
    import argparse

    from remedis.commands.data import register

    parser = argparse.ArgumentParser(prog="remedis")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def dicom(path, patient, vendor, body_part=None, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 4000, size=(16, 20)).astype(np.uint16)
    write_dicom(path, pixels, patient_id=patient, site="unused", uid_seed=str(path))
    ds = pydicom.dcmread(path)
    ds.Manufacturer = vendor
    del ds.InstitutionName
    if body_part:
        ds.BodyPartExamined = body_part
    ds.save_as(path)


@pytest.fixture
def dicom_folder(tmp_path):
    root = tmp_path / "incoming"
    dicom(root / "a" / "CONTRAST_1_x.dcm", "MRN-0001", "SIEMENS", "CHEST", 1)
    dicom(root / "a" / "CONTRAST_0_y.dcm", "MRN-0001", "SIEMENS", "CHEST", 2)
    dicom(root / "b" / "CONTRAST_1_z", "MRN-0002", "GE MEDICAL SYSTEMS", "ABDOMEN", 3)  # no suffix: found by preamble
    nopix = pydicom.dcmread(root / "a" / "CONTRAST_1_x.dcm")
    del nopix.PixelData
    nopix.save_as(root / "b" / "report.dcm")
    (root / "b" / "notes.bin").write_bytes(b"not an image at all")
    return root


def test_index_dicom_folder_sites_labels_and_pseudonyms(dicom_folder):
    res = index_folder(dicom_folder, SALT, label_regex=r"CONTRAST_(\d)", label_map={"1": "contrast", "0": "plain"})
    by_name = {r.image.name: r for r in res.records}
    assert set(by_name) == {"CONTRAST_1_x.dcm", "CONTRAST_0_y.dcm", "CONTRAST_1_z"}
    assert by_name["CONTRAST_1_z"].site == "GE MEDICAL SYSTEMS" and by_name["CONTRAST_1_x.dcm"].site == "SIEMENS"
    assert [by_name[n].label for n in ("CONTRAST_1_x.dcm", "CONTRAST_0_y.dcm")] == ["contrast", "plain"]
    # Same patient -> same pseudonym; never the identifier itself; depends on the secret.
    assert by_name["CONTRAST_1_x.dcm"].patient_id == by_name["CONTRAST_0_y.dcm"].patient_id == pseudonym("MRN-0001", SALT)
    assert by_name["CONTRAST_1_z"].patient_id != by_name["CONTRAST_1_x.dcm"].patient_id
    assert all("MRN" not in r.patient_id for r in res.records)
    assert pseudonym("MRN-0001", b"another-secret-another-secret!!") != pseudonym("MRN-0001", SALT)
    assert dict(res.skipped) == {"b/notes.bin": "not a readable image (DICOM, PNG, JPEG, TIFF or NIfTI)",
                                 "b/report.dcm": "DICOM file has no pixel data"}
    assert by_name["CONTRAST_1_x.dcm"].meta == {"modality": "US", "rows": "16", "columns": "20"}
    # A label from a header tag, and a site from another tag.
    res = index_folder(dicom_folder, SALT, label_tag="BodyPartExamined", site_tag="Modality")
    assert {r.label for r in res.records} == {"CHEST", "ABDOMEN"} and {r.site for r in res.records} == {"US"}


def test_index_class_subfolders_of_images(tmp_path):
    root = tmp_path / "busi"
    for label, n in (("benign", 3), ("malignant", 2)):
        (root / label).mkdir(parents=True)
        for k in range(n):
            Image.fromarray(np.full((8, 10), 40 * k, np.uint8)).save(root / label / f"case{k}-{'l' if k % 2 else 'r'}.png")
    res = index_folder(root, SALT, site="BUSI", patient_regex=r"^(case\d+)")
    assert sorted((r.label, r.image.name) for r in res.records)[:2] == [("benign", "case0-r.png"), ("benign", "case1-l.png")]
    assert {r.site for r in res.records} == {"BUSI"} and not res.warnings
    res = index_folder(root, SALT)  # no patient information: each image its own patient, with a warning
    assert len({r.patient_id for r in res.records}) == 5 and "own patient" in res.warnings[0]
    assert {r.site for r in res.records} == {"busi"}


def test_cli_index_then_inspect(dicom_folder, tmp_path, capsys):
    out = tmp_path / "m.csv"
    salt = tmp_path / "site.salt"
    assert main(["data", "index", str(dicom_folder), "--output", str(out), "--salt-file", str(salt),
                 "--label-regex", r"CONTRAST_(\d)"]) == 0
    printed = capsys.readouterr().out
    assert "3 images, 2 patients" in printed and "skipped 2 file(s)" in printed
    assert (salt.stat().st_mode & 0o777) == 0o600 and load_salt(salt) == load_salt(salt)
    assert "MRN" not in out.read_text() and "MRN" not in printed
    m = read_manifest(out)
    assert len(m) == 3 and m.sites() == ["GE MEDICAL SYSTEMS", "SIEMENS"]
    # Re-indexing with the same secret gives the same pseudonyms.
    main(["data", "index", str(dicom_folder), "--output", str(tmp_path / "m2.csv"), "--salt-file", str(salt)])
    assert {r.patient_id for r in read_manifest(tmp_path / "m2.csv").records} == {r.patient_id for r in m.records}
    capsys.readouterr()
    assert main(["data", "inspect", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 3 and summary["patients"] == 2
    assert summary["sites"] == {"GE MEDICAL SYSTEMS": 1, "SIEMENS": 2}
    assert summary["labels"] == {"0": 1, "1": 2} and summary["modalities"] == {"US": 3}
    assert summary["sizes"] == {"16x20": 3} and summary["unreadable_count"] == 0


def test_inspect_reports_unreadable_duplicates_and_leakage(tmp_path, capsys):
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(np.zeros((6, 6), np.uint8)).save(tmp_path / name)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "bad.png").write_bytes(data[: len(data) // 2])  # truncated inside the pixel data
    (tmp_path / "m.csv").write_text(
        "image,label,site,patient_id,split\n"
        "a.png,x|y,s,SECRET-ID-1,train\n"
        "b.png,x,s,SECRET-ID-1,test\n"  # the same patient in two splits
        "c.png,y,s,p3,val\n"
        "c.png,y,s,p3,val\n"  # exact duplicate
        "bad.png,x,s,p4,train\n"
    )
    s = inspect_manifest(tmp_path / "m.csv")
    assert s["images"] == 4 and s["duplicate_rows"] == 1
    assert s["labels"] == {"x": 3, "y": 2} and s["multi_label_rows"] == 1
    assert s["patients_in_several_splits"] == 1 and s["leaking_rows"] == [[2, 3]]
    assert s["unreadable_count"] == 1 and s["unreadable"][0]["image"] == "bad.png"
    assert s["unreadable"][0]["row"] == 6  # the CSV's own row number
    assert main(["data", "inspect", str(tmp_path / "m.csv")]) == 0
    text = capsys.readouterr().out
    assert "patients in more than one split: 1" in text and "SECRET-ID" not in text
    assert "bad.png: corrupt or truncated image" in text


# --- the real kits --------------------------------------------------------------------------------


def test_index_and_inspect_the_ct_kit(shared_data, tmp_path):
    kit = shared_data / "ct-dicom"
    if not (kit / "manifest.csv").is_file():
        pytest.skip(f"{kit} not present")
    res = index_folder(kit, SALT, label_regex=r"CONTRAST_(\d)", label_map={"1": "contrast", "0": "no_contrast"})
    assert not res.skipped and len(res.records) == 100
    with open(kit / "manifest.csv") as fh:
        truth = {(kit / row["image"]).resolve(): row for row in csv.DictReader(fh)}
    for r in res.records:
        assert r.label == truth[r.image]["label"] and r.site == truth[r.image]["site"]
        assert r.patient_id == pseudonym(truth[r.image]["patient_id"], SALT)
    assert len({r.patient_id for r in res.records}) == 54
    s = inspect_manifest(kit / "manifest.csv", decode=False)
    assert s["sites"] == {"GE MEDICAL SYSTEMS": 33, "SIEMENS": 67} and s["modalities"] == {"CT": 100}
    assert s["sizes"] == {"512x512": 100} and s["unreadable_count"] == 0


def test_inspect_the_breast_ultrasound_kit(shared_data):
    kit = shared_data / "breast-ultrasound" / "manifest.csv"
    if not kit.is_file():
        pytest.skip(f"{kit} not present")
    s = inspect_manifest(kit, decode=False)
    assert s["sites"] == {"BUS-BRA": 1875, "BUSI": 780} and s["modalities"] == {"PNG": 2655}
    assert set(s["labels"]) == {"benign", "malignant", "normal"} and s["unreadable_count"] == 0
