"""`remedis pretrain supervised|simclr`: the central team's pretraining, one stage per command.

    remedis pretrain supervised all.csv --output runs/central --site site-A --config configs/x.yaml
    remedis pretrain simclr all.csv --output runs/central --init runs/central --set runtime.devices=8
    torchrun --nproc-per-node 8 -m remedis.cli pretrain simclr all.csv -o runs/central --init runs/central

A thin face over the code `remedis run` uses: `remedis.stages` prepares the manifest (label map,
patient-level splits, channels) and decodes it, `remedis.pretrain.jobs` trains. `supervised` trains on the
labeled train images of the chosen sites (validation: their labeled val images); `simclr` on the train
images, labeled or not, of all sites (or the chosen ones), starting from `--init`. The output folder has
the layout of a `remedis run` folder:
    backbones/supervised/  backbones/remedis/   the backbone folders (`remedis adapt --backbone ...`)
    logs/<backbone>/metrics.csv                 training metrics
    prepared/<stage>-<key>/manifest.csv         the prepared manifest (with its splits) the stage used
Run the same command again and a killed stage resumes from its last epoch; a finished one is reused.

Distributed (`runtime.devices`/`runtime.num_nodes` > 1, torchrun, srun; see docs/cluster.md): rank 0
prepares while the other ranks wait for its marker (`remedis.distributed.primary_first`), each rank
decodes its own copy and trains, and only rank 0 prints the summary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

from remedis.config import ConfigError, RunConfig
from remedis.data.dataset import ImageCache, load_images
from remedis.data.shards import ShardSet
from remedis.stages import Task

log = logging.getLogger("remedis")

BACKBONE_FOLDER = {"supervised": "supervised", "simclr": "remedis"}  # the names `remedis run` gives them


@dataclass
class PretrainData:
    """What one pretraining stage trains on; the same on every rank.

    Args:
        cfg: the config with `data.channels` and `model.in_chans` resolved from the data.
        images: the training images (supervised: labeled train; simclr: train, labeled or not).
        val: supervised: the labeled validation images; simclr: None.
        task: class names and positive class of the prepared manifest.
        manifest_sha256: hash of the manifest as given (provenance in the backbone's meta.json).
        sites: the sites trained on.
        prepared: the prepared manifest (splits) written by rank 0.
    """

    cfg: RunConfig
    images: ImageCache | ShardSet  # ShardSet: streamed (data.stream)
    val: ImageCache | None
    task: Task
    manifest_sha256: str
    sites: list[str]
    prepared: Path


def manifest_data(stage: str, manifest: str | Path, cfg: RunConfig, output: Path,
                  sites: list[str] | None = None) -> PretrainData:
    """The pretrain commands' data source: a manifest CSV, prepared once by rank 0 and decoded by every rank.

    Rank 0 reads and checks the manifest, prepares it (`stages.prepare_records`, `stages.resolve_channels`)
    and writes `output/prepared/<stage>-<key>/` (manifest.csv with splits, prepared.json); the key hashes
    the manifest bytes and the settings, so a rerun with the same inputs reuses it. Every rank then reads
    that folder and decodes the images its stage needs (`stages.load_prepared`, `stages.part`).

    Args:
        stage: "supervised" or "simclr".
        manifest: the manifest CSV.
        cfg: the run config (data, model, seed).
        output: the pretraining output folder.
        sites: only these sites (default: all of the manifest's).

    Example:
        >>> data = manifest_data("simclr", "all.csv", RunConfig(), Path("runs/central"))
        >>> len(data.images), data.cfg.model.in_chans
    """
    from remedis import stages
    from remedis.data.manifest import read_manifest
    from remedis.distributed import primary_first

    path = Path(manifest)
    if not path.is_file():
        raise ConfigError(f"{path}: manifest file not found")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    key = _key(stage, sha, cfg.data, cfg.model.in_chans, cfg.seed, sorted(sites or []))
    folder = output / "prepared" / f"{stage}-{key[:12]}"
    with primary_first(folder / ".done") as mine:
        if mine:
            _prepare(stage, path, cfg, sites, folder)
    info = json.loads((folder / "prepared.json").read_text())
    cfg = replace(cfg, data=replace(cfg.data, channels=info["channels"]), model=replace(cfg.model, in_chans=info["in_chans"]))
    prepared = stages.PreparedData(read_manifest(folder / "manifest.csv", check_files=False),
                                   Task(info["class_names"], info["positive_index"]), info["validation"])
    if stage == "supervised":
        needed = [r for r in prepared.records if r.label and r.split in ("train", "val")]
    else:
        needed = [r for r in prepared.records if r.split == "train"]
    pre = stages.preprocessing_for(cfg)
    if cfg.data.stream:  # the training corpus streams from shards (written once by rank 0); val stays in memory
        from remedis.pipeline import shard_stage

        root = Path(cfg.data.shard_dir).expanduser() if cfg.data.shard_dir else output / "shards"
        group = cfg.pretrain.simclr.micle_group_size if stage == "simclr" and cfg.pretrain.simclr.micle else 1
        images = shard_stage(cfg, stage, [r for r in needed if r.split == "train"], pre, root, group)
        val = load_images([r for r in needed if r.split == "val"], pre) if stage == "supervised" else None
    else:
        cache = stages.load_prepared(replace(prepared, manifest=prepared.manifest.with_records(needed)), pre)
        log.info("[pretrain %s] %d images decoded (%d skipped)", stage, len(cache), len(cache.failures))
        if stage == "supervised":
            images, val = stages.part(cache, split="train"), stages.part(cache, split="val")
        else:
            images, val = stages.part(cache, split="train", labeled=None), None
    if not len(images):
        raise ConfigError(f"{path}: no readable {'labeled ' if stage == 'supervised' else ''}train images "
                          f"in site(s) {', '.join(info['sites'])}")
    return PretrainData(cfg, images, val, prepared.task, sha, info["sites"], folder / "manifest.csv")


def multitask_data(cfg: RunConfig, output: Path) -> tuple[RunConfig, list, list[ImageCache], list[ImageCache]]:
    """The tasks of `pretrain.supervised.tasks`, each prepared and decoded as `manifest_data` does for one
    manifest (its label map, sites, patient-level splits), in memory (the labeled corpora of an upstream
    are small next to SimCLR's; subsets are index views).

    Returns (config with the channels resolved, `UpstreamTask`s, train images per task, val images per task).
    Every task decodes with the network's input channels (`model.in_chans`, 3 when any task is colour): a
    grey task keeps one channel, repeated at normalisation.
    """
    from remedis.pretrain.multitask import UpstreamTask

    specs = cfg.pretrain.supervised.tasks
    prepared = []
    for spec in specs:
        task_cfg = replace(cfg, data=replace(cfg.data, manifest=spec.manifest, label_map=dict(spec.label_map),
                                             positive_label=spec.positive_label, stream=False))
        prepared.append(manifest_data("supervised", spec.manifest, task_cfg, output, list(spec.sites) or None))
    in_chans = max(int(d.cfg.model.in_chans) for d in prepared)
    if any(int(d.cfg.model.in_chans) != in_chans for d in prepared):  # colour and grey tasks: decode grey ones for 3 channels
        prepared = [d if int(d.cfg.model.in_chans) == in_chans else
                    manifest_data("supervised", spec.manifest, replace(d.cfg, model=replace(d.cfg.model, in_chans=in_chans)),
                                  output, list(spec.sites) or None) for spec, d in zip(specs, prepared)]
    tasks, train, val = [], [], []
    for spec, d in zip(specs, prepared):
        if spec.multi_label:
            names = sorted({lab for r in d.images.records for lab in r.labels})
            positive = names.index(spec.positive_label) if spec.positive_label in names else len(names) - 1
        else:
            names, positive = list(d.task.class_names), d.task.positive_index
        if not len(d.val):
            raise ConfigError(f"pretrain.supervised.tasks {spec.name}: no labeled validation images in {spec.manifest}")
        tasks.append(UpstreamTask(spec.name, names, positive, spec.multi_label, spec.weight,
                                  {"manifest": Path(spec.manifest).name, "manifest_sha256": d.manifest_sha256, "sites": d.sites}))
        train.append(d.images)
        val.append(d.val)
        log.info("[pretrain supervised] task %s: %d train / %d val images of %s, classes %s, weight %g", spec.name,
                 len(d.images), len(d.val), ", ".join(d.sites), names, spec.weight)
    resolved = replace(cfg, data=replace(cfg.data, channels=max(int(d.cfg.data.channels) for d in prepared)),
                       model=replace(cfg.model, in_chans=in_chans))
    return resolved, tasks, train, val


def _prepare(stage: str, path: Path, cfg: RunConfig, sites: list[str] | None, folder: Path) -> None:
    """Rank 0: read and check the manifest, prepare it and write `folder` (manifest.csv, prepared.json)."""
    from remedis import stages
    from remedis.data.manifest import read_manifest, write_manifest

    log.info("[pretrain data] preparing %s", path.name)
    manifest = read_manifest(path)
    # SimCLR ignores labels: an unlabeled corpus (fewer than two classes) still gets its splits
    unlabeled = stage == "simclr" and len({r.label for r in manifest.records if r.label}) < 2
    prepared = stages.prepare_records(manifest, cfg.data, cfg.seed, sites=sites,
                                      class_names=["(none)", "(none)"] if unlabeled else None)
    resolved = stages.resolve_channels(cfg, prepared.records)
    write_manifest(prepared.manifest, folder / "manifest.csv")
    info = {"manifest_sha256": manifest.sha256, "sites": prepared.manifest.sites(),
            "class_names": [] if unlabeled else prepared.task.class_names,
            "positive_index": 0 if unlabeled else prepared.task.positive_index,
            "validation": prepared.validation, "channels": resolved.data.channels, "in_chans": resolved.model.in_chans}
    (folder / "prepared.json").write_text(json.dumps(info, indent=2) + "\n")


def _key(*parts) -> str:
    from remedis.pipeline import stage_key

    return stage_key(*parts)


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


def summary(stage: str, folder: Path, data: PretrainData, seconds: float, reused: bool) -> str:
    """The one line printed when a pretraining command ends."""
    from remedis.models.checkpoint import read_meta
    from remedis.progress import format_duration

    meta = read_meta(folder)
    last = (meta.get("stage_history") or [{}])[-1]
    epochs = last.get("epochs") or []
    what = f"{meta['architecture']}, {last.get('images', len(data.images))} images of {', '.join(data.sites)}"
    if stage == "supervised":
        aurocs = [e["val_auroc"] for e in epochs if e.get("val_auroc") is not None]
        what += f", {_epochs(epochs)}, best val AUROC {max(aurocs):.3f}" if aurocs else f", {_epochs(epochs)}"
    elif epochs and "nt_xent" in epochs[0]:
        what += f", {_epochs(epochs)}, NT-Xent {epochs[0]['nt_xent']:.3f} -> {epochs[-1]['nt_xent']:.3f}"
    when = "finished earlier, reused" if reused else format_duration(seconds)
    return f"{stage} backbone: {folder} ({what}; {when})"


def _epochs(epochs: list) -> str:
    return f"{len(epochs)} epoch{'' if len(epochs) == 1 else 's'}"


def cmd_pretrain(args) -> int:
    from remedis import stages
    from remedis.distributed import PrimaryWaitError, is_primary
    from remedis.models.checkpoint import read_meta
    from remedis.pipeline import reusable
    from remedis.pretrain.jobs import train_simclr, train_supervised
    from remedis.training import setup_runtime

    stage = args.stage
    cfg = RunConfig.from_yaml(args.config, args.set)  # no --config: the defaults, with any --set applied
    init = resolve_init(args.init) if getattr(args, "init", None) else None
    if init is not None:  # SimCLR continues the supervised backbone: its architecture and input channels
        meta = read_meta(init)
        cfg.model = replace(cfg.model, backbone=meta["architecture"], in_chans=int(meta["in_chans"]))
    setup_runtime(cfg.runtime, cfg.seed)
    output = stages.check_output_folder(args.output)
    start = time.time()
    if stage == "supervised" and cfg.pretrain.supervised.tasks:
        return _pretrain_multitask(cfg, output, args, start)
    if not args.manifest:
        raise ConfigError(f"pretrain {stage}: give a manifest (or, for supervised, pretrain.supervised.tasks in --config)")
    try:
        data = manifest_data(stage, args.manifest, cfg, output, parse_sites(args.site))
    except PrimaryWaitError as exc:
        raise ValueError(str(exc)) from None  # one line, like any bad input
    folder = output / "backbones" / BACKBONE_FOLDER[stage]
    section = cfg.pretrain.supervised if stage == "supervised" else cfg.pretrain.simclr
    key = _key(stage, [data.manifest_sha256, data.cfg.data, data.cfg.model, cfg.seed, data.sites], section,
               read_meta(init)["weights_sha256"] if init is not None else None)
    reused = reusable(folder, key)
    if not reused:
        log.info("[pretrain %s] %d images of %s -> %s", stage, getattr(data.images, "images", len(data.images)),
                 ", ".join(data.sites), folder)
        if stage == "supervised":
            train_supervised(data.cfg, data.images, data.val, data.task.class_names, data.task.positive_index, folder,
                             data.manifest_sha256, not args.quiet, stage_key=key)
        else:
            train_simclr(data.cfg, data.images, init, folder, data.manifest_sha256, not args.quiet, stage_key=key)
    if is_primary():  # the other ranks trained with it; only rank 0 reports
        print(summary(stage, folder, data, time.time() - start, reused))
    return 0


def _pretrain_multitask(cfg: RunConfig, output: Path, args, start: float) -> int:
    """`remedis pretrain supervised --config` with `pretrain.supervised.tasks`: the multi-task upstream."""
    from remedis.distributed import PrimaryWaitError, is_primary
    from remedis.models.checkpoint import read_meta
    from remedis.pipeline import reusable
    from remedis.pretrain.jobs import train_multitask
    from remedis.progress import format_duration

    if args.manifest or args.site:
        raise ConfigError("pretrain supervised: the tasks in --config name their manifests and sites; "
                          "give no MANIFEST or --site with pretrain.supervised.tasks")
    try:
        resolved, tasks, train, val = multitask_data(cfg, output)
    except PrimaryWaitError as exc:
        raise ValueError(str(exc)) from None
    folder = output / "backbones" / BACKBONE_FOLDER["supervised"]
    key = _key("supervised-multitask", [(t.name, t.info["manifest_sha256"], t.info["sites"]) for t in tasks],
               resolved.data, resolved.model, cfg.seed, cfg.pretrain.supervised)
    reused = reusable(folder, key)
    if not reused:
        log.info("[pretrain supervised] %d tasks, %d images -> %s", len(tasks), sum(len(c) for c in train), folder)
        train_multitask(resolved, tasks, train, val, folder, not args.quiet, stage_key=key)
    if is_primary():
        epochs = (read_meta(folder).get("stage_history") or [{}])[-1].get("epochs") or []
        best = max((e for e in epochs if e["val_auroc"] == e["val_auroc"]), key=lambda e: e["val_auroc"], default=None)
        scores = ", ".join(f"{name} {v['val_auroc']:.3f}" for name, v in best["tasks"].items()) if best else "no validation"
        when = "finished earlier, reused" if reused else format_duration(time.time() - start)
        print(f"supervised backbone: {folder} ({resolved.model.backbone}, {len(tasks)} tasks, "
              f"{sum(len(c) for c in train)} images, {_epochs(epochs)}, best val AUROC {scores}; {when})")
    return 0


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain a backbone (supervised upstream, then SimCLR), e.g. on a cluster")
    kinds = p.add_subparsers(dest="stage", required=True)
    for stage, text in (("supervised", "supervised upstream on the labeled train/val images of the site(s)"),
                        ("simclr", "SimCLR (MICLe) on the train images, labeled or not, of all sites")):
        s = kinds.add_parser(stage, help=text)
        s.add_argument("manifest", nargs="?" if stage == "supervised" else None,
                       help="manifest CSV" + (" (none with pretrain.supervised.tasks in --config)" if stage == "supervised" else ""))
        s.add_argument("--output", "-o", required=True,
                       help=f"output folder; the backbone goes to OUTPUT/backbones/{BACKBONE_FOLDER[stage]}")
        if stage == "simclr":
            s.add_argument("--init", default=None,
                           help="start from this backbone: a folder, or the output folder of `pretrain supervised`")
        s.add_argument("--site", action="append", default=[], metavar="SITE",
                       help="only these sites (repeatable or comma-separated; default: all)")
        s.add_argument("--config", default=None, help="YAML config (data, model, pretrain, runtime sections)")
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set runtime.devices=8 (repeatable)")
        s.add_argument("--quiet", action="store_true", help="no progress bars (log lines every 30 s remain)")
        s.set_defaults(func=cmd_pretrain)
