"""The evaluation report end to end on tiny real models: report.json schema, label savings, the HTML
matches the JSON, no network references, no patient identifier; plus the OOD detector lands in the
model folder."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from remedis.adapt.model import AdaptedModel
from remedis.data.dataset import ImageCache
from remedis.data.manifest import Record
from remedis.data.preprocess import Preprocessing
from remedis.evaluate.evaluation import EvalInputs, evaluate_folder, load_backbone_before
from remedis.evaluate.ood import OODDetector
from remedis.evaluate.report import SCHEMA_VERSION, advice_lines, build_report, label_savings, write_report
from remedis.models.checkpoint import save_checkpoint
from remedis.models.classifier import Classifier

ARCH, SIZE = "resnetv2_18_bit", 32


def _cache(site: str, split: str, n: int, seed: int, shift: float = 0.0) -> ImageCache:
    """Class 1 images carry a bright square; `shift` changes the site's overall brightness."""
    g = torch.Generator().manual_seed(seed)
    pix = 0.3 + shift + 0.1 * torch.rand(n, 1, SIZE, SIZE, generator=g)
    labels = ["benign", "malignant"] * (n // 2)
    for i, lab in enumerate(labels):
        if lab == "malignant":
            pix[i, :, 8:20, 8:20] += 0.5
    recs = [Record(Path(f"/x/{site}/{split}{i}.png"), lab, site, f"PID-{site}-{split}-{i // 2:03d}", split,
                   {"device": "scanner-A" if i % 4 < 2 else "scanner-B"}) for i, lab in enumerate(labels)]
    return ImageCache(recs, pix.clamp(0, 1).half(), Preprocessing(SIZE), [])


def _cat(*caches: ImageCache) -> ImageCache:
    return ImageCache([r for c in caches for r in c.records], torch.cat([c.pixels for c in caches]), caches[0].preprocessing, [])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("report")
    before = Classifier(ARCH, 2, 1)
    ckpt = save_checkpoint(out / "backbones" / "remedis", before.backbone.state_dict(),
                           {"kind": "backbone", "architecture": ARCH, "in_chans": 1})
    train, val = _cache("site-B", "train", 24, 1), _cache("site-B", "val", 16, 2)
    test = _cat(_cache("site-A", "test", 16, 3, -0.1), _cache("site-B", "test", 20, 4), _cache("site-C", "test", 16, 5, 0.25))
    roles = {"site-A": "source", "site-B": "target", "site-C": "ood"}
    models = []
    for i, (backbone, fraction) in enumerate([("remedis", 0.5), ("supervised", 1.0)]):
        clf = Classifier(ARCH, 2, 1)
        clf.load_state_dict(before.state_dict())
        with torch.no_grad():  # "adaptation": a head that reads the bright square, a perturbed last stage
            for p in clf.backbone.stages[3].parameters():
                p.add_(0.05 * (i + 1) * torch.randn_like(p))
        model = AdaptedModel(clf, ["benign", "malignant"], Preprocessing(SIZE), temperature=1.5, positive_index=1,
                             provenance={"target_site": "site-B", "budget": fraction, "backbone_sha256": "ab" * 32,
                                         "manifest_sha256": "cd" * 32})
        x = model.preprocessing.normalize(train.pixels.float())
        emb = model.embed(x).double().numpy()
        y = np.array([r.label == "malignant" for r in train.records])
        w = np.linalg.lstsq(np.c_[emb, np.ones(len(emb))], 2.0 * y - 1, rcond=None)[0]
        with torch.no_grad():
            clf.head.weight[:] = torch.tensor(np.stack([-w[:-1], w[:-1]]) * 2, dtype=torch.float32)
            clf.head.bias[:] = torch.tensor([-w[-1] * 2, w[-1] * 2], dtype=torch.float32)
        folder = model.save(out / "adapted" / f"{backbone}@{fraction:g}")
        inputs = EvalInputs(test=test, target_site="site-B", roles=roles, train=train, val=val, subgroups=["device"],
                            backbone_before=load_backbone_before(ckpt, ARCH, 1), noise_images=16, cka_images=32)
        entry = evaluate_folder(folder, inputs, n_boot=20, seed=0)
        models.append({"name": f"{backbone}@{fraction:g}", "backbone": backbone, "fraction": fraction,
                       "train_images": int(24 * fraction), **entry})
    sites = {s: {"role": r, "test_images": 16, "test_patients": 8} for s, r in roles.items()}
    report = build_report(models, sites, {"manifest_sha256": "ef" * 32, "seed": 0}, title="test report",
                          task={"class_names": ["benign", "malignant"], "positive_class": "malignant", "target_site": "site-B"})
    json_path, html_path = write_report(report, out)
    return {"out": out, "json": json_path, "html": html_path, "test": test}


def test_report_json_schema_v2(run):
    r = json.loads(run["json"].read_text())
    assert r["schema_version"] == SCHEMA_VERSION == 2
    assert {"sites", "models", "data_efficiency", "label_savings", "advice", "provenance", "task"} <= set(r)
    m = r["models"][0]
    met = m["sites"]["site-B"]
    for key in ("auroc", "auprc", "accuracy", "sensitivity", "specificity"):
        assert met[key] is not None and len(met[key + "_ci"]) == 2
    assert met["threshold"] == m["operating_point"]["threshold"]
    assert {"calibration", "calibration_uncalibrated"} <= set(met) and met["calibration"]["brier"] is not None
    assert set(m["subgroups"]["device"]["site-B"]) == {"scanner-A", "scanner-B"}
    ood = m["ood"]
    assert set(ood["sets"]) == {"site-A", "site-C", "synthetic-noise"}
    assert ood["sets"]["site-C"]["kind"] == "near" and ood["sets"]["synthetic-noise"]["kind"] == "far"
    for v in ood["sets"].values():
        assert set(v["methods"]) == {"msp", "max_logit", "energy", "mahalanobis", "knn"}
    assert ood["detector"]["method"] == "mahalanobis"
    cka = m["representation"]["cka"]
    assert len(cka["matrix"]) == len(cka["layers"]) == 6
    # Only the last stage was perturbed: earlier layers are unchanged (CKA 1), the embedding is not.
    assert all(v == pytest.approx(1.0, abs=1e-4) for v in cka["diagonal"][:4]) and cka["diagonal"][-1] < 0.9999
    assert len(m["provenance"]["weights_sha256"]) == 64 and len(m["provenance"]["ood_sha256"]) == 64


def test_detector_is_stored_in_every_model_folder(run):
    for folder in (run["out"] / "adapted").iterdir():
        det = OODDetector.load(folder)
        assert det is not None and det.method == "mahalanobis" and np.isfinite(det.threshold)


def test_html_shows_the_json_numbers_offline_without_patient_ids(run):
    r = json.loads(run["json"].read_text())
    page = run["html"].read_text()
    body = page.split("<body>")[1]
    assert not re.search(r"(src|href)\s*=\s*['\"](?!data:|#)", body), "external reference in the report"
    assert "http://" not in body and "https://" not in body and "<script" not in page
    assert page.count("data:image/png;base64,") >= 3  # data efficiency, reliability, CKA
    for m in r["models"]:
        for s in r["sites"]:
            assert f"{m['sites'][s]['auroc']:.3f}" in page
        assert f"{m['ood']['detector']['threshold']:.4g}" in page
    for line in r["advice"]:
        assert line.replace("'", "&#x27;") in page
    pids = {rec.patient_id for rec in run["test"].records}
    text = run["json"].read_text() + page
    assert not [p for p in pids if p in text]


def _m(backbone, fraction, images, auroc, ci=None):
    return {"name": f"{backbone}@{fraction}", "backbone": backbone, "fraction": fraction, "train_images": images,
            "sites": {"B": {"auroc": auroc, "auroc_ci": ci or [None, None]}}}


def test_label_savings_smallest_budget_reaching_the_full_data_baseline():
    models = [_m("remedis", 0.1, 10, 0.80), _m("remedis", 0.25, 25, 0.91, [0.85, 0.95]), _m("remedis", 1.0, 100, 0.93),
              _m("supervised", 0.1, 10, 0.70), _m("supervised", 1.0, 100, 0.90, [0.86, 0.94])]
    s = label_savings(models)["B"]
    assert (s["reached_fraction"], s["reached_images"], s["baseline_value"]) == (0.25, 25, 0.90)
    assert s["savings"] == pytest.approx(0.75)
    (line,) = advice_lines({"B": s}, "B")
    assert "AUROC 0.900 at B" in line and "about 25 labeled images" in line and "75% fewer" in line and "overlap" in line
    never = label_savings([_m("remedis", 1.0, 100, 0.85), _m("supervised", 1.0, 100, 0.90)])["B"]
    assert never["reached_images"] is None and never["savings"] is None
    assert "did not reach" in advice_lines({"B": never}, "B")[0]
    assert label_savings([_m("supervised", 1.0, 100, 0.9)]) == {}


def test_identifying_subgroup_column_is_refused(run):
    with pytest.raises(ValueError, match="identifies patients"):
        from remedis.evaluate.evaluation import check_subgroups

        check_subgroups(["PatientName"])
