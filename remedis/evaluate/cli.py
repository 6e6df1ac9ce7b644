"""`remedis evaluate` / `remedis report`: evaluate adapted model folders on a manifest's test split and
write `report.json` + `report.html`; `remedis report --from-json` re-renders the page from a JSON.

    remedis evaluate --model runs/x/adapted/remedis@0.1 --model runs/x/adapted/supervised@1 \\
        --manifest runs/x/manifest.csv --output runs/x/eval --subgroup device --far-ood ../cxr/manifest.csv
    remedis report --from-json runs/x/eval/report.json

Use the manifest the models were adapted with (the run folder's `manifest.csv` carries its splits):
otherwise the test split could overlap the images a model was trained on.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("remedis")


def register(sub) -> None:
    for name, help_ in (("evaluate", "evaluate adapted models on a manifest and write the report"),
                        ("report", "same as evaluate; with --from-json, re-render report.html from a report.json")):
        p = sub.add_parser(name, help=help_)
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
        p.add_argument("--ood-method", default="mahalanobis", help="detector fitted when a model has none (or with --refit-ood)")
        p.add_argument("--refit-ood", action="store_true", help="refit and overwrite the models' stored OOD detectors")
        p.add_argument("--noise-images", type=int, default=64, help="synthetic noise images (far-OOD set)")
        p.add_argument("--bootstrap", type=int, default=200)
        p.add_argument("--seed", type=int, default=0, help="the seed of the splits/budgets and of the bootstrap")
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
    json_path, html_path = evaluate_folders(
        args.model, args.manifest, args.output, target_site=args.target_site, source_site=args.source_site,
        subgroups=args.subgroup, far_ood=args.far_ood, backbones=_pairs(args.backbone, "--backbone"),
        label_map=_pairs(args.label_map, "--label-map"), ood_method=args.ood_method, refit_ood=args.refit_ood,
        n_boot=args.bootstrap, seed=args.seed, noise_images=args.noise_images)
    print(f"report: {html_path}\n        {json_path}")
    return 0


def evaluate_folders(models: list, manifest_path, output, target_site: str | None = None, source_site: str | None = None,
                     subgroups: list[str] = (), far_ood: list = (), backbones: dict[str, str] | None = None,
                     label_map: dict[str, str] | None = None, ood_method: str = "mahalanobis", refit_ood: bool = False,
                     n_boot: int = 200, seed: int = 0, noise_images: int = 64) -> tuple[Path, Path]:
    """Evaluate adapted model folders on `manifest_path` and write the report into `output`."""
    from dataclasses import replace

    from remedis.adapt.model import AdaptedModel
    from remedis.data.dataset import load_images
    from remedis.data.manifest import read_manifest
    from remedis.data.splits import assign_splits, budget_subset
    from remedis.evaluate.evaluation import EvalInputs, check_subgroups, evaluate_folder, load_backbone_before, load_far_ood
    from remedis.evaluate.ood import METHODS, OODDetector
    from remedis.evaluate.report import build_report, write_report
    from remedis.models.checkpoint import read_meta

    if ood_method not in METHODS:
        raise ValueError(f"--ood-method: expected one of {', '.join(METHODS)}, got {ood_method!r}")
    check_subgroups(list(subgroups))
    folders = [Path(m) for m in models]
    metas = [read_meta(f) for f in folders]
    manifest = read_manifest(manifest_path)
    records = manifest.records
    if label_map:
        records = [replace(r, label=label_map.get(r.label, r.label)) for r in records]
    if any(r.split is None for r in records):
        log.warning("%s: rows without a split get one by patient (seed %d); use the manifest the models were "
                    "adapted with, or test images may overlap their training images", manifest_path, seed)
        records = assign_splits(records, seed=seed)
    targets = {m.get("provenance", {}).get("target_site") for m in metas} - {None}
    target = target_site or (targets.pop() if len(targets) == 1 else None)
    if target is None:
        raise ValueError("--target-site: the models do not record one target site; name it")
    sites = sorted({r.site for r in records})
    if target not in sites:
        raise ValueError(f"--target-site: {target!r} is not a site of {manifest_path} (sites: {', '.join(sites)})")
    for col in subgroups:
        if not any(col in r.meta for r in records):
            raise ValueError(f"--subgroup: {manifest_path} has no column {col!r}")
    roles = {s: "target" if s == target else "source" if s == source_site else "ood" for s in sites}

    caches: dict = {}
    entries = []
    for folder, meta in zip(folders, metas):
        model = AdaptedModel.load(folder)
        key = json.dumps(model.preprocessing.to_dict(), sort_keys=True)
        if key not in caches:
            caches[key] = load_images([r for r in records if r.label], model.preprocessing)
        cache = caches[key]
        known = set(model.class_names)
        test = cache.subset(lambda r, known=known: r.split == "test" and r.label in known)
        if not len(test):
            raise ValueError(f"{manifest_path}: no test image has one of the labels {model.class_names} of {folder}")
        prov = meta.get("provenance", {})
        budget = prov.get("budget")
        t_train = cache.subset(lambda r, known=known: r.site == target and r.split == "train" and r.label in known)
        if budget is not None and len(t_train):
            chosen = {r.image for r in budget_subset(t_train.records, budget, seed=seed)}
            t_train = t_train.subset(lambda r, chosen=chosen: r.image in chosen)
        t_val = cache.subset(lambda r, known=known: r.site == target and r.split == "val" and r.label in known)
        init = prov.get("backbone_init")
        before_dir = (backbones or {}).get(init) or (folder.parent.parent / "backbones" / init if init and init != "random" else None)
        before = None
        if before_dir is not None and Path(before_dir).is_dir():
            if prov.get("backbone_sha256") and read_meta(before_dir).get("weights_sha256") != prov["backbone_sha256"]:
                log.warning("%s: backbone hash differs from the model's provenance; CKA skipped", before_dir)
            else:
                before = load_backbone_before(before_dir, model.architecture, model.preprocessing.in_chans)
        inputs = EvalInputs(test=test, target_site=target, roles=roles, train=t_train, val=t_val,
                            far_ood=load_far_ood(list(far_ood), model.preprocessing, seed=seed), subgroups=list(subgroups),
                            backbone_before=before, ood_method=ood_method, noise_images=noise_images)
        refit = refit_ood or OODDetector.load(folder) is None
        log.info("evaluating %s on %d test images", folder.name, len(test))
        entry = evaluate_folder(folder, inputs, n_boot=n_boot, seed=seed, refit_ood=refit)
        name = folder.name
        entries.append({"name": name, "backbone": name.partition("@")[0] if "@" in name else (init or name),
                        "fraction": float(budget) if isinstance(budget, (int, float)) and budget <= 1 else 1.0,
                        "train_images": int(prov.get("train_images", len(t_train))), **entry})
    first = caches[next(iter(caches))]
    test_all = first.subset(lambda r: r.split == "test")
    site_info = {s: {"role": roles[s], "test_images": sum(r.site == s for r in test_all.records),
                     "test_patients": len({r.patient_id for r in test_all.records if r.site == s})} for s in sites}
    model0 = AdaptedModel.load(folders[0])
    provenance = {"manifest_sha256": manifest.sha256, "seed": seed, "models": [f.name for f in folders],
                  "far_ood_manifests": [read_manifest(p, check_files=False).sha256 for p in far_ood],
                  "bootstrap": n_boot, "label_map": label_map or {}}
    task = {"class_names": model0.class_names, "target_site": target,
            "positive_class": model0.class_names[model0.positive_index] if len(model0.class_names) == 2 else None}
    return write_report(build_report(entries, site_info, provenance, title=f"remedis report: {target}", task=task), output)

