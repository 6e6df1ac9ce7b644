"""Tests for the embedded synthetic multi-site dataset (remedis.data.synthetic)."""

from __future__ import annotations

import csv
import dataclasses
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from scipy import ndimage

from remedis.data.synthetic import (
    DEFAULT_SITES,
    SiteSpec,
    SyntheticSpec,
    generate_synthetic,
    write_dicom,
)

REQUIRED = ["image", "label", "site", "patient_id", "split"]
SMALL = SyntheticSpec(patients_per_site=30, image_size=48)


def read_rows(manifest: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(manifest, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def load01(path: Path) -> np.ndarray:
    """Pixels mapped to [0, 1] by their storage range (8-bit PNG, 12-bit DICOM)."""
    if path.suffix == ".dcm":
        return pydicom.dcmread(path).pixel_array.astype(np.float64) / 4095.0
    with Image.open(path) as im:
        assert im.mode == "L"
        return np.asarray(im, dtype=np.float64) / 255.0


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    manifest = generate_synthetic(tmp_path_factory.mktemp("synth"), SMALL, seed=0)
    header, rows = read_rows(manifest)
    images = {r["image"]: load01(manifest.parent / r["image"]) for r in rows}
    return manifest, header, rows, images


def lesion_darkness(img: np.ndarray) -> float:
    """Hand-crafted feature: how dark the darkest smoothed blob is relative to the tissue."""
    s = ndimage.gaussian_filter(img, 2.0)
    return float(1.0 - s.min() / np.median(s))


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score))


# --------------------------------------------------------------------------- manifest / files


def test_manifest_columns_and_rows(small):
    manifest, header, rows, _ = small
    assert header[:5] == REQUIRED
    with open(manifest) as f:
        assert f.readline().strip().split(",")[:5] == REQUIRED
    n_files = sum(1 for p in (manifest.parent / "images").rglob("*") if p.is_file())
    assert len(rows) == n_files
    per_patient = defaultdict(list)
    for r in rows:
        assert not r["image"].startswith("/") and "\\" not in r["image"]
        assert r["image"].startswith(f"images/{r['site']}/")
        assert r["label"] in ("benign", "malignant")
        assert r["split"] in ("train", "val", "test")
        per_patient[r["patient_id"]].append(int(r["view"]))
    assert len(per_patient) == SMALL.patients_per_site * len(SMALL.sites)
    for views in per_patient.values():
        assert sorted(views) == list(range(len(views)))
        assert 1 <= len(views) <= SMALL.max_images_per_patient
    # views really vary per patient (some patients have several)
    assert max(len(v) for v in per_patient.values()) > 1
    assert min(len(v) for v in per_patient.values()) == 1


def test_images_exist_and_load_at_size(small):
    manifest, _, rows, images = small
    for r in rows:
        path = manifest.parent / r["image"]
        assert path.is_file()
        assert images[r["image"]].shape == (SMALL.image_size, SMALL.image_size)
        assert 0.0 <= images[r["image"]].min() and images[r["image"]].max() <= 1.0
    fmt = {s.name: s.file_format for s in SMALL.sites}
    assert {Path(r["image"]).suffix[1:] for r in rows if r["site"] == "site-C"} == {fmt["site-C"]} == {"dcm"}


def test_dicom_files_are_valid(small):
    manifest, _, rows, _ = small
    dcm_rows = [r for r in rows if r["image"].endswith(".dcm")]
    assert dcm_rows
    for r in dcm_rows[:10]:
        path = manifest.parent / r["image"]
        assert path.read_bytes()[128:132] == b"DICM"  # Part-10 preamble
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.PatientID == r["patient_id"]
        assert ds.Manufacturer == r["site"]
        assert ds.Modality == "US"
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (16, 12, 0)
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        arr = ds.pixel_array
        assert arr.dtype == np.uint16 and arr.max() <= 4095 and arr.max() > 255


def test_labels_and_splits(small):
    _, _, rows, _ = small
    combos = {(r["site"], r["split"], r["label"]) for r in rows}
    for site in SMALL.sites:
        for split in ("train", "val", "test"):
            for label in ("benign", "malignant"):
                assert (site.name, split, label) in combos
    # malignant fraction by patient, per site
    for site in SMALL.sites:
        labels = {r["patient_id"]: r["label"] for r in rows if r["site"] == site.name}
        n_mal = sum(v == "malignant" for v in labels.values())
        assert n_mal == round(SMALL.malignant_fraction * SMALL.patients_per_site)
        splits = defaultdict(set)
        for r in rows:
            if r["site"] == site.name:
                splits[r["split"]].add(r["patient_id"])
        assert len(splits["train"]) > len(splits["val"]) and len(splits["train"]) > len(splits["test"])


def test_no_patient_leak_and_all_sites(small):
    _, _, rows, _ = small
    split_of, site_of, label_of = {}, {}, {}
    for r in rows:
        pid = r["patient_id"]
        assert split_of.setdefault(pid, r["split"]) == r["split"]
        assert site_of.setdefault(pid, r["site"]) == r["site"]  # ids unique across sites
        assert label_of.setdefault(pid, r["label"]) == r["label"]
    assert {r["site"] for r in rows} == {s.name for s in SMALL.sites}


# --------------------------------------------------------------------------- content


def test_sites_differ(small):
    _, _, rows, images = small
    mean, noise = defaultdict(list), defaultdict(list)
    for r in rows:
        img = images[r["image"]]
        mean[r["site"]].append(img.mean())
        noise[r["site"]].append((img - ndimage.gaussian_filter(img, 1.0)).std())  # high-frequency energy
    m = {k: np.array(v) for k, v in mean.items()}
    n = {k: np.array(v) for k, v in noise.items()}

    def separated(a, b):  # difference of means large vs the within-site spread
        return abs(a.mean() - b.mean()) > 3 * (a.std() + b.std())

    # B: heavy speckle; C: blurred + low resolution
    assert n["site-B"].min() > 2 * n["site-C"].max()
    assert separated(n["site-B"], n["site-C"]) and separated(n["site-A"], n["site-C"])
    assert n["site-B"].mean() > n["site-A"].mean() > n["site-C"].mean()
    # B darker gain, C brighter
    assert m["site-B"].mean() < m["site-A"].mean() < m["site-C"].mean()
    assert separated(m["site-A"], m["site-B"]) and separated(m["site-A"], m["site-C"])


def test_lesions_are_hypoechoic(small):
    _, _, rows, images = small
    for r in rows:
        if r["site"] == "site-A":
            assert lesion_darkness(images[r["image"]]) > 0.25


def test_label_depends_on_content(tmp_path):
    # One site, one view per patient, many patients: a single hand-crafted feature
    # (darkness of the lesion) must separate the labels better than chance.
    spec = SyntheticSpec(sites=(DEFAULT_SITES[0],), patients_per_site=200, max_images_per_patient=1, image_size=48)
    manifest = generate_synthetic(tmp_path, spec, seed=0)
    _, rows = read_rows(manifest)
    y = np.array([r["label"] == "malignant" for r in rows])
    x = np.array([lesion_darkness(load01(manifest.parent / r["image"])) for r in rows])
    score = auroc(y, x)
    assert score > 0.65, score
    assert score < 0.99, score  # not trivially separable by one global statistic


def test_views_show_the_same_lesion(small):
    # MICLe positives: views of one patient share the lesion (same darkness, nearby position).
    _, _, rows, images = small
    by_patient = defaultdict(list)
    for r in rows:
        if r["site"] == "site-A":
            by_patient[r["patient_id"]].append(images[r["image"]])
    feats = {}
    for pid, imgs in by_patient.items():
        pos = [np.unravel_index(np.argmin(ndimage.gaussian_filter(im, 2.0)), im.shape) for im in imgs]
        feats[pid] = [(np.array(p, float), lesion_darkness(im)) for p, im in zip(pos, imgs)]
    same_d, same_k = [], []
    for f in feats.values():
        for i in range(1, len(f)):
            same_d.append(np.linalg.norm(f[0][0] - f[i][0]))
            same_k.append(abs(f[0][1] - f[i][1]))
    pids = sorted(feats)
    cross_d = [np.linalg.norm(feats[a][0][0] - feats[b][0][0]) for a, b in zip(pids, pids[1:])]
    cross_k = [abs(feats[a][0][1] - feats[b][0][1]) for a, b in zip(pids, pids[1:])]
    assert len(same_d) >= 5
    assert np.mean(same_d) < 0.8 * np.mean(cross_d)
    assert np.mean(same_k) < 0.5 * np.mean(cross_k)


# --------------------------------------------------------------------------- determinism


def test_deterministic_same_seed(small, tmp_path):
    manifest, _, rows, images = small
    again = generate_synthetic(tmp_path / "again", SMALL, seed=0)
    assert again.read_text() == manifest.read_text()
    for r in rows:
        a, b = manifest.parent / r["image"], again.parent / r["image"]
        if a.suffix == ".png":
            assert a.read_bytes() == b.read_bytes()
        else:
            np.testing.assert_array_equal(pydicom.dcmread(a).pixel_array, pydicom.dcmread(b).pixel_array)


def test_site_output_independent_of_other_sites(small, tmp_path):
    # Per-image seeds: generating site-A alone gives exactly the same site-A data.
    manifest, _, rows, _ = small
    only_a = generate_synthetic(tmp_path, dataclasses.replace(SMALL, sites=SMALL.sites[:1]), seed=0)
    _, rows_a = read_rows(only_a)
    assert rows_a == [r for r in rows if r["site"] == "site-A"]
    for r in rows_a:
        assert (only_a.parent / r["image"]).read_bytes() == (manifest.parent / r["image"]).read_bytes()


def test_different_seed_differs(small, tmp_path):
    _, _, rows, images = small
    other = generate_synthetic(tmp_path, SMALL, seed=1)
    _, rows1 = read_rows(other)
    r0 = rows[0]
    assert r0["image"] in {r["image"] for r in rows1}
    assert not np.array_equal(images[r0["image"]], load01(other.parent / r0["image"]))
    assert [r["label"] for r in rows1] != [r["label"] for r in rows] or [r["split"] for r in rows1] != [
        r["split"] for r in rows
    ]


# --------------------------------------------------------------------------- write_dicom / validation


def test_write_dicom_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    px = rng.integers(0, 4096, size=(20, 30), dtype=np.uint16)
    write_dicom(tmp_path / "a.dcm", px, patient_id="X0001", site="hospital-x")
    ds = pydicom.dcmread(tmp_path / "a.dcm")
    np.testing.assert_array_equal(ds.pixel_array, px)
    assert ds.PatientID == "X0001" and ds.Manufacturer == "hospital-x" and ds.InstitutionName == "hospital-x"
    assert ds.Modality == "US" and ds.BitsStored == 12
    assert pydicom.uid.UID(ds.SOPInstanceUID).is_valid
    # wider values fall back to 16 stored bits instead of being corrupted
    wide = px.astype(np.uint16) * 16
    write_dicom(tmp_path / "b.dcm", wide, patient_id="X0002", site="hospital-x", modality="OT")
    ds = pydicom.dcmread(tmp_path / "b.dcm")
    np.testing.assert_array_equal(ds.pixel_array, wide)
    assert ds.Modality == "OT"
    with pytest.raises(ValueError):
        write_dicom(tmp_path / "c.dcm", px.astype(np.float32), patient_id="X", site="s")
    with pytest.raises(ValueError):
        write_dicom(tmp_path / "d.dcm", px[None], patient_id="X", site="s")


A = DEFAULT_SITES[0]


@pytest.mark.parametrize(
    "spec",
    [
        SyntheticSpec(sites=()),
        SyntheticSpec(sites=(A, dataclasses.replace(A, speckle=0.5))),  # duplicate names
        SyntheticSpec(split_fractions=(0.5, 0.2, 0.2)),
        SyntheticSpec(split_fractions=(1.2, -0.1, -0.1)),
        SyntheticSpec(sites=(dataclasses.replace(A, file_format="jpg"),)),
        SyntheticSpec(image_size=8),
        SyntheticSpec(patients_per_site=0),
        SyntheticSpec(malignant_fraction=1.5),
        SyntheticSpec(sites=(SiteSpec("x", speckle=0.1, gain=0.0, blur=0.0, resolution=1.0, gamma=1.0),)),
    ],
)
def test_bad_spec_raises(spec, tmp_path):
    with pytest.raises(ValueError):
        generate_synthetic(tmp_path, spec)
    assert not (tmp_path / "manifest.csv").exists()
