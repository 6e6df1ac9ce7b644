"""`remedis evaluate` / `remedis report`: evaluate adapted model folders on a manifest's test split and
write `report.json` + `report.html`; `remedis report --from-json` re-renders the page from a JSON.

    remedis evaluate --model runs/x/adapted/remedis@0.1 --model runs/x/adapted/supervised@1 \\
        --manifest runs/x/manifest.csv --output runs/x/eval --subgroup device --far-ood ../cxr/manifest.csv
    remedis report --from-json runs/x/eval/report.json

Use the manifest the models were adapted with (the run folder's `manifest.csv` carries its splits):
otherwise the test split could overlap the images a model was trained on. `--config` gives the data
section (split fractions, label map) the models were adapted with. The same preparation and evaluation
as `remedis run` and `remedis adapt` (`remedis.stages`), so the three agree for the same model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("remedis")


EXAMPLES = """examples:
  remedis evaluate --model runs/site-b/adapted/remedis@10pct --model runs/site-b/adapted/remedis@100pct \\
      --manifest runs/site-b/manifest.csv --output runs/site-b/eval --far-ood ct.csv
  remedis report --from-json runs/site-b/eval/report.json

Recommended: the manifest the models were adapted with (its splits), so no test image was a training image;
--far-ood with a manifest of another modality, to see the OOD detector refuse it."""


def register(sub) -> None:
    """Add `remedis evaluate` and `remedis report` to the command line."""
    from remedis.commands import command_parser
    from remedis.ood_scores import score_names

    for name, help_ in (("evaluate", "evaluate adapted models on a manifest and write the report"),
                        ("report", "same as evaluate; with --from-json, re-render report.html from a report.json")):
        p = command_parser(sub, name, help_, "Evaluate adapted model folders on a manifest's test split: per-site and "
                           "per-subgroup AUROC, AUPRC, sensitivity and specificity at the operating point with patient-"
                           "bootstrap 95% CIs, calibration, OOD detection, CKA; writes report.json and report.html.",
                           EXAMPLES)
        p.add_argument("--model", action="append", default=[], help="adapted model folder (repeat for several)")
        p.add_argument("--manifest", help="manifest CSV with sites and splits (the run's manifest.csv)")
        p.add_argument("--output", "-o", help="folder for report.json and report.html")
        p.add_argument("--target-site", help="in-distribution site (default: the models' provenance)")
        p.add_argument("--source-site", help="site used for upstream pretraining (role 'source')")
        p.add_argument("--subgroup", action="append", default=[], help="manifest column reported per value, e.g. device")
        p.add_argument("--far-ood", action="append", default=[], help="manifest of another modality (far-OOD set)")
        p.add_argument("--backbone", action="append", default=[],
                       help="NAME=FOLDER backbone checkpoint a model started from (CKA); default: the run folder's backbones/NAME")
        p.add_argument("--label-map", action="append", default=[], help="FROM=TO manifest label renaming, e.g. normal=benign")
        p.add_argument("--ood-method", default="mahalanobis", choices=score_names(),
                       help="detector fitted when a model has none (or with --refit-ood)")
        p.add_argument("--refit-ood", action="store_true", help="refit and overwrite the models' stored OOD detectors")
        p.add_argument("--noise-images", type=int, default=64, help="synthetic noise images (far-OOD set)")
        p.add_argument("--bootstrap", type=int, default=200)
        p.add_argument("--seed", type=int, default=0, help="the seed of the splits/budgets and of the bootstrap")
        p.add_argument("--config", default=None,
                       help="YAML config whose data section (split fractions, label map) the models were adapted with")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
        p.add_argument("--from-json", help="(report) re-render report.html from this report.json")
        p.set_defaults(func=cmd_evaluate)


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"{what}: expected FROM=TO, got {item!r}")
        out[key] = value
    return out


def cmd_evaluate(args) -> int:
    """`remedis evaluate` / `remedis report`: evaluate folders and write the report, or re-render one from JSON."""
    from remedis.evaluate.report import render_html

    if args.from_json:
        src = Path(args.from_json)
        if not src.is_file():
            raise FileNotFoundError(f"{src}: report.json not found")
        try:
            report = json.loads(src.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{src}: not valid JSON ({exc})") from None
        out = Path(args.output or src.parent)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.html").write_text(render_html(report))
        print(f"report: {out / 'report.html'}")
        return 0
    if not args.model or not args.manifest or not args.output:
        raise ValueError("evaluate: --model, --manifest and --output are required")
    from remedis.config import RunConfig

    data = RunConfig.from_yaml(args.config, args.set).data if (args.config or args.set) else None
    json_path, html_path = evaluate_folders(
        args.model, args.manifest, args.output, target_site=args.target_site, source_site=args.source_site,
        subgroups=args.subgroup, far_ood=args.far_ood, backbones=_pairs(args.backbone, "--backbone"),
        label_map=_pairs(args.label_map, "--label-map"), ood_method=args.ood_method, refit_ood=args.refit_ood,
        n_boot=args.bootstrap, seed=args.seed, noise_images=args.noise_images, data=data)
    print(f"report: {html_path}\n        {json_path}")
    return 0


def evaluate_folders(models: list, manifest_path, output, target_site: str | None = None, source_site: str | None = None,
                     subgroups: list[str] = (), far_ood: list = (), backbones: dict[str, str] | None = None,
                     label_map: dict[str, str] | None = None, ood_method: str = "mahalanobis", refit_ood: bool = False,
                     n_boot: int = 200, seed: int = 0, noise_images: int = 64, data=None) -> tuple[Path, Path]:
    """Evaluate adapted model folders on `manifest_path` and write the report into `output`: the same
    preparation (`remedis.stages.prepare_records`: label map, splits, validation carve) and the same
    evaluation as `remedis run` and `remedis adapt`, so the numbers agree for the same model, manifest and seed.
    `data`: the config's `data` section (split fractions, label map); --label-map entries are added to it."""
    from remedis import stages
    from remedis.data.manifest import read_manifest
    from remedis.evaluate.evaluation import EvalInputs, check_subgroups, load_far_ood
    from remedis.ood_scores import score_names

    if ood_method not in score_names():
        raise ValueError(f"--ood-method: expected one of {', '.join(score_names())}, got {ood_method!r}")
    check_subgroups(list(subgroups))
    folders, loaded = _load_models(models)
    known = loaded[0].class_names
    data = _data_section(data, label_map, loaded[0])
    manifest = read_manifest(manifest_path)
    if any(r.split is None for r in manifest.records):
        log.warning("%s: rows without a split get one by patient (seed %d); use the manifest the models were "
                    "adapted with, or test images may overlap their training images", manifest_path, seed)
    target = _target_site(loaded, target_site, manifest, manifest_path, subgroups)
    prepared = stages.prepare_records(manifest, data, seed, class_names=known)
    roles = {s: "target" if s == target else "source" if s == source_site else "ood" for s in manifest.sites()}
    caches: dict = {}  # decoded once per preprocessing (models adapted from different backbones may differ)
    far_sets: dict = {}

    def images_of(model) -> tuple:
        key = json.dumps(model.preprocessing.to_dict(), sort_keys=True)
        if key not in caches:
            caches[key] = stages.load_prepared(prepared, model.preprocessing, labeled_only=True)
            far_sets[key] = load_far_ood(list(far_ood), model.preprocessing, seed=seed)
        return caches[key], far_sets[key]

    entries = []
    for folder, model in zip(folders, loaded):
        cache, far = images_of(model)
        m = _model_to_evaluate(folder, model, cache, target, seed, backbones)
        test = stages.part(cache, split="test", labels=known)
        if not len(test):
            raise ValueError(f"{manifest_path}: no test image has one of the labels {known} of {m.folder}")
        inputs = EvalInputs(test=test, target_site=target, roles=roles, val=stages.part(cache, target, "val", labels=known),
                            far_ood=far, subgroups=list(subgroups), ood_method=ood_method, noise_images=noise_images)
        log.info("evaluating %s on %d test images", m.name, len(test))
        entries += stages.evaluate_models([m], inputs, n_boot=n_boot, seed=seed, refit_ood=refit_ood)
    test_all = stages.part(caches[next(iter(caches))], split="test", labels=known)
    provenance = {"manifest_sha256": manifest.sha256, "seed": seed, "models": [f.name for f in folders],
                  "far_ood_manifests": [read_manifest(p, check_files=False).sha256 for p in far_ood],
                  "bootstrap": n_boot, "label_map": data.label_map, "validation": prepared.validation}
    return stages.write_site_report(entries, stages.site_table(test_all, roles), prepared.task, target, provenance,
                                    output, title=f"remedis report: {target}")


def _load_models(models: list) -> tuple[list[Path], list]:
    """The model folders and their loaded models; every one must have the first one's classes."""
    from remedis.adapt.model import AdaptedModel

    folders = [Path(m) for m in models]
    loaded = [AdaptedModel.load(f) for f in folders]
    for f, m in zip(folders[1:], loaded[1:]):
        if m.class_names != loaded[0].class_names:
            raise ValueError(f"{f}: classes {m.class_names} differ from {folders[0]}'s {loaded[0].class_names}")
    return folders, loaded


def _data_section(data, label_map: dict[str, str] | None, model):
    """The config's data section with --label-map added and the models' positive class."""
    from dataclasses import replace

    from remedis.config import DataConfig

    data = data or DataConfig()
    if label_map:
        data = replace(data, label_map={**data.label_map, **label_map})
    return replace(data, positive_label=model.class_names[model.positive_index])


def _target_site(loaded: list, target_site: str | None, manifest, manifest_path, subgroups) -> str:
    """--target-site, or the one the models record; it and every --subgroup column must be in the manifest."""
    targets = {m.provenance.get("target_site") for m in loaded} - {None}
    target = target_site or (targets.pop() if len(targets) == 1 else None)
    if target is None:
        raise ValueError("--target-site: the models do not record one target site; name it")
    sites = manifest.sites()
    if target not in sites:
        raise ValueError(f"--target-site: {target!r} is not a site of {manifest_path} (sites: {', '.join(sites)})")
    for col in subgroups:
        if not any(col in r.meta for r in manifest.records):
            raise ValueError(f"--subgroup: {manifest_path} has no column {col!r}")
    return target


def _model_to_evaluate(folder: Path, model, cache, target: str, seed: int, backbones: dict[str, str] | None):
    """A model folder as the evaluation stage takes it: its budget of the target's train images (OOD state),
    the backbone it started from when that folder is found with the recorded hash (CKA), its name."""
    from remedis import stages
    from remedis.evaluate.evaluation import load_backbone_before
    from remedis.models.checkpoint import read_meta

    prov = model.provenance
    budget = prov.get("budget")
    t_train = stages.part(cache, target, "train", labels=model.class_names)
    budget_train = stages.budget_images(t_train, budget, seed) if budget is not None and len(t_train) else t_train
    init = prov.get("backbone_init")
    before_dir = (backbones or {}).get(init) or (folder.parent.parent / "backbones" / init if init and init != "random" else None)
    before = None
    if before_dir is not None and Path(before_dir).is_dir():
        if prov.get("backbone_sha256") and read_meta(before_dir).get("weights_sha256") != prov["backbone_sha256"]:
            log.warning("%s: backbone hash differs from the model's provenance; CKA skipped", before_dir)
        else:
            before = load_backbone_before(before_dir, model.architecture, model.preprocessing.in_chans)
    name = folder.name
    return stages.ModelToEvaluate(
        folder, name, name.partition("@")[0] if "@" in name else (init or name),
        stages.budget_fraction(budget, len(t_train)) if budget is not None else 1.0,
        int(prov.get("train_images", len(budget_train))), train=budget_train, backbone_before=before)
