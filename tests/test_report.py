"""The evaluation report end to end on tiny real models: report.json schema, label savings, the HTML
matches the JSON, no network references, no patient identifier; plus the OOD detector lands in the
model folder."""

import json
import re

import numpy as np
import pytest
import torch

from remedis.adapt.model import AdaptedModel
from remedis.adapt.ood import OODDetector
from remedis.data.preprocess import Preprocessing
from remedis.evaluate.report import SCHEMA_VERSION, advice_lines, label_savings
from remedis.models.checkpoint import save_checkpoint
from remedis.models.classifier import Classifier

ARCH, SIZE = "resnetv2_18_bit", 32


def _images(site: str, split: str, n: int, seed: int, shift: float = 0.0):
    """Class 1 images carry a bright square; `shift` changes the site's overall brightness."""
    g = torch.Generator().manual_seed(seed)
    pix = 0.3 + shift + 0.1 * torch.rand(n, 1, SIZE, SIZE, generator=g)
    labels = ["benign", "malignant"] * (n // 2)
    for i, lab in enumerate(labels):
        if lab == "malignant":
            pix[i, :, 8:20, 8:20] += 0.5
    rows = [(f"images/{site}-{split}{i}.png", lab, site, f"PID-{site}-{split}-{i // 2:03d}", split,
             "scanner-A" if i % 4 < 2 else "scanner-B") for i, lab in enumerate(labels)]
    return pix.clamp(0, 1), rows


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two adapted model folders and a manifest of PNG files, evaluated by `remedis evaluate`."""
    from PIL import Image

    from remedis.cli import main
    from remedis.models.checkpoint import read_meta

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("report")
    (out / "data" / "images").mkdir(parents=True)
    sets = [_images("site-B", "train", 24, 1), _images("site-B", "val", 16, 2), _images("site-A", "test", 16, 3, -0.1),
            _images("site-B", "test", 20, 4), _images("site-C", "test", 16, 5, 0.25)]
    lines = ["image,label,site,patient_id,split,device,birads"]  # birads: a column no row fills
    for pix, rows in sets:
        for img, row in zip(pix, rows):
            Image.fromarray((img[0].numpy() * 255).round().astype(np.uint8)).save(out / "data" / row[0])
            lines.append(",".join(row) + ",")
    (out / "data" / "manifest.csv").write_text("\n".join(lines) + "\n")
    # Another "modality" for far-OOD: stripes, in its own kit folder with its own manifest.
    (out / "xray" / "img").mkdir(parents=True)
    stripes = ["image,label,site,patient_id"]
    for i in range(8):
        a = np.zeros((SIZE, SIZE), np.uint8)
        a[:, (i % 4)::4] = 255
        Image.fromarray(a).save(out / "xray" / "img" / f"s{i}.png")
        stripes.append(f"img/s{i}.png,normal,XR,x{i}")
    (out / "xray" / "manifest.csv").write_text("\n".join(stripes) + "\n")
    train_pix = torch.tensor(np.round(sets[0][0].numpy() * 255) / 255)

    before = Classifier(ARCH, 2, 1)
    ckpt = save_checkpoint(out / "backbones" / "remedis", before.backbone.state_dict(),
                           {"kind": "backbone", "architecture": ARCH, "in_chans": 1})
    folders = []
    for i, (backbone, fraction) in enumerate([("remedis", 0.5), ("supervised", 1.0)]):
        clf = Classifier(ARCH, 2, 1)
        clf.load_state_dict(before.state_dict())
        with torch.no_grad():  # "adaptation": a perturbed last stage and a head that reads the bright square
            for p in clf.backbone.stages[3].parameters():
                p.add_(0.05 * (i + 1) * torch.randn_like(p))
        model = AdaptedModel(clf, ["benign", "malignant"], Preprocessing(SIZE), temperature=1.5, positive_index=1,
                             provenance={"target_site": "site-B", "budget": fraction, "backbone_init": backbone,
                                         "backbone_sha256": read_meta(ckpt)["weights_sha256"], "manifest_sha256": "cd" * 32})
        emb = model.embed(model.preprocessing.normalize(train_pix.float())).double().numpy()
        y = np.array([r[1] == "malignant" for r in sets[0][1]])
        w = np.linalg.lstsq(np.c_[emb, np.ones(len(emb))], 2.0 * y - 1, rcond=None)[0]
        with torch.no_grad():
            clf.head.weight[:] = torch.tensor(np.stack([-w[:-1], w[:-1]]) * 2, dtype=torch.float32)
            clf.head.bias[:] = torch.tensor([-w[-1] * 2, w[-1] * 2], dtype=torch.float32)
        folders.append(model.save(out / "adapted" / f"{backbone}@{fraction:g}"))
    args = ["evaluate", "--manifest", str(out / "data" / "manifest.csv"), "--output", str(out), "--source-site", "site-A",
            "--subgroup", "device", "--subgroup", "birads", "--backbone", f"remedis={ckpt}", "--backbone", f"supervised={ckpt}",
            "--bootstrap", "20", "--noise-images", "16",
            "--far-ood", str(out / "xray" / "manifest.csv")]
    for f in folders:
        args += ["--model", str(f)]
    assert main(args) == 0
    pids = {row[3] for _, rows in sets for row in rows}
    return {"out": out, "json": out / "report.json", "html": out / "report.html", "pids": pids, "main": main}


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
    assert "birads" not in m["subgroups"]  # a column no test image fills is skipped with a warning, not an error
    ood = m["ood"]
    assert set(ood["sets"]) == {"site-A", "site-C", "synthetic-noise", "xray"}
    assert ood["sets"]["site-C"]["kind"] == "near" and ood["sets"]["site-A"]["kind"] == "near"
    assert ood["sets"]["synthetic-noise"]["kind"] == ood["sets"]["xray"]["kind"] == "far"
    assert ood["sets"]["xray"]["n_images"] == 8 and len(r["provenance"]["far_ood_manifests"][0]) == 64
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
    pids = run["pids"]
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
    same = label_savings([_m("remedis", 1.0, 100, 0.95), _m("supervised", 1.0, 100, 0.90)])["B"]
    assert same["savings"] == 0 and "no label saving" in advice_lines({"B": same}, "B")[0]
    two = {"A": s, "B": s}
    assert len(advice_lines(two, "B")) == 1 and len(advice_lines(two, None)) == 2


def test_cli_errors_name_the_problem_and_report_rerenders(run, capsys):
    main = run["main"]
    manifest = str(run["out"] / "data" / "manifest.csv")
    model = str(run["out"] / "adapted" / "remedis@0.5")
    base = ["evaluate", "--manifest", manifest, "--model", model, "--output", str(run["out"] / "bad")]
    assert main(base + ["--subgroup", "patient_id"]) == 2
    assert "identifies patients" in capsys.readouterr().err
    assert main(base + ["--target-site", "site-Z"]) == 2
    assert "site-Z" in capsys.readouterr().err
    assert main(base + ["--subgroup", "scanner"]) == 2
    assert "no column 'scanner'" in capsys.readouterr().err
    # `remedis report --from-json` renders the same page from report.json alone.
    again = run["out"] / "again"
    assert main(["report", "--from-json", str(run["json"]), "--output", str(again)]) == 0

    def strip(t):
        return t.split("</p>", 1)[1]

    assert strip((again / "report.html").read_text()) == strip(run["html"].read_text())


def test_evaluation_inference_equals_the_service_calls():
    """`infer` does one forward pass for logits and embeddings; the service calls logits() and embed()."""
    from remedis.evaluate.evaluation import infer

    torch.manual_seed(1)
    model = AdaptedModel(Classifier(ARCH, 2, 1), ["a", "b"], Preprocessing(SIZE))
    px = torch.rand(6, 1, SIZE, SIZE)
    logits, emb = infer(model, px)
    x = model.preprocessing.normalize(px)
    assert np.array_equal(logits, model.logits(x).numpy()) and np.array_equal(emb, model.embed(x).numpy())


def test_multiclass_report_has_per_class_auroc_and_no_operating_point(tmp_path):
    from remedis.evaluate.report import build_report, write_report
    from remedis.metrics import site_metrics

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 90)
    z = rng.normal(size=(90, 3)) + 1.5 * np.eye(3)[y]
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    met = site_metrics(y, p, np.arange(90) // 2, n_boot=20, class_names=["a", "b", "c"])
    model = {"name": "remedis@1", "backbone": "remedis", "fraction": 1.0, "train_images": 50, "temperature": 1.0,
             "operating_point": {"threshold": None, "chosen_on": "multi-class: argmax"}, "sites": {"S": met}}
    report = build_report([model], {"S": {"role": "target", "test_images": 90, "test_patients": 45}}, {"seed": 0},
                          task={"class_names": ["a", "b", "c"], "target_site": "S"})
    _, html_path = write_report(report, tmp_path)
    page = html_path.read_text()
    assert "AUROC per class" in page and "macro one-vs-rest" in page and "Operating points" not in page
    for c in "abc":
        assert f"{met['per_class_auroc'][c]['auroc']:.3f}" in page


def test_the_report_states_the_claim_by_the_one_rule_and_keeps_predictions_out():
    """With per-image predictions (what the evaluation stage passes), the report's claim and advice follow
    `remedis.evaluate.claims`: the best 100% model of any backbone (here random init), paired bootstrap."""
    import json

    import numpy as np

    from remedis.evaluate.report import build_report

    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.4).astype(int)
    patients = np.array([f"p{i // 2}" for i in range(300)])

    def model(backbone, fraction, images, noise):
        score = 1 / (1 + np.exp(-(y * 2.0 + rng.normal(0, noise, len(y)))))
        m = _m(backbone, fraction, images, 0.0)
        m["_predictions"] = {"targets": y, "probs": np.stack([1 - score, score], 1), "patients": patients, "positive_index": 1}
        return m

    models = [model("remedis", 0.1, 10, 3.0), model("remedis", 0.25, 25, 0.45), model("remedis", 1.0, 100, 0.45),
              model("supervised", 1.0, 100, 1.5), model("random", 1.0, 100, 0.4)]
    r = build_report(models, {"B": {"role": "target"}}, {}, task={"target_site": "B"})
    claim = r["claim"]
    assert claim["best_baseline"] in ("random@100%", "remedis@100%") and claim["method"] == "remedis"
    assert [row["images"] for row in claim["budgets"]] == [10, 25, 100]
    assert claim["margins"]["0.05"]["budget"] in (0.25, 1.0)
    assert r["advice"][0].startswith("By the claim rule (non-inferior to the best model trained on all of B's labels")
    text = json.dumps(r)
    assert "_predictions" not in text and "p149" not in text  # no per-image data, no patient
