"""`remedis adapt` end to end on synthetic data: budget sweep, one model folder per budget, a report,
and distillation of each adapted model into a small student."""

from __future__ import annotations

import json

import torch

from remedis.cli import main
from remedis.config import RunConfig
from remedis.data.preprocess import Preprocessing
from remedis.data.synthetic import SyntheticSpec, generate_synthetic
from remedis.models.backbones import create_backbone
from remedis.models.checkpoint import read_meta, save_checkpoint
from remedis.pretrain.jobs import backbone_meta


def _config_and_backbone(tmp_path, sections: str):
    """tmp_path/c.yaml (32 px grey resnet18 plus `sections`) and a seed-0 random backbone at tmp_path/backbone."""
    config = tmp_path / "c.yaml"
    config.write_text("data: {image_size: 32}\nmodel: {backbone: resnet18}\n" + sections)
    torch.manual_seed(0)
    backbone = create_backbone("resnet18", 1)
    save_checkpoint(tmp_path / "backbone", backbone.state_dict(),
                    backbone_meta(RunConfig.from_yaml(config), Preprocessing(32, 1), []))
    return config


def test_adapt_sweep_with_distillation(tmp_path, capsys):
    manifest = generate_synthetic(tmp_path / "data", SyntheticSpec(patients_per_site=30, max_images_per_patient=2, image_size=40))
    # The usual layout of a public dataset: train and test splits, no val (one is carved from train by patient).
    manifest.write_text(manifest.read_text().replace(",val,", ",train,"))
    config = _config_and_backbone(tmp_path, "adapt: {epochs: 1, min_steps: 0, batch_size: 16, distill_epochs: 1}\n"
                                            "serve: {model: remedis@1.0, build: false}\n")

    code = main(["adapt", "--backbone", str(tmp_path / "backbone"), "--manifest", str(manifest), "--site", "site-B",
                 "--budget", "25%,100%", "--output", str(tmp_path / "out"), "--config", str(config), "--distill", "resnet18",
                 "--set", "adapt.mode=lp-ft", "--quiet"])
    assert code == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    names = [m["name"] for m in report["models"]]
    assert names == ["backbone@25%", "backbone@25%-student-resnet18", "backbone@100%", "backbone@100%-student-resnet18"]
    small, full = report["models"][0], report["models"][2]
    assert small["train_images"] < full["train_images"]
    for m in report["models"]:
        site = m["sites"]["site-B"]
        lo, hi = site["auroc_ci"]  # the report carries patient-bootstrap CIs, not point estimates only
        assert lo <= site["auroc"] <= hi and lo < hi
    ablation = report["models"][2]["recipe_ablation"]
    assert set(ablation) == {"linear_probe", "best_member", "soup", "final"}
    # the recipe ablation's last step is the model the report evaluates, on the same test images
    assert abs(ablation["final"]["auroc"] - full["sites"]["site-B"]["auroc"]) < 1e-9
    assert "What each step of the adaptation recipe adds" in (tmp_path / "out" / "report.html").read_text()
    teacher = read_meta(tmp_path / "out" / "adapted" / "backbone@100pct")["provenance"]
    assert teacher["mode"] == "lp-ft" and teacher["sweep"][0]["lr"] == 0.0  # --set reached the recipe
    student = read_meta(tmp_path / "out" / "adapted" / "backbone@100pct-student-resnet18")
    assert student["provenance"]["distilled_from"] == "resnet18" and student["provenance"]["distill_images"] > full["train_images"] - 1
    assert "backbone@100%-student-resnet18: " in capsys.readouterr().out
    assert report["provenance"]["validation"]["site-B"].startswith("carved from train: 20% of the train patients")
    assert teacher["validation"].startswith("carved from train")
    assert teacher["val_images"] > 0
    # A rerun with the same inputs reuses the teachers and their students (keyed like every stage): nothing is rewritten.
    folders = sorted((tmp_path / "out" / "adapted").glob("*/model.safetensors"))
    written = {f: f.stat().st_mtime_ns for f in folders}
    assert main(["adapt", "--backbone", str(tmp_path / "backbone"), "--manifest", str(manifest), "--site", "site-B",
                 "--budget", "25%,100%", "--output", str(tmp_path / "out"), "--config", str(config), "--distill", "resnet18",
                 "--set", "adapt.mode=lp-ft", "--quiet"]) == 0
    assert len(folders) == 4 and {f: f.stat().st_mtime_ns for f in folders} == written


def test_adapt_set_is_checked_like_the_file(tmp_path, capsys):
    code = main(["adapt", "--backbone", str(tmp_path / "missing"), "--manifest", "m.csv", "--output", str(tmp_path / "o"),
                 "--set", "adapt.mode=deep"])
    assert code == 2
    assert "adapt.mode: expected full, partial, linear or lp-ft, got 'deep'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before any work


def test_adapt_rerun_reuses_finished_budgets(tmp_path, monkeypatch):
    """A killed or repeated sweep does not retrain the budgets that finished with the same inputs; a changed
    recipe retrains."""
    from remedis.stages import adapt as adapt_stage

    manifest = generate_synthetic(tmp_path / "data", SyntheticSpec(patients_per_site=20, max_images_per_patient=2, image_size=32))
    config = _config_and_backbone(tmp_path, "adapt: {epochs: 1, min_steps: 0, batch_size: 16, wise_ft: false}\n"
                                            "evaluate: {bootstrap: 20}\n")
    trained: list[str] = []
    original = adapt_stage.adapt_budget

    def counting(*args, **kwargs):
        trained.append(args[5].name)
        return original(*args, **kwargs)

    monkeypatch.setattr(adapt_stage, "adapt_budget", counting)

    def adapt(budget: str, *extra: str) -> dict:
        code = main(["adapt", "--backbone", str(tmp_path / "backbone"), "--manifest", str(manifest), "--site", "site-B",
                     "--budget", budget, "--output", str(tmp_path / "out"), "--config", str(config), "--quiet", *extra])
        assert code == 0
        return {m["name"]: m["sites"]["site-B"]["auroc"] for m in json.loads((tmp_path / "out" / "report.json").read_text())["models"]}

    first = adapt("50%")
    assert trained == ["backbone@50pct"]
    weights = (tmp_path / "out" / "adapted" / "backbone@50pct" / "model.safetensors").read_bytes()
    second = adapt("50%,100%")  # the sweep grows: only the new budget trains
    assert trained == ["backbone@50pct", "backbone@100pct"]
    assert second["backbone@50%"] == first["backbone@50%"]
    assert (tmp_path / "out" / "adapted" / "backbone@50pct" / "model.safetensors").read_bytes() == weights
    adapt("50%,100%", "--set", "adapt.lr=0.001")  # another recipe is another model
    assert trained[2:] == ["backbone@50pct", "backbone@100pct"]


def test_adapt_random_backbone_is_the_configs_network_from_random_init(tmp_path):
    """`--backbone random`: the baseline a site compares its pretrained backbone against, on the same splits and
    budgets; the config names the network, the site's images its channels, and WiSE-FT does not apply."""
    manifest = generate_synthetic(tmp_path / "data", SyntheticSpec(patients_per_site=20, max_images_per_patient=2, image_size=32))
    config = _config_and_backbone(tmp_path, "adapt: {epochs: 1, min_steps: 0, batch_size: 16}\nevaluate: {bootstrap: 20}\n")

    def adapt(backbone: str, out: str) -> dict:
        code = main(["adapt", "--backbone", backbone, "--manifest", str(manifest), "--site", "site-B", "--budget", "50%",
                     "--output", str(tmp_path / out), "--config", str(config), "--quiet"])
        assert code == 0
        return json.loads((tmp_path / out / "report.json").read_text())

    report = adapt("random", "random")
    assert [m["name"] for m in report["models"]] == ["random@50%"]
    meta = read_meta(tmp_path / "random" / "adapted" / "random@50pct")
    assert meta["architecture"] == "resnet18" and int(meta["in_chans"]) == 1  # the config's network, grey images
    assert meta["provenance"]["backbone_init"] == "random" and meta["provenance"]["backbone_sha256"] is None
    assert meta["provenance"]["wise_ft"]["alpha"] == 1.0 and meta["provenance"]["wise_ft"]["val_auroc_by_alpha"] == {}
    # `remedis evaluate` on the folder and the run's manifest gives the AUROC `remedis adapt` reported
    assert main(["evaluate", "--model", str(tmp_path / "random" / "adapted" / "random@50pct"), "--manifest",
                 str(tmp_path / "random" / "manifest.csv"), "--output", str(tmp_path / "eval"), "--bootstrap", "20"]) == 0
    evaluated = json.loads((tmp_path / "eval" / "report.json").read_text())["models"][0]["sites"]["site-B"]["auroc"]
    assert abs(evaluated - report["models"][0]["sites"]["site-B"]["auroc"]) < 1e-9
    pretrained = adapt(str(tmp_path / "backbone"), "pretrained")  # same split and budget: the same training images
    assert pretrained["models"][0]["train_images"] == report["models"][0]["train_images"]
    assert (tmp_path / "random" / "manifest.csv").read_text() == (tmp_path / "pretrained" / "manifest.csv").read_text()
