"""Put an adapted model folder into the BentoML model store and build the service's bento.

`serving/` imports remedis, never the reverse: this module only writes the store entry (a copy of
the adapted model folder plus a model card) and runs `bentoml build` with the project's build file.

Example:
    >>> tag = export_model("runs/quickstart/adapted/remedis@1.0", name="site-x", report_json="runs/quickstart/report.json")
    >>> bento = build_bento(tag)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from remedis.adapt.model import AdaptedModel
from remedis.adapt.ood import OODDetector
from remedis.models.checkpoint import read_meta

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BENTOFILE = PROJECT_ROOT / "serving" / "bentofile.yaml"


def _task(class_names: list[str], positive_index: int) -> str:
    if len(class_names) == 2:
        return f"binary classification: {class_names[positive_index]} vs {class_names[1 - positive_index]}"
    return f"{len(class_names)}-class classification"


def _ood_detector(model_dir: Path) -> dict | None:
    """Method, threshold and accept rate of the stored OOD detector (None when the folder has none)."""
    det = OODDetector.load(model_dir)
    if det is None:
        return None
    return {"method": det.method, "threshold": float(det.threshold), "accept_rate": float(det.accept_rate)}


SITE_KEYS = ("n_images", "n_patients", "auroc", "auroc_ci", "auprc", "accuracy", "sensitivity", "specificity",
             "threshold", "ece")


def _site_summary(metrics: dict) -> dict:
    out = {k: metrics[k] for k in SITE_KEYS if k in metrics}
    cal = metrics.get("calibration")
    if isinstance(cal, dict) and "brier" in cal:
        out["brier"] = cal["brier"]
    return out


def _report_summary(report: dict, model_name: str | None) -> dict:
    """The report's numbers for this model: per-site metrics (AUROC with CI, ECE, sensitivity and
    specificity at the operating point, ...), site roles, the OOD detector and its detection summary."""
    models = report.get("models", [])  # matched by the model folder's name (`remedis adapt` names 10% `...@10pct`)
    entry = next((m for m in models if m.get("folder") == model_name), None) or \
        next((m for m in models if m.get("name") == model_name), None)
    summary = {
        "schema_version": report.get("schema_version"),
        "model": model_name,
        "task": report.get("task"),
        "sites": report.get("sites"),
        "metrics": {site: _site_summary(m) for site, m in entry["sites"].items()} if entry else None,
    }
    if entry:
        for key in ("train_images", "temperature", "operating_point"):
            if key in entry:
                summary[key] = entry[key]
        ood = entry.get("ood") or {}
        if ood:
            summary["ood"] = {"detector": ood.get("detector"), "summary": ood.get("summary"),
                              "in_distribution": ood.get("in_distribution")}
    return summary


def model_card(model_dir: Path, report: dict | None, model_name: str | None) -> dict:
    """What the service's `metadata` shows: task, classes, sites, calibration, operating point, OOD
    detector, report summary and provenance hashes; never a patient identifier."""
    meta = read_meta(model_dir)
    prov = meta.get("provenance", {}) or {}
    cal = meta.get("calibration", {}) or {}
    positive = int(meta.get("positive_index", 1))
    sites = {k: prov[k] for k in ("source_site", "target_site") if prov.get(k)}
    if report and report.get("sites"):
        sites["report"] = {s: v.get("role") for s, v in report["sites"].items() if isinstance(v, dict)}
    card = {
        "task": _task(meta["class_names"], positive),
        "architecture": meta["architecture"],
        "class_names": meta["class_names"],
        "positive_class": meta["class_names"][positive] if len(meta["class_names"]) == 2 else None,
        "preprocessing": meta["preprocessing"],
        "temperature": cal.get("temperature"),
        "operating_point": {"threshold": cal.get("threshold"), **(cal.get("operating_point") or {})},
        "ood_detector": _ood_detector(model_dir),
        "input_contract": meta.get("input_contract"),
        "training_sites": sites,
        "train_images": prov.get("train_images"),
        "weights_sha256": meta["weights_sha256"],
        "backbone_sha256": prov.get("backbone_sha256"),
        "manifest_sha256": prov.get("manifest_sha256"),
        "versions": meta.get("versions"),
    }
    if report is not None:
        card["report"] = _report_summary(report, model_name)
    return card


class ExportError(ValueError):
    """A model folder that is not ready to serve; the message names what is missing."""


def check_servable(model_dir: str | Path, allow_no_ood: bool = False) -> AdaptedModel:
    """Load `model_dir` (refusing a folder that would not serve) and check that it is complete: an OOD
    detector and an input contract, unless `allow_no_ood`."""
    model = AdaptedModel.load(model_dir)
    missing = model.missing_for_serving()
    if missing and not allow_no_ood:
        raise ExportError(f"{model_dir}: not ready to serve, it lacks {' and '.join(missing)}; re-adapt it with "
                          f"this remedis (`remedis adapt` writes both), fit a detector with `remedis evaluate --refit-ood`, "
                          f"or export without the OOD gate with --allow-no-ood")
    return model


def export_model(model_dir: str | Path, name: str, report_json: str | Path | None = None,
                 report_model_name: str | None = None, allow_no_ood: bool = False) -> str:
    """Copy `model_dir` into the BentoML store as `name:<version>`; return the tag string.

    Raises:
        ExportError: the folder lacks the OOD detector or the input contract (unless `allow_no_ood`).
    """
    import bentoml

    model_dir = Path(model_dir)
    check_servable(model_dir, allow_no_ood)
    report = json.loads(Path(report_json).read_text()) if report_json else None
    card = model_card(model_dir, report, report_model_name)
    with bentoml.models.create(
        name,
        labels={"framework": "remedis", "architecture": card["architecture"]},
        metadata={"classes": ",".join(card["class_names"]), "weights_sha256": card["weights_sha256"]},
    ) as store_model:
        shutil.copytree(model_dir, store_model.path, dirs_exist_ok=True)
        (Path(store_model.path) / "model_card.json").write_text(json.dumps(card, indent=2))
    return str(store_model.tag)


def build_bento(model_tag: str, bentofile: Path = BENTOFILE) -> str:
    """`bentoml build` of the service in `serving/` around `model_tag`; return the bento tag."""
    import bentoml

    if not bentofile.is_file():
        raise FileNotFoundError(f"{bentofile}: BentoML build file not found (is the `serving` package installed?)")
    bento = bentoml.bentos.build_bentofile(str(bentofile), build_ctx=str(bentofile.parent.parent), args={"model": model_tag})
    return str(bento.tag)
