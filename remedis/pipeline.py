"""`remedis run CONFIG`: one command carries data through every stage.

data (manifest or synthetic) -> supervised upstream on the source site -> SimCLR on unlabeled images
of all sites -> fine-tuning on the target site at each label budget, for the REMEDIS backbone and
the baselines -> per-site evaluation report -> export to the BentoML store and `bentoml build`.

Run folder layout (all artifacts of DESIGN.md):
    config.yaml                 the resolved config of this run
    data/manifest.csv           the synthetic dataset (when no manifest was given)
    manifest.csv                the manifest used, with the patient-level splits
    backbones/supervised/       backbone checkpoint after supervised upstream pretraining
    backbones/remedis/          ... after SimCLR from the supervised weights
    adapted/<backbone>@<budget>/  adapted model folders
    report.json, report.html    the evaluation report
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from remedis.config import ConfigError, RunConfig
from remedis.data.dataset import ImageCache, load_images
from remedis.data.manifest import Manifest, read_manifest, write_manifest
from remedis.data.splits import budget_subset
from remedis.data.synthetic import DEFAULT_SITES, SyntheticSpec, generate_synthetic
from remedis.distributed import is_primary, primary_first
from remedis.evaluate.evaluation import load_backbone_before, load_far_ood
from remedis.models.checkpoint import CheckpointError, file_sha256, read_meta
from remedis.pretrain.jobs import train_simclr, train_supervised
from remedis.pretrain.monitor import KNNMonitor
from remedis.progress import reporter
from remedis.stages import (
    ModelToEvaluate,
    PreparedData,
    adapt_budget,
    budget_fraction,
    budget_images,
    check_output_folder,
    distill_budget,
    eval_inputs,
    evaluate_models,
    load_prepared,
    part,
    prepare_records,
    preprocessing_for,
    resolve_channels,
    site_table,
    write_site_report,
)
from remedis.training import setup_runtime

log = logging.getLogger("remedis")
MONITOR_BANK = 2048  # source train images kept in memory for the kNN monitor when pretraining streams


@dataclass
class RunResult:
    output: Path
    report_json: Path
    report_html: Path
    adapted: dict[str, Path] = field(default_factory=dict)
    model_tag: str | None = None
    bento_tag: str | None = None
    seconds: float = 0.0


def model_name(backbone: str, fraction: float) -> str:
    return f"{backbone}@{fraction:g}"


def read_or_generate_manifest(cfg: RunConfig, output: Path, write: bool = True) -> Manifest:
    """The configured manifest, or the embedded synthetic dataset written under `output/data`
    (`write` False: read the one the primary process generated)."""
    if cfg.data.manifest:
        return read_manifest(cfg.data.manifest)
    if not write:
        return read_manifest(output / "data" / "manifest.csv")
    syn = cfg.data.synthetic
    known = [s.name for s in DEFAULT_SITES]
    for name in syn.site_patients:
        if name not in known:
            raise ConfigError(f"data.synthetic.site_patients: unknown site {name!r} (synthetic sites: {', '.join(known)})")
    sites = tuple(replace(s, patients=syn.site_patients.get(s.name)) for s in DEFAULT_SITES)
    spec = SyntheticSpec(sites=sites, patients_per_site=syn.patients_per_site,
                         max_images_per_patient=syn.max_images_per_patient, image_size=syn.image_size)
    return read_manifest(generate_synthetic(output / "data", spec, seed=cfg.seed))


def prepare_data(cfg: RunConfig, output: Path, write: bool = True) -> PreparedData:
    """Read the configured manifest (or generate the synthetic one), check the source and target sites
    and prepare it (`remedis.stages.prepare_records`); the result is written to `output/manifest.csv`."""
    manifest = read_or_generate_manifest(cfg, output, write)
    sites = manifest.sites()
    for key in ("source_site", "target_site"):
        site = getattr(cfg.data, key)
        if site not in sites:
            raise ConfigError(f"data.{key}: site {site!r} is not in the manifest (sites: {', '.join(sites)})")
    unknown = sorted(set(cfg.data.label_map) - {r.label for r in manifest.records})
    if unknown:  # the run's config describes this manifest: every key must name something in it
        raise ConfigError(f"data.label_map: label(s) {unknown} do not occur in the manifest ({manifest.labels()})")
    unknown = sorted(set(cfg.data.site_split_fractions) - set(sites))
    if unknown:
        raise ConfigError(f"data.site_split_fractions: site(s) {unknown} are not in the manifest (sites: {', '.join(sites)})")
    prepared = prepare_records(manifest, cfg.data, cfg.seed)
    if write:
        write_manifest(prepared.manifest, output / "manifest.csv")
    return prepared


def stage_key(*parts) -> str:
    """Hash of everything that determines a stage's output: a finished stage whose folder carries the
    same key is reused, so a killed run resumes at the first unfinished stage."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def reusable(folder: Path, key: str) -> bool:
    try:
        meta = read_meta(folder)
    except CheckpointError:
        return False
    found = meta.get("stage_key") or meta.get("provenance", {}).get("stage_key")
    if found == key and (folder / "model.safetensors").is_file():
        log.info("reusing finished stage %s", folder)
        return True
    return False


def run_pipeline(cfg: RunConfig, output: str | Path, progress: bool = True, build: bool | None = None) -> RunResult:
    if cfg.pretrain.supervised.tasks:
        raise ConfigError("pretrain.supervised.tasks: the multi-task upstream runs with `remedis pretrain supervised "
                          "--config` (docs/cluster.md); `remedis run` trains the upstream on data.source_site")
    start = time.time()
    output = check_output_folder(output)
    setup_runtime(cfg.runtime, cfg.seed)
    if is_primary():
        (output / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    # Only training is distributed: the primary process prepares the data, the other ranks (started by
    # torchrun or Lightning's launcher) wait for it, join the pretraining stages and stop after them.
    log.info("[1/5 data] preparing manifest")
    prep_key = stage_key("data", cfg.data, cfg.seed, file_sha256(cfg.data.manifest) if cfg.data.manifest else None)
    with primary_first(output / f".data-{prep_key[:16]}.done") as mine:
        if mine:
            prepared = prepare_data(cfg, output)
    if not mine:
        prepared = prepare_data(cfg, output, write=False)
    manifest, task = prepared.manifest, prepared.task
    cfg = resolve_channels(cfg, manifest.records)
    pre = preprocessing_for(cfg)
    src, tgt = cfg.data.source_site, cfg.data.target_site
    upstream = [r for r in prepared.records if r.site == src and r.split == "train" and r.label]
    corpus = [r for r in prepared.records if r.split == "train"]
    if cfg.data.stream:
        # Pretraining streams its corpora from shards; memory holds only what adaptation and evaluation
        # use (the target site, every val/test split) and a sample of source train images for the kNN monitor.
        bank = {r.image for r in budget_subset(upstream, min(len(upstream), MONITOR_BANK), seed=cfg.seed)} if upstream else set()
        in_memory = [r for r in prepared.records if r.split != "train" or r.site == tgt or r.image in bank]
        cache = load_images(in_memory, pre)
    else:
        cache = load_prepared(prepared, pre)
    log.info("[1/5 data] %d images decoded (%d skipped), sites %s, classes %s",
             len(cache), len(cache.failures), manifest.sites(), task.class_names)

    backbones_dir = output / "backbones"
    data_key = [manifest.sha256, replace(cfg.data, shard_dir=None), cfg.model, cfg.seed]
    supervised = backbones_dir / "supervised"
    remedis_ckpt = backbones_dir / "remedis"
    key = stage_key("supervised", data_key, cfg.pretrain.supervised)
    sup_key = stage_key("simclr", data_key, cfg.pretrain.simclr)
    if not (reusable(supervised, key) and reusable(remedis_ckpt, stage_key(sup_key, read_meta(supervised)["weights_sha256"]))):
        if cfg.data.stream:
            shard_root = Path(cfg.data.shard_dir).expanduser() if cfg.data.shard_dir else output / "shards"
            upstream_data = shard_stage(cfg, "supervised", upstream, pre, shard_root, 1)
            corpus_data = shard_stage(cfg, "simclr", corpus, pre, shard_root,
                                      cfg.pretrain.simclr.micle_group_size if cfg.pretrain.simclr.micle else 1)
        else:
            upstream_data, corpus_data = part(cache, src, "train"), part(cache, split="train", labeled=None)
        if not reusable(supervised, key):
            log.info("[2/5 pretrain] supervised upstream on %s", src)
            train_supervised(cfg, upstream_data, part(cache, src, "val"), task.class_names, task.positive_index,
                             supervised, manifest.sha256, progress, stage_key=key)
        key = stage_key(sup_key, read_meta(supervised)["weights_sha256"])
        if not reusable(remedis_ckpt, key):
            log.info("[2/5 pretrain] SimCLR on unlabeled train images of all sites")
            monitor = KNNMonitor(part(cache, src, "train"), part(cache, src, "val"), task.class_names, task.positive_index)
            train_simclr(cfg, corpus_data, supervised, remedis_ckpt, manifest.sha256, progress, stage_key=key, monitor=monitor)
    if not is_primary():
        return RunResult(output, output / "report.json", output / "report.html")
    # adaptation, evaluation, report and export: the primary process alone
    cfg = replace(cfg, runtime=replace(cfg.runtime, devices=1, num_nodes=1))
    inits = {"remedis": remedis_ckpt, "supervised": supervised, "random": None}

    target_train, target_val = part(cache, tgt, "train"), part(cache, tgt, "val")
    test = part(cache, split="test")
    result = RunResult(output, output / "report.json", output / "report.html")
    to_evaluate: list[ModelToEvaluate] = []
    for backbone in cfg.adapt.backbones:
        init = inits[backbone]
        before = load_backbone_before(init, cfg.model.backbone, cfg.model.in_chans)
        for fraction in cfg.adapt.fractions:
            name = model_name(backbone, fraction)
            train = budget_images(target_train, fraction, cfg.seed)
            folder = output / "adapted" / name
            key = stage_key("adapt", data_key, cfg.adapt, cfg.evaluate.ood_method, cfg.evaluate.ood_accept_rate, fraction,
                            read_meta(init)["weights_sha256"] if init else None)
            if not reusable(folder, key):
                log.info("[3/5 adapt] %s: %d labeled %s images", name, len(train), tgt)
                adapt_budget(cfg, init, train, target_val, task, folder, progress=progress,
                             provenance={"manifest_sha256": manifest.sha256, "target_site": tgt, "budget": fraction,
                                         "validation": prepared.validation.get(tgt), "stage_key": key},
                             ablation_test=part(test, tgt))
            result.adapted[name] = folder
            to_evaluate.append(ModelToEvaluate(folder, name, backbone, budget_fraction(fraction, len(target_train)),
                                               len(train), train=train, backbone_before=before))

    if cfg.adapt.distill_student:
        to_evaluate += distill_stage(cfg, result, to_evaluate, part(cache, tgt, "train", labeled=None), target_val,
                                     data_key, progress)

    roles = {s: "source" if s == src else "target" if s == tgt else "ood" for s in manifest.sites()}
    ev = cfg.evaluate
    far_ood = load_far_ood(ev.far_ood_manifests, pre, seed=cfg.seed)
    inputs = eval_inputs(cfg, test, tgt, roles, target_val, far_ood)
    log.info("[4/5 evaluate] %d models on %d test images", len(to_evaluate), len(test))
    entries = evaluate_models(to_evaluate, inputs, n_boot=ev.bootstrap, seed=cfg.seed)
    for e in entries:
        log.info("[4/5 evaluate] %s: %s test AUROC %s", e["name"], tgt, _fmt(e["sites"][tgt]["auroc"]))
    provenance = {"manifest_sha256": manifest.sha256, "seed": cfg.seed, "backbone": cfg.model.backbone,
                  "image_size": cfg.data.image_size, "class_names": task.class_names, "positive_class": task.positive_class,
                  "skipped_images": len(cache.failures), "far_ood": {k: len(v) for k, v in far_ood.items()},
                  "validation": prepared.validation, "config": cfg.to_dict()}
    write_site_report(entries, site_table(test, roles), task, tgt, provenance, output)
    log.info("[4/5 evaluate] report: %s", result.report_html)

    if cfg.serve.build if build is None else build:
        from remedis.export import build_bento, export_model

        chosen = result.adapted[model_name(*_parse_serve_model(cfg.serve.model))]
        result.model_tag = export_model(chosen, cfg.serve.name, result.report_json, chosen.name)
        result.bento_tag = build_bento(result.model_tag)
        log.info("[5/5 serve] model %s, bento %s", result.model_tag, result.bento_tag)
    result.seconds = time.time() - start
    return result


def shard_stage(cfg: RunConfig, kind: str, records: list, pre, root: Path, group_size: int):
    """The shards of one pretraining corpus, written once by the primary process (the other ranks wait,
    then open them) in `root/<kind>-<key>`, keyed by the records, preprocessing and grouping: a second
    run on the same data, or a shared `data.shard_dir`, reuses them."""
    from remedis.data.shards import open_shards, write_shards

    key = stage_key(kind, sorted(str(r.image) for r in records), pre.to_dict(), group_size, cfg.seed)[:16]
    folder = root / f"{kind}-{key}"
    workers = max(1, cfg.runtime.num_workers or os.cpu_count() or 1)
    with primary_first(root / f".{kind}-{key}.done") as mine:
        if mine:
            log.info("[1/5 data] %s shards: %d images -> %s", kind, len(records), folder)
            shards = write_shards(records, pre, folder, group_size=group_size, seed=cfg.seed, num_workers=workers,
                                  progress=reporter(f"{kind} shards", "group"))
            if shards.failures:
                log.warning("%s shards: skipped %d unreadable image(s)", kind, len(shards.failures))
    return open_shards(folder)


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def distill_stage(cfg: RunConfig, result: RunResult, adapted: list[ModelToEvaluate], site_images: ImageCache,
                  val: ImageCache, data_key, progress: bool) -> list[ModelToEvaluate]:
    """Distil every REMEDIS-adapted model into `adapt.distill_student` on all target-site train images;
    each student folder is complete (calibration, OOD detector, input contract) like its teacher's."""
    ac, out = cfg.adapt, []
    for m in [m for m in adapted if m.backbone == "remedis"]:
        teacher_folder = result.adapted[m.name]
        name = f"{m.name}-student-{ac.distill_student}"
        folder = result.output / "adapted" / name
        key = stage_key("distill", data_key, ac.distill_student, ac.distill_epochs, ac.distill_temperature,
                        cfg.evaluate.ood_method, read_meta(teacher_folder)["weights_sha256"])
        if not reusable(folder, key):
            log.info("[3/5 adapt] distilling %s into %s on %d %s images", m.name, ac.distill_student,
                     len(site_images), cfg.data.target_site)
            distill_budget(cfg, teacher_folder, ac.distill_student, site_images, val, m.train, folder, progress,
                           provenance={"stage_key": key, "teacher": m.name})
        result.adapted[name] = folder
        out.append(ModelToEvaluate(folder, name, "remedis-student", m.fraction, m.train_images, train=m.train,
                                   extra={"distilled": True}))
    return out


def _parse_serve_model(spec: str) -> tuple[str, float]:
    backbone, _, fraction = spec.partition("@")
    return backbone, float(fraction)
