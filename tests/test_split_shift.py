"""A target site whose test split is unlike its train and validation splits (issue 29): the report, its
advice and the log say so in plain words with the figures; a site without such a split gets no warning."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from remedis.adapt.model import AdaptedModel
from remedis.data.dataset import ImageCache
from remedis.data.manifest import Record
from remedis.data.preprocess import Preprocessing
from remedis.evaluate.evaluation import EvalInputs, evaluate_adapted
from remedis.evaluate.report import build_report
from remedis.evaluate.split_shift import split_shift
from remedis.models import Classifier


def _entry(name, images, val_auroc, test_auroc, ci, accepted, val_ece, test_ece):
    return {"name": name, "backbone": "remedis", "fraction": images / 468, "train_images": images,
            "validation": {"n_images": 156, "auroc": val_auroc, "ece": val_ece},
            "sites": {"BUSI": {"auroc": test_auroc, "auroc_ci": ci, "ece": test_ece}},
            "ood": {"detector": {"method": "mahalanobis", "accept_rate": 0.95, "test_accepted_in_distribution": accepted}}}


def test_the_issues_case_is_reported_with_its_numbers_and_a_like_split_is_not():
    shifted = [_entry("remedis@10%", 47, 0.87, 0.55, [0.45, 0.66], 0.74, 0.05, 0.47),
               _entry("remedis@100%", 468, 0.96, 0.80, [0.72, 0.87], 0.74, 0.03, 0.33)]
    report = build_report(shifted, {"BUSI": {"role": "target"}}, {}, task={"target_site": "BUSI"})
    assert report["split_shift"]["remedis@100%"]["signs"] == ["auroc", "ood", "calibration"]
    line = report["advice"][0]
    assert line.startswith("The test images of BUSI look unlike its train and validation images (2 of 2 models")
    for figure in ("remedis@100% (468 labeled images)", "validation AUROC 0.96 but test AUROC 0.80 [0.72, 0.87]",
                   "accept 95% of validation images, accepts 74% of the test images", "(ECE) 0.33 on test against 0.03"):
        assert figure in line
    like = [_entry("remedis@100%", 468, 0.91, 0.89, [0.83, 0.94], 0.93, 0.04, 0.06),
            _entry("remedis@10%", 47, 0.86, 0.80, [0.72, 0.87], 0.90, 0.05, 0.09)]  # a weak model: one sign only
    quiet = build_report(like, {"BUSI": {"role": "target"}}, {}, task={"target_site": "BUSI"})
    assert not any(s["shifted"] for s in quiet["split_shift"].values())
    assert not any("look unlike" in a for a in quiet["advice"])
    assert split_shift({"sites": {"BUSI": {"auroc": 0.8}}}, "BUSI") is None  # no validation figures: no judgement


def _bright_dark(n, flip=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    pixels = (0.2 + 0.6 * labels[:, None, None, None] + 0.05 * torch.rand(n, 1, 16, 16, generator=g)).clamp(0, 1)
    names = ["dark", "bright"]
    recs = [Record(Path(f"/x/{seed}-{i}.png"), names[int(lab) ^ int(flip)], "s", f"p{seed}-{i}") for i, lab in enumerate(labels)]
    return ImageCache(recs, pixels.half(), Preprocessing(16))


def test_a_test_split_with_another_labelling_is_found_from_the_evaluation(caplog, tmp_path):
    from remedis.stages.data import Task
    from remedis.stages.evaluate import write_site_report

    torch.manual_seed(0)
    model = AdaptedModel(Classifier("resnet18", 2), ["bright", "dark"], Preprocessing(16), positive_index=1)
    train = _bright_dark(32)
    x, y = train.preprocessing.normalize(train.pixels.float()), torch.tensor([0 if r.label == "bright" else 1 for r in train.records])
    opt = torch.optim.Adam(model.classifier.parameters(), lr=1e-3)
    model.classifier.train()
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model.classifier(x), y).backward()
        opt.step()
    model.classifier.eval()
    val, test = _bright_dark(24, seed=1), _bright_dark(24, flip=True, seed=2)  # test: the same images, labelled otherwise
    entry = evaluate_adapted(model, EvalInputs(test=test, target_site="s", roles={"s": "target"}, val=val), n_boot=50)
    logits, _ = model.infer(val.pixels)
    truth = np.array([r.label == "dark" for r in val.records])
    assert entry["validation"]["auroc"] == roc_auc_score(truth, logits[:, 1] - logits[:, 0])  # cross-checked
    entry = {**entry, "name": "m@100%", "backbone": "remedis", "fraction": 1.0, "train_images": 32}
    shift = split_shift(entry, "s")
    assert shift["val_auroc"] > 0.95 and shift["test_auroc"] < 0.1 and {"auroc", "calibration"} <= set(shift["signs"])
    with caplog.at_level(logging.WARNING, logger="remedis"):
        json_path, _ = write_site_report([entry], {"s": {"role": "target"}}, Task(["bright", "dark"], 1), "s", {}, tmp_path)
    assert "The test images of s look unlike" in caplog.text and "validation AUROC 1.00 but test AUROC" in caplog.text
    assert "look unlike" in json_path.read_text()
