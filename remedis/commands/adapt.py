"""`remedis adapt`: the job a hospital runs.

A thin face over `remedis.stages`, the code `remedis run` uses: prepares the site's records (label map,
patient-level splits, a validation split carved from train when the manifest has none), takes the nested
label budget(s), adapts (sweep, soup, WiSE-FT, calibration, operating point, OOD detector, input
contract) and writes one complete model folder per budget, then evaluates them all once and writes
`report.json` / `report.html` with the site's test metrics. A rerun with the same inputs reuses every
budget (and student) that finished, so a killed sweep resumes at the first unfinished budget.

`--backbone random` adapts the config's `model.backbone` from random initialisation (channels and image
size from the config and the site's images): the baseline that tells a site how much pretraining saves
it, on the same splits, budgets and recipe (WiSE-FT does not apply: there is no pretrained end point).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from remedis.commands import add_config_options, command_parser
from remedis.stages import RANDOM  # --backbone value for the random-initialisation baseline

log = logging.getLogger("remedis")

SWEEP = "1%,5%,10%,25%,100%"  # `--budget sweep`: the data-efficiency curve of the REMEDIS paper

EXAMPLES = """examples:
  remedis adapt --backbone runs/x/backbones/remedis --manifest site.csv --budget 10% --output runs/site-x
  remedis adapt --backbone runs/x/backbones/remedis --manifest site.csv --budget sweep -o runs/site-x  # 1%..100%
  remedis adapt --backbone random --manifest site.csv --budget sweep -o runs/site-x-random             # the baseline
  remedis adapt ... --config configs/breast_ultrasound.yaml --set adapt.mode=lp-ft                     # overrides

Recommended: --budget sweep once, to see how many labels the site needs (the report's data-efficiency
curve); the same sweep with --backbone random, to see what pretraining saves. The defaults of the adapt
section (a 3-point lr sweep, greedy soup, WiSE-FT, operating sensitivity 0.9) suit 20-2,000 labels."""


def parse_budgets(text: str) -> list[tuple[str, float | int]]:
    """'10%,25%' -> [('10%', 0.1), ('25%', 0.25)]; 'sweep' -> the default sweep (SWEEP).

    Example:
        >>> parse_budgets("10%,50")
        [('10%', 0.1), ('50', 50)]
    """
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
        if t.endswith("%") or "." in t:
            value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
            if not 0 < value <= 1:
                raise ValueError
            return value
        count = int(t)
        if count < 1:
            raise ValueError
        return count
    except ValueError:
        raise ValueError(f"--budget: {text!r} is not a percentage (10%), a fraction in (0, 1] or an image count >= 1") from None


def _config_for_backbone(args):
    """The run config with the backbone's architecture, channels and image size (random: the config's own)."""
    from remedis.config import ConfigError, RunConfig
    from remedis.data.preprocess import Preprocessing
    from remedis.models.checkpoint import read_meta

    cfg = RunConfig.from_yaml(args.config, args.set)  # no --config: the defaults, with any --set applied
    if args.backbone == RANDOM:
        return cfg, None, None
    backbone = Path(args.backbone)
    meta = read_meta(backbone)
    if meta.get("kind") != "backbone":
        raise ConfigError(f"{backbone}: is a {meta.get('kind')!r} checkpoint, not a backbone")
    pre = Preprocessing.from_dict(meta["preprocessing"])
    cfg.model = replace(cfg.model, backbone=meta["architecture"], in_chans=int(meta["in_chans"]))
    cfg.data = replace(cfg.data, image_size=pre.image_size)
    return cfg, backbone, pre


def _site_of(manifest, chosen: str | None, path: str) -> str:
    """--site, or the manifest's only site."""
    from remedis.config import ConfigError

    site = chosen or (manifest.sites()[0] if len(manifest.sites()) == 1 else None)
    if site is None:
        raise ConfigError(f"{path}: several sites ({', '.join(manifest.sites())}); choose one with --site")
    if site not in manifest.sites():
        raise ConfigError(f"--site {site!r} is not in {path} (sites: {', '.join(manifest.sites())})")
    return site


def _unlabeled_backbone(cfg, backbone: Path | None, images, task, output: Path, manifest_sha256: str, progress: bool):
    """What adaptation starts from and how reports name it: with `adapt.unlabeled` simclr, the backbone
    continued by SimCLR on the site's train images (named `<backbone>+site`); and the labels record: how many
    labeled and unlabeled train images the site has and what the unlabeled ones are used for."""
    from remedis import stages
    from remedis.config import ConfigError

    use = cfg.adapt.unlabeled
    labels = {"labeled_train_images": len(images.train), "unlabeled_train_images": len(images.pool) - len(images.train),
              "unlabeled_use": use}
    name = RANDOM if backbone is None else backbone.name
    if "simclr" not in use:
        return backbone, name, labels
    if backbone is None:
        raise ConfigError("adapt.unlabeled: simclr continues a pretrained backbone; --backbone random has none to continue")
    folder = output / "backbones" / f"{name}+site"
    site_backbone, _ = stages.site_simclr(cfg, backbone, images.pool, images.train, images.val, task, folder,
                                          manifest_sha256, images.site, progress)
    return site_backbone, f"{name}+site", {**labels, "site_backbone": folder.name}


def cmd_adapt(args) -> int:
    """`remedis adapt`: prepare the site, adapt at every budget (reusing finished ones), evaluate, report."""
    from remedis import resume, stages
    from remedis.data.manifest import read_manifest, write_manifest
    from remedis.evaluate.evaluation import load_backbone_before
    from remedis.training import setup_runtime

    budgets = parse_budgets(args.budget)  # fail before any work
    cfg, backbone, pre = _config_for_backbone(args)
    setup_runtime(cfg.runtime, cfg.seed)
    manifest = read_manifest(args.manifest)
    site = _site_of(manifest, args.site, args.manifest)
    if backbone is None:  # the network the config names, decoding as the config and the site's images say
        cfg = stages.resolve_channels(cfg, [r for r in manifest.records if r.site == site])
        pre = stages.preprocessing_for(cfg)
    output = stages.check_output_folder(args.output)
    prepared = stages.prepare_records(manifest, cfg.data, cfg.seed, sites=[site])
    write_manifest(prepared.manifest, output / "manifest.csv")
    task = prepared.task
    cache = stages.load_prepared(prepared, pre)
    images = stages.SiteImages.of(cache, site, prepared.validation.get(site))
    backbone, name, labels = _unlabeled_backbone(cfg, backbone, images, task, output, manifest.sha256, not args.quiet)
    specs = [stages.BudgetSpec(f"{name}@{text}", f"{name}@{text}".replace("%", "pct"), b) for text, b in budgets]
    before = None if backbone is None else load_backbone_before(backbone, cfg.model.backbone, cfg.model.in_chans)
    distill = args.distill or cfg.adapt.distill_student or (cfg.model.backbone if "distill" in cfg.adapt.unlabeled else None)
    made = stages.adapt_budgets(stages.AdaptSettings.from_config(cfg), backbone, name, specs, images, task, output,
                                manifest.sha256, pre, progress=not args.quiet, distill=distill, backbone_before=before,
                                notes={"labels": labels})
    # each budget's model, then its student
    to_evaluate = [m for i, model in enumerate(made.models) for m in [model, *made.students[i:i + 1]]]
    roles = {site: "target"}
    inputs = stages.eval_inputs(cfg.evaluate, cfg.adapt.operating_sensitivity, images.test, site, roles, images.val)
    entries = stages.evaluate_models(to_evaluate, inputs, n_boot=cfg.evaluate.bootstrap, seed=cfg.seed)
    for m, e in zip(to_evaluate, entries):
        auc = e["sites"][site]["auroc"]
        print(f"{e['name']}: {e['train_images']} labels, test AUROC {'n/a' if auc is None else f'{auc:.3f}'}, model {m.folder}")
    provenance = {"manifest_sha256": manifest.sha256, "backbone_sha256": resume.weights_of(backbone), "seed": cfg.seed,
                  "class_names": task.class_names, "positive_class": task.positive_class,
                  "skipped_images": len(cache.failures), "validation": prepared.validation, "labels": labels}
    _, html_path = stages.write_site_report(entries, stages.site_table(images.test, roles), task, site, provenance, output,
                                            title=f"remedis adaptation to {site}")
    print(f"report: {html_path}")
    return 0


def register(sub) -> None:
    """Add `remedis adapt` to the command line."""
    a = command_parser(sub, "adapt", "fine-tune a backbone to a site at one or more label budgets",
                       "Fine-tune a pretrained backbone (or, with --backbone random, the config's network from random "
                       "initialisation) to one site's labeled images at one or more label budgets: one complete, servable "
                       "model folder per budget (calibration, operating point, OOD detector, input contract), then a test "
                       "report.", EXAMPLES)
    a.add_argument("--backbone", required=True,
                   help=f"backbone checkpoint folder (from pretrain), or '{RANDOM}': the config's model.backbone "
                        "from random initialisation (the baseline)")
    a.add_argument("--manifest", required=True, help="the site's manifest CSV")
    a.add_argument("--budget", default="100%",
                   help="label budget(s): 10%%, 0.1 or 50 (images); comma-separated for a sweep, "
                        f"or 'sweep' for {SWEEP.replace('%', '%%')} (default: 100%%)")
    a.add_argument("--output", "-o", required=True, help="output folder: manifest.csv, adapted/<budget>/, report.*")
    a.add_argument("--site", default=None, help="site to adapt to (when the manifest holds several)")
    add_config_options(a, "adapt, data, evaluate, runtime", "adapt.mode=lp-ft")
    a.add_argument("--distill", default=None, metavar="ARCH",
                   help="also distil each adapted model into a small student (e.g. resnet18) on all site train images")
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    a.set_defaults(func=cmd_adapt)
