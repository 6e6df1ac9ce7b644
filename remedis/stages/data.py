"""The data stage as functions of plain typed objects: a manifest (or the synthetic one) -> prepared
records (label map, patient-level splits, the task) -> decoded images or pretraining shards.

Every command prepares data through these functions, so `remedis run`, `remedis pretrain`, `remedis adapt`
and `remedis evaluate` draw the same splits and decode the same pixels for the same manifest, config and seed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from remedis import resume
from remedis.config import ConfigError, DataConfig, RunConfig
from remedis.data.contract import detect_channels
from remedis.data.dataset import ImageCache, load_images
from remedis.data.manifest import Manifest, Record, read_manifest, write_manifest
from remedis.data.preprocess import Preprocessing
from remedis.data.splits import assign_splits, budget_subset, carve_validation
from remedis.distributed import primary_first
from remedis.files import atomic_write_text

log = logging.getLogger("remedis")


MIN_FREE_BYTES = 512 * 1024**2  # a run writes checkpoints, resume states and reports: refuse to start below this


def check_output_folder(output: str | Path, min_free_bytes: int = MIN_FREE_BYTES) -> Path:
    """Create the run folder and prove it is writable with room to spare, before any work starts:
    a job that would die at its first checkpoint should fail now, with the reason."""
    import os
    import shutil
    import tempfile

    output = Path(output)
    try:
        output.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output, prefix=".write-check-") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise ValueError(f"output folder {output}: cannot write there ({exc.strerror or exc})") from None
    free = shutil.disk_usage(output).free
    if free < min_free_bytes:
        raise ValueError(f"output folder {output}: only {free / 1024**2:.0f} MiB free on its disk "
                         f"(a run needs at least {min_free_bytes / 1024**2:.0f} MiB)")
    return output


@dataclass(frozen=True)
class Task:
    """What the models predict: class names (sorted) and the positive class of binary AUROC."""

    class_names: list[str]
    positive_index: int

    @property
    def positive_class(self) -> str:
        """The positive class of binary AUROC and of the operating point."""
        return self.class_names[self.positive_index]

    def to_dict(self, target_site: str | None = None) -> dict[str, Any]:
        """The task as the report records it."""
        return {"class_names": list(self.class_names),
                "positive_class": self.positive_class if len(self.class_names) == 2 else None,
                "target_site": target_site}


@dataclass
class PreparedData:
    """A manifest ready for the stages: label map applied, every row with a split."""

    manifest: Manifest
    task: Task
    validation: dict[str, str] = field(default_factory=dict)  # site -> how its validation split was made

    @property
    def records(self) -> list[Record]:
        """The prepared records (label map applied, every row with a split)."""
        return self.manifest.records


def prepare_records(  # long: half docstring; the split rules per site in one place
        manifest: Manifest, data: DataConfig, seed: int, sites: Sequence[str] | None = None,
        class_names: Sequence[str] | None = None) -> PreparedData:
    """Label map, splits and task of `manifest`, restricted to `sites` (default: all).

    Splits: a site whose rows carry splits keeps them (when it has train and test but no val, a
    validation split is carved from train by patient, `data.val_fraction` of them, stratified and
    seeded); rows without a split get one by patient (`data.split_fractions`, or the site's own in
    `data.site_split_fractions`), each site from its own random stream.

    Args:
        manifest: the manifest as read.
        data: the `data` section of the config (label_map, split fractions, val_fraction, positive_label).
        seed: the split seed.
        sites: keep only these sites (each must exist).
        class_names: the task's classes when they are fixed already (evaluating existing models);
            default: the sorted labels of the kept rows.

    Raises:
        ConfigError: an unknown site in `sites`, a label map none of whose labels occur, fewer than two
            classes, an unknown positive label.
    """
    known_sites = manifest.sites()
    for site in sites or []:
        if site not in known_sites:
            raise ConfigError(f"site {site!r} is not in {manifest.path or 'the manifest'} (sites: {', '.join(known_sites)})")
    records = manifest.records if not sites else [r for r in manifest.records if r.site in set(sites)]
    if data.label_map:
        # A config written for a multi-site run may map labels (or split sites) that this manifest lacks:
        # only a map none of whose labels occur is an error here (`remedis run` checks every key).
        # A manifest a run wrote carries the mapped labels already: a map none of whose labels occur, on a
        # manifest whose labels are all the map's own results, is applied already (mapping is idempotent).
        present = {r.label for r in manifest.records} - {""}
        mapped_already = present <= set(data.label_map.values()) | {data.positive_label}
        if not set(data.label_map) & present and not mapped_already:
            raise ConfigError(f"data.label_map: label(s) {sorted(data.label_map)} do not occur in the manifest "
                              f"({manifest.labels()})")
        records = [replace(r, label=data.label_map.get(r.label, r.label)) for r in records]

    notes: dict[str, str] = {}
    placed: list[Record | None] = [None] * len(records)
    for site in sorted({r.site for r in records}):
        index = [i for i, r in enumerate(records) if r.site == site]
        rows = [records[i] for i in index]
        fractions = tuple(data.site_split_fractions.get(site, data.split_fractions))
        splits = {r.split or None for r in rows}
        if None in splits:
            rows = assign_splits(rows, fractions, seed=seed)
            how = "assigned by patient" if splits == {None} else "manifest; rows without a split assigned by patient"
            notes[site] = f"{how} ({'/'.join(f'{f:g}' for f in fractions)} train/val/test, stratified by label, seed {seed})"
        elif "val" not in splits and {"train", "test"} <= splits:
            rows = carve_validation(rows, data.val_fraction, seed)
            notes[site] = (f"carved from train: {data.val_fraction:.0%} of the train patients (stratified by label, "
                           f"seed {seed}); the manifest has train and test splits but no val")
            log.info("%s: %s", site, notes[site])
        else:
            notes[site] = "manifest"
        for i, r in zip(index, rows):
            placed[i] = r
    records = [r for r in placed if r is not None]

    names = list(class_names) if class_names is not None else sorted({r.label for r in records if r.label})
    if len(names) < 2:
        where = f"site(s) {', '.join(sites)}" if sites else "the manifest"
        raise ConfigError(f"{where} has {len(names)} label(s) {names}; at least two classes are needed")
    positive = data.positive_label or names[-1]
    if positive not in names:
        raise ConfigError(f"data.positive_label: {positive!r} is not a label of the manifest ({names})")
    return PreparedData(manifest.with_records(records), Task(names, names.index(positive)), notes)


def resolve_channels(cfg: RunConfig, records: Sequence[Record], sample: int = 64) -> RunConfig:
    """`cfg` with `data.channels` and `model.in_chans` made concrete. `auto` reads the headers of up to
    `sample` records spread over the manifest: 3 when any of them is colour (RGB, YBR, a colour
    palette), else 1. `model.in_chans` None follows the channels."""
    channels = cfg.data.channels
    if channels == "auto":
        channels = detect_channels(records, sample)
        log.info("data.channels auto: %s", "colour (3)" if channels == 3 else "grey (1)")
    in_chans = cfg.model.in_chans or channels
    return replace(cfg, data=replace(cfg.data, channels=int(channels)), model=replace(cfg.model, in_chans=int(in_chans)))


def preprocessing_for(cfg: RunConfig) -> Preprocessing:
    """The run's `Preprocessing` (after `resolve_channels`)."""
    if cfg.data.channels == "auto" or cfg.model.in_chans is None:
        raise ValueError("preprocessing_for needs a config passed through resolve_channels")
    return Preprocessing(image_size=cfg.data.image_size, in_chans=cfg.model.in_chans, channels=int(cfg.data.channels),
                         aspect=cfg.data.aspect)


def load_prepared(prepared: PreparedData, preprocessing: Preprocessing, labeled_only: bool = False,
                  **load_options) -> ImageCache:
    """Decode the prepared records once (skipping and counting unreadable files)."""
    records = [r for r in prepared.records if r.label] if labeled_only else prepared.records
    return load_images(records, preprocessing, **load_options)


def part(cache: ImageCache, site: str | None = None, split: str | None = None, labeled: bool | None = True,
         labels: Sequence[str] | None = None) -> ImageCache:
    """The images of one site and split (labeled ones by default; `labels`: only these classes)."""
    keep = set(labels) if labels is not None else None
    return cache.subset(lambda r: (site is None or r.site == site) and (split is None or r.split == split)
                        and (labeled is None or (r.label != "") == labeled) and (keep is None or r.label in keep))


def budget_images(train: ImageCache, budget: float | int, seed: int) -> ImageCache:
    """The nested label budget of a site's train images: a fraction in (0, 1] or an image count."""
    chosen = {r.image for r in budget_subset(train.records, budget, seed=seed)}
    return train.subset(lambda r: r.image in chosen)


def budget_fraction(budget: float | int, n_train: int) -> float:
    """The share of the site's labeled train images a budget stands for (an image count divided by them)."""
    if isinstance(budget, float):
        return budget
    return min(1.0, budget / max(1, n_train))


def configured_manifest(data: DataConfig, seed: int, output: Path, write: bool = True) -> Manifest:
    """The configured manifest, or the embedded synthetic dataset written under `output/data` (`write`
    False: read the one the primary process generated).

    Raises:
        ConfigError: `data.synthetic.site_patients` names a site the generator does not make.
    """
    from remedis.data.synthetic import DEFAULT_SITES, SyntheticSpec, generate_synthetic

    if data.manifest:
        return read_manifest(data.manifest)
    if not write:
        return read_manifest(output / "data" / "manifest.csv")
    syn = data.synthetic
    known = [s.name for s in DEFAULT_SITES]
    for name in syn.site_patients:
        if name not in known:
            raise ConfigError(f"data.synthetic.site_patients: unknown site {name!r} (synthetic sites: {', '.join(known)})")
    sites = tuple(replace(s, patients=syn.site_patients.get(s.name)) for s in DEFAULT_SITES)
    spec = SyntheticSpec(sites=sites, patients_per_site=syn.patients_per_site,
                         max_images_per_patient=syn.max_images_per_patient, image_size=syn.image_size)
    return read_manifest(generate_synthetic(output / "data", spec, seed=seed))


def prepare_run_data(data: DataConfig, seed: int, output: Path, write: bool = True) -> PreparedData:
    """A whole run's data: read the configured manifest (or generate the synthetic one), check that every
    site and label the `data` section names is in it, and prepare it (`prepare_records`); the prepared
    manifest, with its splits, is written to `output/manifest.csv` (`write` False: read, not written).

    Raises:
        ConfigError: a source or target site, label-map label or split-fraction site the manifest lacks.
    """
    manifest = configured_manifest(data, seed, output, write)
    sites = manifest.sites()
    for key in ("source_site", "target_site"):
        site = getattr(data, key)
        if site not in sites:
            raise ConfigError(f"data.{key}: site {site!r} is not in the manifest (sites: {', '.join(sites)})")
    unknown = sorted(set(data.label_map) - {r.label for r in manifest.records})
    if unknown:  # the run's config describes this manifest: every key must name something in it
        raise ConfigError(f"data.label_map: label(s) {unknown} do not occur in the manifest ({manifest.labels()})")
    unknown = sorted(set(data.site_split_fractions) - set(sites))
    if unknown:
        raise ConfigError(f"data.site_split_fractions: site(s) {unknown} are not in the manifest (sites: {', '.join(sites)})")
    prepared = prepare_records(manifest, data, seed)
    if write:
        write_manifest(prepared.manifest, output / "manifest.csv")
    return prepared


def shard_corpus(kind: str, records: Sequence[Record], preprocessing: Preprocessing, root: Path, group_size: int, seed: int,
                 num_workers: int | None = None):
    """The shards of one pretraining corpus in `root/<kind>-<key>` (`resume.shard_key`: the records, the
    preprocessing, the MICLe grouping), written once by the primary process while the other ranks wait;
    a second run on the same data, or a shared `data.shard_dir`, reuses them.

    Returns:
        the opened `ShardSet`.
    """
    from remedis.data.shards import open_shards, write_shards
    from remedis.progress import reporter

    key = resume.shard_key(kind, [r.image for r in records], preprocessing.to_dict(), group_size, seed)
    folder = root / f"{kind}-{key}"
    workers = max(1, num_workers or os.cpu_count() or 1)
    with primary_first(root / f".{kind}-{key}.done") as mine:
        if mine:
            log.info("[1/5 data] %s shards: %d images -> %s", kind, len(records), folder)
            shards = write_shards(list(records), preprocessing, folder, group_size=group_size, seed=seed, num_workers=workers,
                                  progress=reporter(f"{kind} shards", "group"))
            if shards.failures:
                log.warning("%s shards: skipped %d unreadable image(s)", kind, len(shards.failures))
    return open_shards(folder)


def shard_root(data: DataConfig, output: Path) -> Path:
    """Where a run's shards go: `data.shard_dir`, else `output/shards`."""
    return Path(data.shard_dir).expanduser() if data.shard_dir else output / "shards"


@dataclass
class PretrainData:
    """What one pretraining stage trains on; the same on every rank.

    Args:
        cfg: the config with `data.channels` and `model.in_chans` resolved from the data.
        images: the training images (supervised: labeled train; simclr: train, labeled or not); a
            `ShardSet` when they stream (`data.stream`).
        val: supervised: the labeled validation images; simclr: None.
        task: class names and positive class of the prepared manifest.
        manifest_sha256: hash of the manifest as given (provenance in the backbone's meta.json).
        sites: the sites trained on.
        prepared: the prepared manifest (splits) written by rank 0.
    """

    cfg: RunConfig
    images: Any  # ImageCache | ShardSet
    val: ImageCache | None
    task: Task
    manifest_sha256: str
    sites: list[str]
    prepared: Path


def pretrain_data(stage: str, manifest: str | Path, cfg: RunConfig, output: Path,
                  sites: list[str] | None = None) -> PretrainData:
    """One pretraining stage's data from a manifest CSV, prepared once by rank 0 and decoded by every rank.

    Rank 0 reads and checks the manifest, prepares it (`prepare_records`, `resolve_channels`) and writes
    `output/prepared/<stage>-<key>/` (manifest.csv with splits, prepared.json; `resume.prepared_key`), so a
    rerun with the same inputs reuses it. Every rank then reads that folder and decodes the images its
    stage needs, or opens their shards (`data.stream`).

    Args:
        stage: "supervised" or "simclr".
        manifest: the manifest CSV.
        cfg: the run config (data, model, seed).
        output: the pretraining output folder.
        sites: only these sites (default: all of the manifest's).

    Example:
        >>> data = pretrain_data("simclr", "all.csv", RunConfig(), Path("runs/central"))
        >>> len(data.images), data.cfg.model.in_chans
    """
    from remedis.files import file_sha256

    path = Path(manifest)
    if not path.is_file():
        raise ConfigError(f"{path}: manifest file not found")
    sha = file_sha256(path)
    key = resume.prepared_key(stage, sha, cfg.data, cfg.model.in_chans, cfg.seed, sites or [])
    folder = output / "prepared" / f"{stage}-{key[:12]}"
    with primary_first(folder / ".done") as mine:
        if mine:
            _write_prepared(stage, path, cfg, sites, folder)
    info = json.loads((folder / "prepared.json").read_text())
    cfg = replace(cfg, data=replace(cfg.data, channels=info["channels"]), model=replace(cfg.model, in_chans=info["in_chans"]))
    prepared = PreparedData(read_manifest(folder / "manifest.csv", check_files=False),
                            Task(info["class_names"], info["positive_index"]), info["validation"])
    if stage == "supervised":
        needed = [r for r in prepared.records if r.label and r.split in ("train", "val")]
    else:
        needed = [r for r in prepared.records if r.split == "train"]
    pre = preprocessing_for(cfg)
    if cfg.data.stream:  # the training corpus streams from shards (written once by rank 0); val stays in memory
        group = cfg.pretrain.simclr.micle_group_size if stage == "simclr" and cfg.pretrain.simclr.micle else 1
        images = shard_corpus(stage, [r for r in needed if r.split == "train"], pre, shard_root(cfg.data, output), group,
                              cfg.seed, cfg.runtime.num_workers)
        val = load_images([r for r in needed if r.split == "val"], pre) if stage == "supervised" else None
    else:
        cache = load_prepared(replace(prepared, manifest=prepared.manifest.with_records(needed)), pre)
        log.info("[pretrain %s] %d images decoded (%d skipped)", stage, len(cache), len(cache.failures))
        if stage == "supervised":
            images, val = part(cache, split="train"), part(cache, split="val")
        else:
            images, val = part(cache, split="train", labeled=None), None
    if not len(images):
        raise ConfigError(f"{path}: no readable {'labeled ' if stage == 'supervised' else ''}train images "
                          f"in site(s) {', '.join(info['sites'])}")
    return PretrainData(cfg, images, val, prepared.task, sha, info["sites"], folder / "manifest.csv")


def _write_prepared(stage: str, path: Path, cfg: RunConfig, sites: list[str] | None, folder: Path) -> None:
    """Rank 0: read and check the manifest, prepare it and write `folder` (manifest.csv, prepared.json)."""
    log.info("[pretrain data] preparing %s", path.name)
    manifest = read_manifest(path)
    # SimCLR ignores labels: an unlabeled corpus (fewer than two classes) still gets its splits
    unlabeled = stage == "simclr" and len({r.label for r in manifest.records if r.label}) < 2
    prepared = prepare_records(manifest, cfg.data, cfg.seed, sites=sites,
                               class_names=["(none)", "(none)"] if unlabeled else None)
    resolved = resolve_channels(cfg, prepared.records)
    write_manifest(prepared.manifest, folder / "manifest.csv")
    info = {"manifest_sha256": manifest.sha256, "sites": prepared.manifest.sites(),
            "class_names": [] if unlabeled else prepared.task.class_names,
            "positive_index": 0 if unlabeled else prepared.task.positive_index,
            "validation": prepared.validation, "channels": resolved.data.channels, "in_chans": resolved.model.in_chans}
    atomic_write_text(folder / "prepared.json", json.dumps(info, indent=2) + "\n")


@dataclass
class MultitaskData:
    """The tasks of a multi-task upstream, prepared and decoded.

    Args:
        cfg: the config with the channels resolved (3 when any task is colour).
        tasks: the `UpstreamTask`s (class names, weights, provenance).
        train: per task, its labeled train images.
        val: per task, its labeled validation images.
    """

    cfg: RunConfig
    tasks: list
    train: list[ImageCache]
    val: list[ImageCache]

    def key_parts(self) -> list[tuple]:
        """Per task what its resume key hashes: name, manifest hash and sites."""
        return [(t.name, t.info["manifest_sha256"], t.info["sites"]) for t in self.tasks]


def multitask_data(cfg: RunConfig, output: Path) -> MultitaskData:
    """The tasks of `pretrain.supervised.tasks`, each prepared and decoded as `pretrain_data` does for one
    manifest (its label map, sites, patient-level splits), in memory (the labeled corpora of an upstream
    are small next to SimCLR's; subsets are index views).

    Every task decodes with the network's input channels (`model.in_chans`, 3 when any task is colour): a
    grey task keeps one channel, repeated at normalisation.
    """
    from remedis.pretrain.multitask import UpstreamTask

    specs = cfg.pretrain.supervised.tasks
    prepared = []
    for spec in specs:
        task_cfg = replace(cfg, data=replace(cfg.data, manifest=spec.manifest, label_map=dict(spec.label_map),
                                             positive_label=spec.positive_label, stream=False))
        prepared.append(pretrain_data("supervised", spec.manifest, task_cfg, output, list(spec.sites) or None))
    in_chans = max(int(d.cfg.model.in_chans) for d in prepared)
    if any(int(d.cfg.model.in_chans) != in_chans for d in prepared):  # colour and grey tasks: decode grey ones for 3 channels
        prepared = [d if int(d.cfg.model.in_chans) == in_chans else
                    pretrain_data("supervised", spec.manifest, replace(d.cfg, model=replace(d.cfg.model, in_chans=in_chans)),
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
    return MultitaskData(resolved, tasks, train, val)
