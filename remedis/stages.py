"""The stages as functions of plain typed objects: the one implementation behind `remedis run`,
`remedis adapt` and `remedis evaluate`, so the three give the same numbers for the same model,
manifest, splits and seed.

    prepare_records   manifest + data config -> PreparedData: label map (checked), validation split
                      (carved from train by patient when a manifest has train and test but no val),
                      patient-level splits, the task (class names, positive class)
    load_prepared     PreparedData -> ImageCache of its labeled images (one decode; splits are views)
    budget_images     a site's train images -> the nested label budget (fraction or image count)
    adapt_budget      backbone + budget + validation -> a complete adapted model folder: the fine-tuning
                      recipe, calibration, operating point, the OOD detector and the input contract
    evaluate_models   model folders + test images -> report entries (one full evaluation per model)
    write_site_report entries -> report.json + report.html
    export            `remedis.export` (model folder -> BentoML store + bento)

Stage folders (`remedis.data`, `.pretrain`, `.adapt`, `.evaluate`) never import this module or the
command line; this module imports them (the import-linter contracts in pyproject.toml check it).

Example:
    >>> prepared = prepare_records(read_manifest("site.csv"), cfg.data, seed=0, sites=["site-B"])
    >>> cache = load_prepared(prepared, Preprocessing(64))
    >>> train = budget_images(part(cache, "site-B", "train"), 0.1, seed=0)
    >>> model = adapt_budget(cfg, Path("backbones/remedis"), train, part(cache, "site-B", "val"),
    ...                      prepared.task, Path("out/adapted/remedis@0.1"))
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from remedis.adapt.finetune import fine_tune
from remedis.adapt.model import AdaptedModel
from remedis.adapt.ood import fit_model_detector
from remedis.config import ConfigError, DataConfig, RunConfig
from remedis.data.contract import InputContract, describe_file, detect_channels
from remedis.data.dataset import ImageCache, load_images
from remedis.data.manifest import Manifest, Record
from remedis.data.preprocess import Preprocessing
from remedis.data.readers import ImageReadError
from remedis.data.splits import assign_splits, budget_subset, carve_validation
from remedis.evaluate.evaluation import EvalInputs, evaluate_folder, recipe_ablation
from remedis.evaluate.report import build_report, write_report

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
        return self.class_names[self.positive_index]

    def to_dict(self, target_site: str | None = None) -> dict[str, Any]:
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
        return self.manifest.records


def prepare_records(manifest: Manifest, data: DataConfig, seed: int, sites: Sequence[str] | None = None,
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
        present = {r.label for r in manifest.records}
        if not set(data.label_map) & present:
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


def fit_input_contract(images: ImageCache) -> InputContract | None:
    """The input contract of a model trained on `images`: their headers (modality, photometric
    interpretation, channels, size; the manifest's `modality` column for files without one) and
    intensity statistics. Unreadable headers are skipped; None when nothing could be read."""
    sources, keep = [], []
    for i, r in enumerate(images.records):
        try:
            sources.append(describe_file(r.image, r.meta.get("modality") or None))
            keep.append(i)
        except (ImageReadError, OSError) as exc:
            log.warning("input contract: %s skipped (%s)", Path(r.image).name, exc)
    if not sources:
        return None
    return InputContract.fit(sources, images.pixels[keep])


def complete_model(model: AdaptedModel, train: ImageCache, val: ImageCache, cfg: RunConfig,
                   contract_images: ImageCache | None = None) -> AdaptedModel:
    """Give an adapted model what serving needs besides weights and calibration: the OOD detector (state
    on `train`, threshold accepting `evaluate.ood_accept_rate` of `val`) and the input contract (fitted
    on `contract_images`, default `train`)."""
    model.ood_detector = fit_model_detector(model, train, val, cfg.evaluate.ood_method, cfg.evaluate.ood_accept_rate)
    model.input_contract = fit_input_contract(contract_images if contract_images is not None else train)
    return model


def adapt_budget(cfg: RunConfig, backbone: Path | None, train: ImageCache, val: ImageCache, task: Task, folder: Path,
                 provenance: dict[str, Any] | None = None, progress: bool = True, ablation_test: ImageCache | None = None,
                 contract_images: ImageCache | None = None) -> AdaptedModel:
    """Adapt `backbone` (None: random initialisation) to one label budget and write a complete model folder.

    Args:
        cfg: the run config (`adapt` recipe, `evaluate.ood_*` detector settings, `runtime`).
        backbone: backbone checkpoint folder, or None for the random-initialisation baseline.
        train: the budget's labeled train images of the site.
        val: the site's labeled validation images (selection, temperature, operating point, OOD threshold).
        task: class names and positive class.
        folder: where the adapted model folder goes.
        provenance: recorded in the folder (manifest hash, site, budget, stage key, ...).
        progress: show progress bars.
        ablation_test: the site's test images: what each recipe step adds is measured there (reported only).
        contract_images: images the input contract is fitted on (default `train`).
    """
    model, _, variants = fine_tune(cfg, backbone, train, val, task.class_names, task.positive_index, progress,
                                   provenance=provenance)
    complete_model(model, train, val, cfg, contract_images)
    if ablation_test is not None and len(ablation_test):
        model.provenance["recipe_ablation"] = recipe_ablation(model, variants, ablation_test, cfg.evaluate.bootstrap, cfg.seed)
    model.save(folder)
    return model


def eval_inputs(cfg: RunConfig, test: ImageCache, target_site: str, roles: dict[str, str], val: ImageCache,
                far_ood: dict[str, ImageCache] | None = None) -> EvalInputs:
    """What every model's evaluation shares, from the config's `evaluate` and `adapt.operating_sensitivity`."""
    ev = cfg.evaluate
    return EvalInputs(test=test, target_site=target_site, roles=roles, val=val, far_ood=far_ood or {},
                      subgroups=list(ev.subgroups), ood_method=ev.ood_method, ood_accept_rate=ev.ood_accept_rate,
                      operating_sensitivity=cfg.adapt.operating_sensitivity, noise_images=ev.noise_images,
                      cka_images=ev.cka_images)


def distill_budget(cfg: RunConfig, teacher_folder: Path, arch: str, site_images: ImageCache, val: ImageCache,
                   train: ImageCache, folder: Path, progress: bool = True, provenance: dict[str, Any] | None = None
                   ) -> AdaptedModel:
    """Distil an adapted model into a small `arch` student on the site's train images (labeled or not), and
    write a complete folder: calibration on `val`, the OOD detector and input contract on the teacher's
    budget `train`, like the teacher's own."""
    from remedis.adapt.distill import distill

    ac = cfg.adapt
    student = distill(AdaptedModel.load(teacher_folder), site_images, val, arch, epochs=ac.distill_epochs,
                      temperature=ac.distill_temperature, runtime=cfg.runtime, seed=cfg.seed,
                      sensitivity=ac.operating_sensitivity, progress=progress)
    student.provenance = {**student.provenance, **(provenance or {})}
    complete_model(student, train, val, cfg)
    student.save(folder)
    return student


def site_table(test: ImageCache, roles: dict[str, str]) -> dict[str, dict]:
    """The report's site table: role, test images and test patients per site (counts, never identifiers)."""
    return {s: {"role": roles[s], "test_images": sum(r.site == s for r in test.records),
                "test_patients": len({r.patient_id for r in test.records if r.site == s})} for s in sorted(roles)}


@dataclass
class ModelToEvaluate:
    """One adapted model folder and how the report names it."""

    folder: Path
    name: str
    backbone: str
    fraction: float
    train_images: int
    train: ImageCache | None = None  # its budget of the target site (OOD methods' state)
    backbone_before: Any = None  # the backbone checkpoint it started from, loaded (CKA), or None
    extra: dict[str, Any] = field(default_factory=dict)


def evaluate_models(models: Sequence[ModelToEvaluate], inputs: EvalInputs, n_boot: int, seed: int,
                    refit_ood: bool = False) -> list[dict]:
    """One full evaluation per model (per-site metrics with CIs, calibration, OOD, CKA): report entries."""
    entries = []
    for m in models:
        log.info("[evaluate] %s: metrics with CIs, calibration, OOD detection, CKA", m.name)
        own = replace(inputs, train=m.train if m.train is not None else inputs.train, backbone_before=m.backbone_before)
        entry = evaluate_folder(m.folder, own, n_boot=n_boot, seed=seed, refit_ood=refit_ood)
        entries.append({"name": m.name, "folder": Path(m.folder).name, "backbone": m.backbone, "fraction": m.fraction,
                        "train_images": m.train_images, **m.extra, **entry})
    return entries


def write_site_report(entries: list[dict], sites: dict[str, dict], task: Task, target_site: str, provenance: dict,
                      output: Path, title: str | None = None) -> tuple[Path, Path]:
    report = build_report(entries, sites, provenance, title=title or f"remedis report: adaptation to {target_site}",
                          task=task.to_dict(target_site))
    return write_report(report, output)
