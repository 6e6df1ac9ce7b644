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
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import yaml

from remedis.adapt.finetune import fine_tune
from remedis.adapt.model import AdaptedModel
from remedis.config import ConfigError, RunConfig
from remedis.data.dataset import ImageCache, load_images
from remedis.data.manifest import Manifest, read_manifest, write_manifest
from remedis.data.preprocess import Preprocessing
from remedis.data.splits import assign_splits, budget_subset
from remedis.data.synthetic import DEFAULT_SITES, SyntheticSpec, generate_synthetic
from remedis.evaluate.evaluation import recipe_ablation
from remedis.evaluate.metrics import site_metrics
from remedis.evaluate.report import build_report, write_report
from remedis.models.checkpoint import CheckpointError, read_meta
from remedis.pretrain.jobs import train_simclr, train_supervised
from remedis.pretrain.monitor import KNNMonitor
from remedis.training import setup_runtime

log = logging.getLogger("remedis")


@dataclass
class RunResult:
    output: Path
    report_json: Path
    report_html: Path
    adapted: dict[str, Path] = field(default_factory=dict)
    model_tag: str | None = None
    bento_tag: str | None = None
    seconds: float = 0.0


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


def model_name(backbone: str, fraction: float) -> str:
    return f"{backbone}@{fraction:g}"


def prepare_data(cfg: RunConfig, output: Path) -> Manifest:
    """Read the configured manifest (or generate the synthetic one) and give it patient-level splits."""
    if cfg.data.manifest:
        manifest = read_manifest(cfg.data.manifest)
    else:
        syn = cfg.data.synthetic
        known = [s.name for s in DEFAULT_SITES]
        for name in syn.site_patients:
            if name not in known:
                raise ConfigError(f"data.synthetic.site_patients: unknown site {name!r} (synthetic sites: {', '.join(known)})")
        sites = tuple(replace(s, patients=syn.site_patients.get(s.name)) for s in DEFAULT_SITES)
        spec = SyntheticSpec(sites=sites, patients_per_site=syn.patients_per_site,
                             max_images_per_patient=syn.max_images_per_patient, image_size=syn.image_size)
        path = generate_synthetic(output / "data", spec, seed=cfg.seed)
        manifest = read_manifest(path)
    sites = manifest.sites()
    for key in ("source_site", "target_site"):
        site = getattr(cfg.data, key)
        if site not in sites:
            raise ConfigError(f"data.{key}: site {site!r} is not in the manifest (sites: {', '.join(sites)})")
    records = manifest.records
    if cfg.data.label_map:
        unknown = sorted(set(cfg.data.label_map) - {r.label for r in records})
        if unknown:
            raise ConfigError(f"data.label_map: label(s) {unknown} do not occur in the manifest ({manifest.labels()})")
        records = [replace(r, label=cfg.data.label_map.get(r.label, r.label)) for r in records]
    unknown = sorted(set(cfg.data.site_split_fractions) - set(sites))
    if unknown:
        raise ConfigError(f"data.site_split_fractions: site(s) {unknown} are not in the manifest (sites: {', '.join(sites)})")
    records = split_by_site(records, cfg.data.split_fractions, cfg.data.site_split_fractions, cfg.seed)
    manifest = manifest.with_records(records)
    write_manifest(manifest, output / "manifest.csv")
    return manifest


def split_by_site(records, fractions, per_site: dict[str, list[float]], seed: int):
    """Patient-level splits with the default fractions, or a site's own where `per_site` names it.
    Each site's split draws from its own random stream, so an override never moves another site's patients."""
    groups = [[r for r in records if r.site not in per_site]] + [[r for r in records if r.site == s] for s in per_site]
    fracs = [fractions] + list(per_site.values())
    split = {}
    for group, fr in zip(groups, fracs):
        for old, new in zip(group, assign_splits(group, tuple(fr), seed=seed)):
            split[id(old)] = new
    return [split[id(r)] for r in records]


def evaluate_model(model: AdaptedModel, test: ImageCache, class_names: list[str], positive_index: int,
                   cfg: RunConfig, n_boot: int = 0) -> dict[str, dict]:
    """Per-site metrics: point estimates for the pipeline's progress log (its report's full evaluation,
    with CIs, calibration, OOD and CKA, runs once all models exist: `evaluate_folder`); with `n_boot`,
    patient-bootstrap CIs too (`remedis adapt`'s report)."""
    from remedis.evaluate.evaluation import infer

    index = {c: i for i, c in enumerate(class_names)}
    per_site = {}
    for site in sorted({r.site for r in test.records}):
        part = test.subset(lambda r, s=site: r.site == s and r.label in index)
        logits, _ = infer(model, part.pixels)
        probs = model.probs_from_logits(torch.as_tensor(logits)).numpy()
        targets = np.array([index[r.label] for r in part.records])
        per_site[site] = site_metrics(targets, probs, [r.patient_id for r in part.records], positive_index, n_boot=n_boot,
                                      seed=cfg.seed)
    return per_site


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
    start = time.time()
    output = check_output_folder(output)
    setup_runtime(cfg.runtime, cfg.seed)
    (output / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    log.info("[1/5 data] preparing manifest")
    manifest = prepare_data(cfg, output)
    class_names = manifest.labels()
    if len(class_names) < 2:
        raise ConfigError(f"the manifest has {len(class_names)} label(s); at least two are needed")
    positive = cfg.data.positive_label or class_names[-1]
    if positive not in class_names:
        raise ConfigError(f"data.positive_label: {positive!r} is not a label of the manifest ({class_names})")
    positive_index = class_names.index(positive)
    pre = Preprocessing(image_size=cfg.data.image_size, in_chans=cfg.model.in_chans)
    cache = load_images(manifest.records, pre)
    log.info("[1/5 data] %d images decoded (%d skipped), sites %s, classes %s",
             len(cache), len(cache.failures), manifest.sites(), class_names)
    src, tgt = cfg.data.source_site, cfg.data.target_site

    def part(site=None, split=None, labeled=None):
        return cache.subset(lambda r: (site is None or r.site == site) and (split is None or r.split == split)
                            and (labeled is None or (r.label != "") == labeled))

    backbones_dir = output / "backbones"
    data_key = [manifest.sha256, cfg.data, cfg.model, cfg.seed]
    supervised = backbones_dir / "supervised"
    key = stage_key("supervised", data_key, cfg.pretrain.supervised)
    if not reusable(supervised, key):
        log.info("[2/5 pretrain] supervised upstream on %s", src)
        train_supervised(cfg, part(src, "train", True), part(src, "val", True), class_names, positive_index,
                         supervised, manifest.sha256, progress, stage_key=key)
    remedis_ckpt = backbones_dir / "remedis"
    key = stage_key("simclr", data_key, cfg.pretrain.simclr, read_meta(supervised)["weights_sha256"])
    if not reusable(remedis_ckpt, key):
        log.info("[2/5 pretrain] SimCLR on unlabeled train images of all sites")
        monitor = KNNMonitor(part(src, "train", True), part(src, "val", True), class_names, positive_index)
        train_simclr(cfg, part(split="train"), supervised, remedis_ckpt, manifest.sha256, progress, stage_key=key,
                     monitor=monitor)
    inits = {"remedis": remedis_ckpt, "supervised": supervised, "random": None}

    target_train, target_val = part(tgt, "train", True), part(tgt, "val", True)
    test = part(split="test", labeled=True)
    result = RunResult(output, output / "report.json", output / "report.html")
    models = []
    for backbone in cfg.adapt.backbones:
        for fraction in cfg.adapt.fractions:
            name = model_name(backbone, fraction)
            chosen = {r.image for r in budget_subset(target_train.records, fraction, seed=cfg.seed)}
            train = target_train.subset(lambda r: r.image in chosen)
            init = inits[backbone]
            folder = output / "adapted" / name
            key = stage_key("adapt", data_key, cfg.adapt, fraction, read_meta(init)["weights_sha256"] if init else None)
            if reusable(folder, key):
                adapted = AdaptedModel.load(folder)
            else:
                log.info("[3/5 adapt] %s: %d labeled %s images", name, len(train), tgt)
                adapted, _, variants = fine_tune(cfg, init, train, target_val, class_names, positive_index, progress,
                                                 provenance={"manifest_sha256": manifest.sha256, "target_site": tgt,
                                                             "budget": fraction, "stage_key": key})
                # What the probe, the soup and WiSE-FT each add, on the target's test images (reported only).
                adapted.provenance["recipe_ablation"] = recipe_ablation(
                    adapted, variants, test.subset(lambda r: r.site == tgt), cfg.evaluate.bootstrap, cfg.seed)
                adapted.save(folder)
            result.adapted[name] = folder
            log.info("[4/5 evaluate] %s", name)
            models.append({"name": name, "backbone": backbone, "fraction": fraction, "train_images": len(train),
                           "temperature": adapted.temperature,
                           "sites": evaluate_model(adapted, test, class_names, positive_index, cfg)})

    if cfg.adapt.distill_student:
        models += distill_stage(cfg, result, models, part(tgt, "train"), target_val, test, class_names, positive_index,
                                data_key, progress)

    roles = {s: "source" if s == src else "target" if s == tgt else "ood" for s in manifest.sites()}
    sites = {s: {"role": roles[s], "test_images": sum(r.site == s for r in test.records),
                 "test_patients": len({r.patient_id for r in test.records if r.site == s})} for s in manifest.sites()}
    from remedis.evaluate.evaluation import EvalInputs, evaluate_folder, load_backbone_before, load_far_ood

    ev = cfg.evaluate
    far_ood = load_far_ood(ev.far_ood_manifests, pre, seed=cfg.seed)
    for m in models:  # full evaluation; also fits and stores each model's OOD detector
        log.info("[4/5 evaluate] %s: CIs, calibration, OOD detection, CKA", m["name"])
        chosen = {r.image for r in budget_subset(target_train.records, m["fraction"], seed=cfg.seed)}
        before = None if m.get("distilled") else inits[m["backbone"]]
        inputs = EvalInputs(test=test, target_site=tgt, roles=roles, train=target_train.subset(lambda r: r.image in chosen),
                            val=target_val, far_ood=far_ood, subgroups=list(ev.subgroups),
                            backbone_before=load_backbone_before(before, cfg.model.backbone, cfg.model.in_chans),
                            ood_method=ev.ood_method, ood_accept_rate=ev.ood_accept_rate,
                            operating_sensitivity=getattr(cfg.adapt, "operating_sensitivity", 0.9),
                            noise_images=ev.noise_images, cka_images=ev.cka_images)
        m.update(evaluate_folder(result.adapted[m["name"]], inputs, n_boot=ev.bootstrap, seed=cfg.seed))
    provenance = {"manifest_sha256": manifest.sha256, "seed": cfg.seed, "backbone": cfg.model.backbone,
                  "image_size": cfg.data.image_size, "class_names": class_names, "positive_class": positive,
                  "skipped_images": len(cache.failures), "far_ood": {k: len(v) for k, v in far_ood.items()},
                  "config": cfg.to_dict()}
    task = {"class_names": class_names, "positive_class": positive, "target_site": tgt}
    write_report(build_report(models, sites, provenance, title=f"remedis report: adaptation to {tgt}", task=task), output)
    log.info("[4/5 evaluate] report: %s", result.report_html)

    if cfg.serve.build if build is None else build:
        from remedis.export import build_bento, export_model

        chosen = result.adapted[model_name(*_parse_serve_model(cfg.serve.model))]
        result.model_tag = export_model(chosen, cfg.serve.name, result.report_json, chosen.name)
        result.bento_tag = build_bento(result.model_tag)
        log.info("[5/5 serve] model %s, bento %s", result.model_tag, result.bento_tag)
    result.seconds = time.time() - start
    return result


def distill_stage(cfg: RunConfig, result: RunResult, models: list[dict], site_images: ImageCache, val: ImageCache,
                  test: ImageCache, class_names: list[str], positive_index: int, data_key, progress: bool) -> list[dict]:
    """Distil every REMEDIS-adapted model into `adapt.distill_student` on all target-site train images."""
    from remedis.adapt.distill import distill

    ac, out = cfg.adapt, []
    for m in [m for m in models if m["backbone"] == "remedis"]:
        teacher_folder = result.adapted[m["name"]]
        name = f"{m['name']}-student-{ac.distill_student}"
        folder = result.output / "adapted" / name
        key = stage_key("distill", data_key, ac.distill_student, ac.distill_epochs, ac.distill_temperature,
                        read_meta(teacher_folder)["weights_sha256"])
        if reusable(folder, key):
            student = AdaptedModel.load(folder)
        else:
            log.info("[3/5 adapt] distilling %s into %s on %d %s images", m["name"], ac.distill_student,
                     len(site_images), cfg.data.target_site)
            student = distill(AdaptedModel.load(teacher_folder), site_images, val, ac.distill_student,
                              epochs=ac.distill_epochs, temperature=ac.distill_temperature, runtime=cfg.runtime,
                              seed=cfg.seed, sensitivity=ac.operating_sensitivity, progress=progress)
            student.provenance = {**student.provenance, "stage_key": key, "teacher": m["name"]}
            student.save(folder)
        result.adapted[name] = folder
        out.append({"name": name, "backbone": "remedis-student", "fraction": m["fraction"],
                    "train_images": m["train_images"], "temperature": student.temperature, "distilled": True,
                    "sites": evaluate_model(student, test, class_names, positive_index, cfg)})
    return out


def _parse_serve_model(spec: str) -> tuple[str, float]:
    backbone, _, fraction = spec.partition("@")
    return backbone, float(fraction)
