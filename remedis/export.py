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
from remedis.models.checkpoint import read_meta

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BENTOFILE = PROJECT_ROOT / "serving" / "bentofile.yaml"


def model_card(model_dir: Path, report: dict | None, model_name: str | None) -> dict:
    meta = read_meta(model_dir)
    card = {
        "architecture": meta["architecture"],
        "class_names": meta["class_names"],
        "preprocessing": meta["preprocessing"],
        "temperature": meta["calibration"]["temperature"],
        "weights_sha256": meta["weights_sha256"],
        "backbone_sha256": meta.get("provenance", {}).get("backbone_sha256"),
        "manifest_sha256": meta.get("provenance", {}).get("manifest_sha256"),
    }
    if report is not None:
        entry = next((m for m in report.get("models", []) if m["name"] == model_name), None)
        card["report"] = {
            "schema_version": report.get("schema_version"),
            "sites": report.get("sites"),
            "metrics": entry["sites"] if entry else None,
        }
    return card


def export_model(model_dir: str | Path, name: str, report_json: str | Path | None = None,
                 report_model_name: str | None = None) -> str:
    """Copy `model_dir` into the BentoML store as `name:<version>`; return the tag string."""
    import bentoml

    model_dir = Path(model_dir)
    AdaptedModel.load(model_dir)  # refuse to export a folder that would not serve
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
        raise FileNotFoundError(f"{bentofile}: BentoML build file not found (build from a source checkout of remedis)")
    bento = bentoml.bentos.build_bentofile(str(bentofile), build_ctx=str(bentofile.parent.parent), args={"model": model_tag})
    return str(bento.tag)


def cmd_export(args) -> int:
    tag = export_model(args.model, args.name, args.report, Path(args.model).name)
    print(f"model: {tag}")
    if args.build:
        print(f"bento: {build_bento(tag)}")
    return 0


def register(sub) -> None:
    e = sub.add_parser("export", help="put an adapted model folder in the BentoML store")
    e.add_argument("--model", required=True, help="adapted model folder")
    e.add_argument("--name", required=True, help="BentoML model name")
    e.add_argument("--report", default=None, help="report.json whose summary goes into the model card")
    e.add_argument("--build", action="store_true", help="also `bentoml build` the service around it")
    e.set_defaults(func=cmd_export)
