"""`remedis pretrain supervised|simclr`: the central team's pretraining, one stage per command.

A thin face over the stage functions `remedis run` uses: `remedis.stages.pretrain_data` prepares the
manifest (label map, patient-level splits, channels) and decodes it or writes its shards,
`remedis.stages.pretrain_supervised` / `pretrain_simclr` / `pretrain_multitask` train, each keyed by
`remedis.resume`. `supervised` trains on the labeled train images of the chosen sites (validation: their
labeled val images); `simclr` on the train images, labeled or not, of all sites (or the chosen ones),
starting from `--init`. The output folder has the layout of a `remedis run` folder:
    backbones/supervised/  backbones/remedis/   the backbone folders (`remedis adapt --backbone ...`)
    logs/<backbone>/metrics.csv                 training metrics
    prepared/<stage>-<key>/manifest.csv         the prepared manifest (with its splits) the stage used
Run the same command again and a killed stage resumes from its last epoch; a finished one is reused.

Distributed (`runtime.devices`/`runtime.num_nodes` > 1, torchrun, srun; see docs/cluster.md): rank 0
prepares while the other ranks wait for its marker (`remedis.distributed.primary_first`), each rank
decodes its own copy and trains, and only rank 0 prints the summary.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

from remedis.commands import add_config_options, command_parser
from remedis.config import ConfigError, RunConfig

log = logging.getLogger("remedis")

BACKBONE_FOLDER = {"supervised": "supervised", "simclr": "remedis"}  # the names `remedis run` gives them

EXAMPLES = {
    "supervised": """examples:
  remedis pretrain supervised all.csv --output runs/central --site site-A --config configs/quickstart.yaml
  remedis pretrain supervised --config configs/foundation.yaml -o runs/foundation    # several corpora, a head each

Recommended: the upstream on the largest labeled corpus you have (several with pretrain.supervised.tasks);
its best epoch is chosen on validation AUROC, so more epochs than needed cost time, not quality.""",
    "simclr": """examples:
  remedis pretrain simclr all.csv --output runs/central --init runs/central
  torchrun --nproc-per-node 8 -m remedis.cli pretrain simclr all.csv -o runs/central --init runs/central \\
      --set runtime.devices=8

Recommended: start from the supervised backbone (--init) and give SimCLR every unlabeled image of every
site, target sites included (their test patients held out: `remedis data split`); MICLe on (default)
where patients have several images; batch 256 or more on a GPU.""",
}


def resolve_init(path: str | Path) -> Path:
    """`--init`: a backbone folder, or the output folder of `remedis pretrain supervised` (its backbones/supervised).

    Example:
        >>> resolve_init("runs/central")
        PosixPath('runs/central/backbones/supervised')
    """
    from remedis.models.checkpoint import read_meta

    path = Path(path)
    for folder in (path, path / "backbones" / "supervised"):
        if (folder / "meta.json").is_file():
            kind = read_meta(folder).get("kind")
            if kind != "backbone":
                raise ConfigError(f"--init {folder}: is a {kind!r} checkpoint, not a backbone")
            return folder
    raise ConfigError(f"--init {path}: not a backbone folder, nor an output folder of `remedis pretrain supervised` "
                      f"(no meta.json in {path} or {path / 'backbones' / 'supervised'})")


def parse_sites(values: list[str] | None) -> list[str] | None:
    """`--site` values -> site names; nothing -> None (all sites).

    Example:
        >>> parse_sites(["site-A,site-B", "site-C"])
        ['site-A', 'site-B', 'site-C']
    """
    sites = [s.strip() for v in values or [] for s in v.split(",") if s.strip()]
    return sites or None


def summary(stage: str, folder: Path, images: int, sites: list[str], seconds: float, reused: bool) -> str:
    """The one line printed when a pretraining command ends."""
    from remedis.models.checkpoint import read_meta
    from remedis.progress import format_duration

    meta = read_meta(folder)
    last = (meta.get("stage_history") or [{}])[-1]
    epochs = last.get("epochs") or []
    what = f"{meta['architecture']}, {last.get('images', images)} images of {', '.join(sites)}"
    if stage == "supervised":
        aurocs = [e["val_auroc"] for e in epochs if e.get("val_auroc") is not None]
        what += f", {_epochs(epochs)}, best val AUROC {max(aurocs):.3f}" if aurocs else f", {_epochs(epochs)}"
    elif epochs and "nt_xent" in epochs[0]:
        what += f", {_epochs(epochs)}, NT-Xent {epochs[0]['nt_xent']:.3f} -> {epochs[-1]['nt_xent']:.3f}"
    when = "finished earlier, reused" if reused else format_duration(seconds)
    return f"{stage} backbone: {folder} ({what}; {when})"


def _epochs(epochs: list) -> str:
    return f"{len(epochs)} epoch{'' if len(epochs) == 1 else 's'}"


def _config(args) -> tuple[RunConfig, Path | None]:
    """The run config; SimCLR continues the `--init` backbone: its architecture and input channels."""
    from remedis.models.checkpoint import read_meta

    cfg = RunConfig.from_yaml(args.config, args.set)  # no --config: the defaults, with any --set applied
    init = resolve_init(args.init) if getattr(args, "init", None) else None
    if init is not None:
        meta = read_meta(init)
        cfg.model = replace(cfg.model, backbone=meta["architecture"], in_chans=int(meta["in_chans"]))
    return cfg, init


def cmd_pretrain(args) -> int:
    """`remedis pretrain supervised|simclr`: prepare the manifest, train the stage (or reuse it), print a summary."""
    from remedis import resume, stages
    from remedis.distributed import PrimaryWaitError, is_primary
    from remedis.training import setup_runtime

    stage = args.stage
    cfg, init = _config(args)
    setup_runtime(cfg.runtime, cfg.seed)
    output = stages.check_output_folder(args.output)
    start = time.time()
    if stage == "supervised" and cfg.pretrain.supervised.tasks:
        return _pretrain_multitask(cfg, output, args, start)
    if not args.manifest:
        raise ConfigError(f"pretrain {stage}: give a manifest (or, for supervised, pretrain.supervised.tasks in --config)")
    try:
        data = stages.pretrain_data(stage, args.manifest, cfg, output, parse_sites(args.site))
    except PrimaryWaitError as exc:
        raise ValueError(str(exc)) from None  # one line, like any bad input
    folder = output / "backbones" / BACKBONE_FOLDER[stage]
    section = cfg.pretrain.supervised if stage == "supervised" else cfg.pretrain.simclr
    corpus = resume.corpus_key(data.manifest_sha256, data.cfg.data, data.cfg.model, cfg.seed, data.sites)
    key = resume.backbone_key(stage, corpus, section, resume.weights_of(init))
    n_images = getattr(data.images, "images", len(data.images))
    log.info("[pretrain %s] %d images of %s -> %s", stage, n_images, ", ".join(data.sites), folder)
    if stage == "supervised":
        reused = stages.pretrain_supervised(data.cfg, data.images, data.val, data.task, folder, key, data.manifest_sha256,
                                            not args.quiet)
    else:
        reused = stages.pretrain_simclr(data.cfg, data.images, init, folder, key, data.manifest_sha256, not args.quiet)
    if is_primary():  # the other ranks trained with it; only rank 0 reports
        print(summary(stage, folder, n_images, data.sites, time.time() - start, reused))
    return 0


def _pretrain_multitask(cfg: RunConfig, output: Path, args, start: float) -> int:
    """`remedis pretrain supervised --config` with `pretrain.supervised.tasks`: the multi-task upstream."""
    from remedis import resume, stages
    from remedis.distributed import PrimaryWaitError, is_primary
    from remedis.models.checkpoint import read_meta
    from remedis.progress import format_duration

    if args.manifest or args.site:
        raise ConfigError("pretrain supervised: the tasks in --config name their manifests and sites; "
                          "give no MANIFEST or --site with pretrain.supervised.tasks")
    try:
        data = stages.multitask_data(cfg, output)
    except PrimaryWaitError as exc:
        raise ValueError(str(exc)) from None
    folder = output / "backbones" / BACKBONE_FOLDER["supervised"]
    key = resume.multitask_key(data.key_parts(), data.cfg.data, data.cfg.model, cfg.seed, cfg.pretrain.supervised)
    reused = stages.pretrain_multitask(data, folder, key, not args.quiet)
    if is_primary():
        epochs = (read_meta(folder).get("stage_history") or [{}])[-1].get("epochs") or []
        best = max((e for e in epochs if e["val_auroc"] == e["val_auroc"]), key=lambda e: e["val_auroc"], default=None)
        scores = ", ".join(f"{name} {v['val_auroc']:.3f}" for name, v in best["tasks"].items()) if best else "no validation"
        when = "finished earlier, reused" if reused else format_duration(time.time() - start)
        print(f"supervised backbone: {folder} ({data.cfg.model.backbone}, {len(data.tasks)} tasks, "
              f"{sum(len(c) for c in data.train)} images, {_epochs(epochs)}, best val AUROC {scores}; {when})")
    return 0


def register(sub) -> None:
    """Add `remedis pretrain supervised|simclr` to the command line."""
    p = sub.add_parser("pretrain", help="pretrain a backbone (supervised upstream, then SimCLR), e.g. on a cluster",
                       description="Pretrain a backbone, one stage per command: the supervised upstream, then SimCLR "
                                   "(MICLe) from its weights. Each writes OUTPUT/backbones/<name>, resumable.")
    kinds = p.add_subparsers(dest="stage", required=True)
    for stage, text in (("supervised", "supervised upstream on the labeled train/val images of the site(s)"),
                        ("simclr", "SimCLR (MICLe) on the train images, labeled or not, of all sites")):
        s = command_parser(kinds, stage, text, text[0].upper() + text[1:] + ".", EXAMPLES[stage])
        s.add_argument("manifest", nargs="?" if stage == "supervised" else None,
                       help="manifest CSV" + (" (none with pretrain.supervised.tasks in --config)" if stage == "supervised" else ""))
        s.add_argument("--output", "-o", required=True,
                       help=f"output folder; the backbone goes to OUTPUT/backbones/{BACKBONE_FOLDER[stage]}")
        if stage == "simclr":
            s.add_argument("--init", default=None,
                           help="start from this backbone: a folder, or the output folder of `pretrain supervised`")
        s.add_argument("--site", action="append", default=[], metavar="SITE",
                       help="only these sites (repeatable or comma-separated; default: all)")
        add_config_options(s, "data, model, pretrain, runtime", "runtime.devices=8")
        s.add_argument("--quiet", action="store_true", help="no progress bars (log lines every 30 s remain)")
        s.set_defaults(func=cmd_pretrain)
