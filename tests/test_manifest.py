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


def test_absolute_budgets_are_nested_counts_and_keep_every_label():
    train = records(n_patients=100, per_patient=1, sites=("a",))  # 34 pos, 66 neg
    subsets = [budget_subset(train, n, seed=3) for n in (2, 5, 10, 20, 50, 1000)]
    for small, big in zip(subsets, subsets[1:]):
        assert {r.image for r in small} <= {r.image for r in big}
    for n, sub in zip((2, 5, 10, 20, 50), subsets):
        assert n <= len(sub) <= n + 1  # per-label ceil: at most one over
        assert {r.label for r in sub} == {"pos", "neg"}
    assert len(subsets[-1]) == 100
    with pytest.raises(ValueError, match="must be >= 1"):
        budget_subset(train, 0)


def test_multi_label_manifest(tmp_path):
    import torch

    from remedis.data import LabeledDataset, Preprocessing, load_images

    for n in ("a.png", "b.png", "c.png"):
        make_png(tmp_path / n)
    p = tmp_path / "m.csv"
    p.write_text("image,label,site,patient_id\na.png,effusion | nodule,s,p1\nb.png,nodule,s,p2\nc.png,,s,p3\n")
    m = read_manifest(p)
    assert [r.labels for r in m.records] == [("effusion", "nodule"), ("nodule",), ()]
    assert m.records[0].label == "effusion|nodule"  # normalised
    assert m.classes() == ["effusion", "nodule"] and m.is_multilabel()
    labeled = [r for r in m.records if r.labels]
    ds = LabeledDataset(load_images(labeled, Preprocessing(8)), m.classes(), multi_label=True)
    assert torch.equal(ds.targets, torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="not among the model's classes"):
        LabeledDataset(load_images(labeled, Preprocessing(8)), ["nodule"], multi_label=True)
    # Splits and budgets treat each label combination as a stratum: every class stays present.
    recs = []
    from pathlib import Path

    from remedis.data import Record

    for i in range(40):
        recs.append(Record(Path(f"/x/{i}.png"), ["a", "b", "a|b"][i % 3], "s", f"p{i}"))
    sub = budget_subset(recs, 3, seed=0)
    assert {lab for r in sub for lab in r.labels} == {"a", "b"}
    split = assign_splits(recs, seed=0)
    assert {r.split for r in split if r.label == "a|b"} == {"train", "val", "test"}


def _kit(root, name, site, n, label_of):
    rows = ["image,label,site,patient_id,device"]
    for i in range(n):
        make_png(root / name / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{label_of(i)},{site},{site}-p{i // 2},dev-{name}")
    (root / name / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / name / "manifest.csv"


def test_data_split_freezes_the_splits_run_would_draw_and_merge_keeps_them(tmp_path, capsys):
    """`remedis data split` writes the splits `prepare_records` draws (label map and all) with the original
    labels, so the same config applies again; `remedis data merge` keeps splits and metadata and refuses
    a site that two manifests share."""
    from remedis.cli import main
    from remedis.config import RunConfig
    from remedis.stages import prepare_records

    a = _kit(tmp_path, "a", "site-a", 40, lambda i: ["benign", "malignant", "normal"][i % 3])
    b = _kit(tmp_path, "b", "site-b", 30, lambda i: ["no", "yes"][i % 2])
    cfg = tmp_path / "a.yaml"
    cfg.write_text("seed: 3\ndata: {label_map: {benign: other, normal: other}, positive_label: malignant}\n")
    assert main(["data", "split", str(a), "--config", str(cfg), "-o", str(tmp_path / "a-split.csv")]) == 0
    frozen = read_manifest(tmp_path / "a-split.csv")
    drawn = prepare_records(read_manifest(a), RunConfig.from_yaml(cfg).data, 3)
    assert {r.image: r.split for r in frozen.records} == {r.image: r.split for r in drawn.records}
    assert sorted({r.label for r in frozen.records}) == ["benign", "malignant", "normal"]  # original labels
    again = prepare_records(frozen, RunConfig.from_yaml(cfg).data, seed=99)  # splits kept whatever the seed
    assert {r.image: r.split for r in again.records} == {r.image: r.split for r in drawn.records}

    assert main(["data", "merge", str(tmp_path / "a-split.csv"), str(b), "-o", str(tmp_path / "all" / "all.csv")]) == 0
    merged = read_manifest(tmp_path / "all" / "all.csv")
    assert merged.sites() == ["site-a", "site-b"] and len(merged) == 70
    assert {r.image: r.split for r in merged.records if r.site == "site-a"} == {r.image: r.split for r in frozen.records}
    assert all(r.meta["device"] == "dev-b" for r in merged.records if r.site == "site-b")
    capsys.readouterr()
    assert main(["data", "merge", str(a), str(tmp_path / "a-split.csv"), "-o", str(tmp_path / "bad.csv")]) == 2
    assert "site 'site-a' is also in" in capsys.readouterr().err and not (tmp_path / "bad.csv").exists()
