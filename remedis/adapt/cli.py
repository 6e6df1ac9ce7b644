"""`remedis adapt`: the job a hospital runs.

    remedis adapt --backbone runs/x/backbones/remedis --manifest site.csv --budget 10% --output runs/site-x
    remedis adapt --backbone ... --manifest site.csv --budget 1%,5%,10%,25%,100% --output runs/site-x   # a sweep
    remedis adapt --backbone ... --manifest site.csv --budget sweep --output runs/site-x   # the same (SWEEP)
    remedis adapt ... --config configs/breast_ultrasound.yaml --set adapt.mode=lp-ft             # overrides

Splits the site's data by patient (unless the manifest has splits), takes the nested label budget(s),
fine-tunes (sweep, soup, WiSE-FT, calibration as configured), and writes one adapted model folder per
budget plus `report.json` / `report.html` with the site's test metrics.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

log = logging.getLogger("remedis")

SWEEP = "1%,5%,10%,25%,100%"  # `--budget sweep`: the data-efficiency curve of the REMEDIS paper


def parse_budgets(text: str) -> list[tuple[str, float | int]]:
    """'10%,25%' -> [('10%', 0.1), ('25%', 0.25)]; 'sweep' -> the default sweep (SWEEP)."""
    if text.strip().lower() == "sweep":
        text = SWEEP
    budgets = [(t.strip(), parse_budget(t)) for t in text.split(",")]
    seen = [(type(b), b) for _, b in budgets]  # 1 (one image) is not 1.0 (100%)
    if len(set(seen)) != len(seen):
        raise ValueError(f"--budget: {text!r} names a budget twice")
    return budgets


def parse_budget(text: str) -> float | int:
    """'10%' -> 0.1, '0.1' -> 0.1, '50' -> 50 images."""
    t = text.strip()
    try:
        if t.endswith("%"):
            value = float(t[:-1]) / 100
            if not 0 < value <= 1:
                raise ValueError
            return value
        if "." in t:
            value = float(t)
            if not 0 < value <= 1:
                raise ValueError
            return value
        count = int(t)
        if count < 1:
            raise ValueError
        return count
    except ValueError:
        raise ValueError(f"--budget: {text!r} is not a percentage (10%), a fraction in (0, 1] or an image count >= 1") from None


def cmd_adapt(args) -> int:
    from remedis.adapt.finetune import fine_tune
    from remedis.config import ConfigError, RunConfig
    from remedis.data.dataset import load_images
    from remedis.data.manifest import read_manifest, write_manifest
    from remedis.data.preprocess import Preprocessing
    from remedis.data.splits import assign_splits, budget_subset
    from remedis.evaluate.evaluation import recipe_ablation
    from remedis.evaluate.report import build_report, write_report
    from remedis.models.checkpoint import read_meta
    from remedis.pipeline import check_output_folder, evaluate_model
    from remedis.training import setup_runtime

    budgets = parse_budgets(args.budget)  # fail before any work
    cfg = RunConfig.from_yaml(args.config, args.set)  # no --config: the defaults, with any --set applied
    meta = read_meta(args.backbone)
    if meta.get("kind") != "backbone":
        raise ConfigError(f"{args.backbone}: is a {meta.get('kind')!r} checkpoint, not a backbone")
    pre = Preprocessing.from_dict(meta["preprocessing"])
    cfg.model = replace(cfg.model, backbone=meta["architecture"], in_chans=int(meta["in_chans"]))
    cfg.data = replace(cfg.data, image_size=pre.image_size)
    setup_runtime(cfg.runtime, cfg.seed)
    output = check_output_folder(args.output)

    manifest = read_manifest(args.manifest)
    site = args.site or (manifest.sites()[0] if len(manifest.sites()) == 1 else None)
    if site is None:
        raise ConfigError(f"{args.manifest}: several sites ({', '.join(manifest.sites())}); choose one with --site")
    if site not in manifest.sites():
        raise ConfigError(f"--site {site!r} is not in {args.manifest} (sites: {', '.join(manifest.sites())})")
    records = [r for r in manifest.records if r.site == site]
    if cfg.data.label_map:
        records = [replace(r, label=cfg.data.label_map.get(r.label, r.label)) for r in records]
    records = assign_splits(records, tuple(cfg.data.site_split_fractions.get(site, cfg.data.split_fractions)), seed=cfg.seed)
    write_manifest(records, output / "manifest.csv")
    class_names = sorted({r.label for r in records if r.label})
    if len(class_names) < 2:
        raise ConfigError(f"{args.manifest}: site {site!r} has {len(class_names)} class(es) {class_names}; adaptation needs two or more")
    positive = cfg.data.positive_label or class_names[-1]
    positive_index = class_names.index(positive)
    cache = load_images(records, pre)
    train = cache.subset(lambda r: r.split == "train" and r.label != "")
    val = cache.subset(lambda r: r.split == "val" and r.label != "")
    test = cache.subset(lambda r: r.split == "test" and r.label != "")
    models = []
    for text, budget in budgets:
        chosen = {r.image for r in budget_subset(train.records, budget, seed=cfg.seed)}
        part = train.subset(lambda r: r.image in chosen)
        name = f"{Path(args.backbone).name}@{text}"
        log.info("adapt %s: %d labeled images of %s", name, len(part), site)
        adapted, _, variants = fine_tune(cfg, Path(args.backbone), part, val, class_names, positive_index, not args.quiet,
                                         provenance={"manifest_sha256": manifest.sha256, "target_site": site, "budget": budget})
        adapted.provenance["recipe_ablation"] = recipe_ablation(adapted, variants, test, cfg.evaluate.bootstrap, cfg.seed)
        folder = adapted.save(output / "adapted" / name.replace("%", "pct"))
        fraction = budget if isinstance(budget, float) else min(1.0, budget / max(1, len(train)))
        models.append({"name": name, "backbone": Path(args.backbone).name, "fraction": fraction,
                       "train_images": len(part), "temperature": adapted.temperature,
                       "sites": evaluate_model(adapted, test, class_names, positive_index, cfg, cfg.evaluate.bootstrap),
                       "recipe_ablation": adapted.provenance["recipe_ablation"]})
        print(f"{name}: {len(part)} labels, test AUROC {models[-1]['sites'][site]['auroc']}, model {folder}")
        student_arch = args.distill or cfg.adapt.distill_student
        if student_arch:  # the site's train images, labeled or not, teach a small serving model
            from remedis.adapt.distill import distill

            site_images = cache.subset(lambda r: r.split == "train")
            student = distill(adapted, site_images, val, student_arch, epochs=cfg.adapt.distill_epochs,
                              temperature=cfg.adapt.distill_temperature, runtime=cfg.runtime, seed=cfg.seed,
                              sensitivity=cfg.adapt.operating_sensitivity, progress=not args.quiet)
            student_folder = student.save(output / "adapted" / f"{name.replace('%', 'pct')}-student-{student_arch}")
            models.append({"name": f"{name}-student-{student_arch}", "backbone": f"{Path(args.backbone).name}-student",
                           "fraction": fraction, "train_images": len(part), "temperature": student.temperature,
                           "sites": evaluate_model(student, test, class_names, positive_index, cfg, cfg.evaluate.bootstrap)})
            print(f"{name} -> {student_arch} student ({len(site_images)} images): test AUROC "
                  f"{models[-1]['sites'][site]['auroc']}, model {student_folder}")
    sites = {site: {"role": "target", "test_images": len(test), "test_patients": len({r.patient_id for r in test.records})}}
    provenance = {"manifest_sha256": manifest.sha256, "backbone_sha256": meta.get("weights_sha256"), "seed": cfg.seed,
                  "class_names": class_names, "positive_class": positive, "skipped_images": len(cache.failures)}
    json_path, html_path = write_report(build_report(models, sites, provenance, title=f"remedis adaptation to {site}"), output)
    print(f"report: {html_path}")
    return 0


def register(sub) -> None:
    a = sub.add_parser("adapt", help="fine-tune a backbone to a site at one or more label budgets")
    a.add_argument("--backbone", required=True, help="backbone checkpoint folder (from pretrain)")
    a.add_argument("--manifest", required=True, help="the site's manifest CSV")
    a.add_argument("--budget", default="100%",
                   help="label budget(s): 10%%, 0.1 or 50 (images); comma-separated for a sweep, "
                        f"or 'sweep' for {SWEEP.replace('%', '%%')}")
    a.add_argument("--output", "-o", required=True)
    a.add_argument("--site", default=None, help="site to adapt to (when the manifest holds several)")
    a.add_argument("--config", default=None, help="YAML config for the adapt/data/runtime sections")
    a.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set adapt.mode=lp-ft (repeatable)")
    a.add_argument("--distill", default=None, metavar="ARCH",
                   help="also distil each adapted model into a small student (e.g. resnet18) on all site train images")
    a.add_argument("--quiet", action="store_true")
    a.set_defaults(func=cmd_adapt)
