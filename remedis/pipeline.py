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
from remedis.evaluate.metrics import site_metrics
from remedis.evaluate.report import build_report, write_report
from remedis.pretrain.jobs import train_simclr, train_supervised
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
    records = assign_splits(manifest.records, tuple(cfg.data.split_fractions), seed=cfg.seed)
    manifest = manifest.with_records(records)
    write_manifest(manifest, output / "manifest.csv")
    return manifest


def evaluate_model(model: AdaptedModel, test: ImageCache, class_names: list[str], positive_index: int,
                   cfg: RunConfig) -> dict[str, dict]:
    index = {c: i for i, c in enumerate(class_names)}
    per_site = {}
    for site in sorted({r.site for r in test.records}):
        part = test.subset(lambda r, s=site: r.site == s and r.label in index)
        x = model.preprocessing.normalize(part.pixels.float())
        logits = torch.cat([model.logits(x[i:i + 256]) for i in range(0, len(x), 256)]) if len(x) else torch.empty(0, len(class_names))
        probs = model.probs_from_logits(logits).numpy()
        targets = np.array([index[r.label] for r in part.records])
        per_site[site] = site_metrics(targets, probs, [r.patient_id for r in part.records], positive_index,
                                      n_boot=cfg.evaluate.bootstrap, seed=cfg.seed)
    return per_site


def run_pipeline(cfg: RunConfig, output: str | Path, progress: bool = True, build: bool | None = None) -> RunResult:
    start = time.time()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
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
    log.info("[2/5 pretrain] supervised upstream on %s", src)
    supervised = train_supervised(cfg, part(src, "train", True), part(src, "val", True), class_names, positive_index,
                                  backbones_dir / "supervised", manifest.sha256, progress)
    log.info("[2/5 pretrain] SimCLR on unlabeled train images of all sites")
    remedis_ckpt = train_simclr(cfg, part(split="train"), supervised, backbones_dir / "remedis", manifest.sha256, progress)
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
            log.info("[3/5 adapt] %s: %d labeled %s images", name, len(train), tgt)
            adapted, _ = fine_tune(cfg, inits[backbone], train, target_val, class_names, positive_index, progress,
                                   provenance={"manifest_sha256": manifest.sha256, "target_site": tgt, "budget": fraction})
            folder = adapted.save(output / "adapted" / name)
            result.adapted[name] = folder
            log.info("[4/5 evaluate] %s", name)
            models.append({"name": name, "backbone": backbone, "fraction": fraction, "train_images": len(train),
                           "temperature": adapted.temperature,
                           "sites": evaluate_model(adapted, test, class_names, positive_index, cfg)})

    roles = {s: "source" if s == src else "target" if s == tgt else "ood" for s in manifest.sites()}
    sites = {s: {"role": roles[s], "test_images": sum(r.site == s for r in test.records),
                 "test_patients": len({r.patient_id for r in test.records if r.site == s})} for s in manifest.sites()}
    provenance = {"manifest_sha256": manifest.sha256, "seed": cfg.seed, "backbone": cfg.model.backbone,
                  "image_size": cfg.data.image_size, "class_names": class_names, "positive_class": positive,
                  "skipped_images": len(cache.failures), "config": cfg.to_dict()}
    write_report(build_report(models, sites, provenance, title=f"remedis report: adaptation to {tgt}"), output)
    log.info("[4/5 evaluate] report: %s", result.report_html)

    if cfg.serve.build if build is None else build:
        from remedis.export import build_bento, export_model

        chosen = result.adapted[model_name(*_parse_serve_model(cfg.serve.model))]
        result.model_tag = export_model(chosen, cfg.serve.name, result.report_json, chosen.name)
        result.bento_tag = build_bento(result.model_tag)
        log.info("[5/5 serve] model %s, bento %s", result.model_tag, result.bento_tag)
    result.seconds = time.time() - start
    return result


def _parse_serve_model(spec: str) -> tuple[str, float]:
    backbone, _, fraction = spec.partition("@")
    return backbone, float(fraction)
