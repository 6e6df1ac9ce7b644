import numpy as np
import pytest
from PIL import Image

from remedis.data import ManifestError, assign_splits, budget_subset, read_manifest, write_manifest


def make_png(path, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)


def test_missing_columns_named(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("image,label,site\na.png,x,s\n")
    with pytest.raises(ManifestError, match=r"m\.csv: missing required column\(s\) patient_id"):
        read_manifest(p)


def test_missing_files_named_with_row(tmp_path):
    make_png(tmp_path / "ok.png")
    p = tmp_path / "m.csv"
    p.write_text("image,label,site,patient_id\nok.png,a,s,p1\ngone.png,b,s,p2\n")
    with pytest.raises(ManifestError, match=r"1 image file\(s\) not found \(row 3: gone\.png\)"):
        read_manifest(p)


def test_bad_split_value(tmp_path):
    make_png(tmp_path / "ok.png")
    p = tmp_path / "m.csv"
    p.write_text("image,label,site,patient_id,split\nok.png,a,s,p1,training\n")
    with pytest.raises(ManifestError, match="row 2: split 'training'"):
        read_manifest(p)


def test_roundtrip_relative_paths_and_meta(tmp_path):
    make_png(tmp_path / "img" / "a.png")
    p = tmp_path / "m.csv"
    p.write_text("image,label,site,patient_id,device\nimg/a.png,x,s1,p1,scannerA\n")
    m = read_manifest(p)
    assert m.records[0].image == (tmp_path / "img" / "a.png").resolve()
    assert m.records[0].meta == {"device": "scannerA"}
    assert len(m.sha256) == 64
    out = write_manifest(m, tmp_path / "copy.csv")
    again = read_manifest(out)
    assert again.records[0].image == m.records[0].image and again.records[0].meta == {"device": "scannerA"}


def records(n_patients=60, per_patient=2, sites=("a", "b")):
    from pathlib import Path

    from remedis.data import Record

    out = []
    for s in sites:
        for p in range(n_patients):
            for k in range(per_patient):
                out.append(Record(Path(f"/x/{s}{p}_{k}.png"), "pos" if p % 3 == 0 else "neg", s, f"{s}{p}"))
    return out


def test_splits_are_by_patient_stratified_and_deterministic():
    recs = assign_splits(records(), (0.6, 0.2, 0.2), seed=0)
    split_of = {}
    for r in recs:
        assert split_of.setdefault(r.patient_id, r.split) == r.split  # no patient in two splits
    for s in ("a", "b"):
        for split in ("train", "val", "test"):
            labels = {r.label for r in recs if r.site == s and r.split == split}
            assert labels == {"pos", "neg"}
    n_train = sum(r.split == "train" for r in recs if r.site == "a")
    assert abs(n_train / 120 - 0.6) < 0.05
    assert [r.split for r in assign_splits(records(), seed=0)] == [r.split for r in recs]
    assert [r.split for r in assign_splits(records(), seed=1)] != [r.split for r in recs]


def test_budgets_are_nested_and_keep_every_label():
    train = records(n_patients=100, per_patient=1, sites=("a",))
    subsets = [set(r.image for r in budget_subset(train, f, seed=0)) for f in (0.01, 0.05, 0.1, 0.25, 1.0)]
    for small, big in zip(subsets, subsets[1:]):
        assert small <= big
    assert len(subsets[-1]) == 100
    one = budget_subset(train, 0.01, seed=0)
    assert {r.label for r in one} == {"pos", "neg"}
    assert len(budget_subset(train, 10, seed=0)) in (10, 11)
    with pytest.raises(ValueError):
        budget_subset(train, 1.5)
