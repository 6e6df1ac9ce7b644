"""`remedis adapt` on a site that labeled some of its images: budgets count labeled rows, the unlabeled ones
are the site's pool, and `adapt.unlabeled` puts them to work (continued SimCLR + MICLe before fine-tuning,
distillation into a student after), keyed and resumable like every stage; no val or test image reaches SimCLR."""

from __future__ import annotations

import json
from dataclasses import replace

import torch

from remedis.cli import main
from remedis.config import RunConfig
from remedis.data.manifest import Record, read_manifest, write_manifest
from remedis.data.preprocess import Preprocessing
from remedis.data.splits import assign_splits
from remedis.data.synthetic import SyntheticSpec, generate_synthetic
from remedis.models.backbones import create_backbone
from remedis.models.checkpoint import read_meta, save_checkpoint
from remedis.pretrain.jobs import backbone_meta


def test_patients_without_a_label_are_the_sites_train_pool():
    rows = [Record(f"/x/{p}-{i}.png", "" if p >= 20 or i == 1 else "ab"[p % 2], "S", f"p{p}") for p in range(40) for i in range(2)]
    rows += [Record(f"/x/other-{p}.png", "", "T", f"q{p}") for p in range(10)]  # a site with no labels at all
    split = assign_splits(rows, (0.6, 0.2, 0.2), seed=0)
    by_patient: dict[str, set] = {}
    for r in split:
        by_patient.setdefault(r.patient_id, set()).add(r.split)
    assert all(len(s) == 1 for s in by_patient.values())  # a patient's unlabeled images share its split
    assert all(by_patient[f"p{p}"] == {"train"} for p in range(20, 40))  # no label: the pool
    assert {s for p in range(20) for s in by_patient[f"p{p}"]} == {"train", "val", "test"}
    assert {s for p in range(10) for s in by_patient[f"q{p}"]} == {"train", "val", "test"}  # unlabeled corpus: as before


def test_adapt_puts_the_unlabeled_images_to_work_and_resumes(tmp_path, capsys):
    source = read_manifest(generate_synthetic(tmp_path / "data", SyntheticSpec(patients_per_site=24, max_images_per_patient=2,
                                                                                image_size=32)))
    patients = sorted({r.patient_id for r in source.records if r.site == "site-B"})
    unlabeled = set(patients[::2])  # half the patients were never labeled
    rows = [replace(r, label="" if r.patient_id in unlabeled else r.label, split=None) for r in source.records if r.site == "site-B"]
    manifest = write_manifest(rows, tmp_path / "site.csv")
    config = tmp_path / "c.yaml"
    config.write_text("data: {image_size: 32}\nmodel: {backbone: resnet18}\n"
                      "pretrain: {simclr: {epochs: 1, batch_size: 16}}\n"
                      "adapt: {epochs: 1, min_steps: 0, batch_size: 16, distill_epochs: 1, unlabeled: simclr+distill}\n"
                      "evaluate: {bootstrap: 20}\n")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "backbone", create_backbone("resnet18", 1).state_dict(),
                    backbone_meta(RunConfig.from_yaml(config), Preprocessing(32, 1), []))
    args = ["adapt", "--backbone", str(tmp_path / "backbone"), "--manifest", str(manifest), "--budget", "100%",
            "--output", str(tmp_path / "out"), "--config", str(config), "--quiet"]
    assert main(args) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["backbone+site@100%", "backbone+site@100%-student-resnet18"]
    prepared = read_manifest(tmp_path / "out" / "manifest.csv")
    train = [r for r in prepared.records if r.split == "train"]
    labeled_train = [r for r in train if r.label]
    assert report["provenance"]["labels"] == {"labeled_train_images": len(labeled_train),
                                              "unlabeled_train_images": len(train) - len(labeled_train),
                                              "unlabeled_use": "simclr+distill", "site_backbone": "backbone+site"}
    assert report["models"][0]["train_images"] == len(labeled_train)  # the budget counts labeled rows
    site = read_meta(tmp_path / "out" / "backbones" / "backbone+site")
    assert site["stage_history"][-1]["stage"] == "simclr" and site["stage_history"][-1]["images"] == len(train)  # train only
    model = read_meta(tmp_path / "out" / "adapted" / "backbone+site@100pct")["provenance"]
    assert model["backbone_sha256"] == site["weights_sha256"] and model["labels"]["unlabeled_use"] == "simclr+distill"
    student = read_meta(tmp_path / "out" / "adapted" / "backbone+site@100pct-student-resnet18")["provenance"]
    assert student["distill_images"] == len(train)  # the student learns from every train image, labeled or not
    # A rerun with the same inputs trains nothing: the site backbone, the model and its student are reused.
    written = {f: f.stat().st_mtime_ns for f in (tmp_path / "out").glob("**/model.safetensors")}
    assert len(written) == 3 and main(args) == 0
    assert {f: f.stat().st_mtime_ns for f in written} == written
    # Continued SimCLR needs a pretrained backbone.
    capsys.readouterr()
    assert main(["adapt", "--backbone", "random", "--manifest", str(manifest), "--output", str(tmp_path / "rnd"),
                 "--config", str(config), "--quiet"]) == 2
    assert "adapt.unlabeled: simclr continues a pretrained backbone" in capsys.readouterr().err
