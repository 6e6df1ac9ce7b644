"""`remedis adapt`: the job a hospital runs.

    remedis adapt --backbone runs/x/backbones/remedis --manifest site.csv --budget 10% --output runs/site-x
    remedis adapt --backbone ... --manifest site.csv --budget 1%,5%,10%,25%,100% --output runs/site-x   # a sweep
    remedis adapt --backbone ... --manifest site.csv --budget sweep --output runs/site-x   # the same (SWEEP)
    remedis adapt ... --config configs/breast_ultrasound.yaml --set adapt.mode=lp-ft             # overrides
    remedis adapt --backbone random --config configs/breast_ultrasound.yaml ...   # the random-init baseline

A thin face over `remedis.stages`, the code `remedis run` uses: prepares the site's records (label map,
patient-level splits, a validation split carved from train when the manifest has none), takes the nested
label budget(s), adapts (sweep, soup, WiSE-FT, calibration, operating point, OOD detector, input
contract) and writes one complete model folder per budget, then evaluates them all once and writes
`report.json` / `report.html` with the site's test metrics. A rerun with the same inputs reuses every
budget that finished, so a killed sweep resumes at the first unfinished budget.

`--backbone random` adapts the config's `model.backbone` from random initialisation (channels and image
size from the config and the site's images): the baseline that tells a site how much pretraining saves
it, on the same splits, budgets and recipe (WiSE-FT does not apply: there is no pretrained end point).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

RANDOM = "random"  # --backbone value for the random-initialisation baseline

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
    from remedis import stages
    from remedis.config import ConfigError, RunConfig
    from remedis.data.manifest import read_manifest, write_manifest
    from remedis.data.preprocess import Preprocessing
    from remedis.evaluate.evaluation import load_backbone_before
    from remedis.models.checkpoint import read_meta
    from remedis.pipeline import reusable, stage_key
    from remedis.training import setup_runtime

    budgets = parse_budgets(args.budget)  # fail before any work
    cfg = RunConfig.from_yaml(args.config, args.set)  # no --config: the defaults, with any --set applied
    backbone: Path | None = None if args.backbone == RANDOM else Path(args.backbone)
    meta: dict = {}
    if backbone is not None:
        meta = read_meta(backbone)
        if meta.get("kind") != "backbone":
            raise ConfigError(f"{backbone}: is a {meta.get('kind')!r} checkpoint, not a backbone")
        pre = Preprocessing.from_dict(meta["preprocessing"])
        cfg.model = replace(cfg.model, backbone=meta["architecture"], in_chans=int(meta["in_chans"]))
        cfg.data = replace(cfg.data, image_size=pre.image_size)
    setup_runtime(cfg.runtime, cfg.seed)

    manifest = read_manifest(args.manifest)
    site = args.site or (manifest.sites()[0] if len(manifest.sites()) == 1 else None)
    if site is None:
        raise ConfigError(f"{args.manifest}: several sites ({', '.join(manifest.sites())}); choose one with --site")
    if site not in manifest.sites():
        raise ConfigError(f"--site {site!r} is not in {args.manifest} (sites: {', '.join(manifest.sites())})")
    if backbone is None:  # the network the config names, decoding as the config and the site's images say
        cfg = stages.resolve_channels(cfg, [r for r in manifest.records if r.site == site])
        pre = stages.preprocessing_for(cfg)
    output = stages.check_output_folder(args.output)
    prepared = stages.prepare_records(manifest, cfg.data, cfg.seed, sites=[site])
    write_manifest(prepared.manifest, output / "manifest.csv")
    task = prepared.task
    cache = stages.load_prepared(prepared, pre)
    train, val, test = (stages.part(cache, site, split) for split in ("train", "val", "test"))
    name_of_backbone = RANDOM if backbone is None else backbone.name
    before = None if backbone is None else load_backbone_before(backbone, cfg.model.backbone, cfg.model.in_chans)
    # what the adaptation starts from: the backbone's weights, or (random init) the network (the seed is keyed below)
    start = (RANDOM, cfg.model.backbone, cfg.model.in_chans) if backbone is None else meta.get("weights_sha256")
    student_arch = args.distill or cfg.adapt.distill_student
    to_evaluate: list[stages.ModelToEvaluate] = []
    for text, budget in budgets:
        budget_train = stages.budget_images(train, budget, cfg.seed)
        name = f"{name_of_backbone}@{text}"
        folder = output / "adapted" / name.replace("%", "pct")
        # everything that determines the model: a rerun reuses the budgets that finished (a killed sweep resumes)
        key = stage_key("adapt", manifest.sha256, site, cfg.data, cfg.adapt, cfg.evaluate.ood_method,
                        cfg.evaluate.ood_accept_rate, cfg.seed, budget, start, pre.to_dict())
        if reusable(folder, key):
            log.info("adapt %s: finished earlier with the same inputs, reused (%s)", name, folder)
        else:
            log.info("adapt %s: %d labeled images of %s", name, len(budget_train), site)
            stages.adapt_budget(cfg, backbone, budget_train, val, task, folder, progress=not args.quiet,
                                provenance={"manifest_sha256": manifest.sha256, "target_site": site, "budget": budget,
                                            "validation": prepared.validation.get(site), "stage_key": key},
                                ablation_test=test)
        fraction = stages.budget_fraction(budget, len(train))
        to_evaluate.append(stages.ModelToEvaluate(folder, name, name_of_backbone, fraction, len(budget_train),
                                                  train=budget_train, backbone_before=before))
        if student_arch:  # the site's train images, labeled or not, teach a small serving model
            site_images = stages.part(cache, site, "train", labeled=None)
            student_folder = output / "adapted" / f"{name.replace('%', 'pct')}-student-{student_arch}"
            stages.distill_budget(cfg, folder, student_arch, site_images, val, budget_train, student_folder,
                                  progress=not args.quiet)
            log.info("%s -> %s student on %d images: %s", name, student_arch, len(site_images), student_folder)
            to_evaluate.append(stages.ModelToEvaluate(student_folder, f"{name}-student-{student_arch}",
                                                      f"{name_of_backbone}-student", fraction, len(budget_train),
                                                      train=budget_train, extra={"distilled": True}))

    roles = {site: "target"}
    inputs = stages.eval_inputs(cfg, test, site, roles, val)
    entries = stages.evaluate_models(to_evaluate, inputs, n_boot=cfg.evaluate.bootstrap, seed=cfg.seed)
    for m, e in zip(to_evaluate, entries):
        auc = e["sites"][site]["auroc"]
        print(f"{e['name']}: {e['train_images']} labels, test AUROC {'n/a' if auc is None else f'{auc:.3f}'}, model {m.folder}")
    provenance = {"manifest_sha256": manifest.sha256, "backbone_sha256": meta.get("weights_sha256"), "seed": cfg.seed,
                  "class_names": task.class_names, "positive_class": task.positive_class,
                  "skipped_images": len(cache.failures), "validation": prepared.validation}
    _, html_path = stages.write_site_report(entries, stages.site_table(test, roles), task, site, provenance, output,
                                            title=f"remedis adaptation to {site}")
    print(f"report: {html_path}")
    return 0


def register(sub) -> None:
    a = sub.add_parser("adapt", help="fine-tune a backbone to a site at one or more label budgets")
    a.add_argument("--backbone", required=True,
                   help=f"backbone checkpoint folder (from pretrain), or '{RANDOM}': the config's model.backbone "
                        "from random initialisation (the baseline)")
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
