"""`remedis run CONFIG`: one command carries data through every stage.

data (manifest or synthetic) -> supervised upstream on the source site -> SimCLR on unlabeled images
of all sites -> fine-tuning on the target site at each label budget, for the REMEDIS backbone and
the baselines -> per-site evaluation report -> export to the BentoML store and `bentoml build`.
Every step is a `remedis.stages` function, the same ones `remedis pretrain`, `remedis adapt` and
`remedis evaluate` call; every artifact carries a resume key (`remedis.resume`), so a killed run resumes
at its first unfinished stage.

Run folder layout (all artifacts of DESIGN.md):
    config.yaml                 the resolved config of this run
    data/manifest.csv           the synthetic dataset (when no manifest was given)
    manifest.csv                the manifest used, with the patient-level splits
    shards/                     the pretraining corpora as litdata shards (data.stream)
    backbones/supervised/       backbone checkpoint after supervised upstream pretraining
    backbones/remedis/          ... after SimCLR from the supervised weights
    adapted/<backbone>@<budget>/  adapted model folders
    report.json, report.html    the evaluation report
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from remedis import resume, stages
from remedis.config import ConfigError, RunConfig
from remedis.data.dataset import ImageCache, load_images
from remedis.data.splits import budget_subset
from remedis.distributed import is_primary, primary_first
from remedis.evaluate.evaluation import load_backbone_before, load_far_ood
from remedis.files import file_sha256
from remedis.training import setup_runtime

log = logging.getLogger("remedis")
MONITOR_BANK = 2048  # source train images kept in memory for the kNN monitor when pretraining streams

EXAMPLES = """examples:
  remedis run configs/quickstart.yaml --output runs/quickstart          # the demo, about 6 min on 2 CPU cores
  remedis run configs/breast_ultrasound.yaml -o runs/bus --set data.image_size=64 --seed 1

The config holds every setting (configs/*.yaml; README "Config reference"). The same file and seed give
the same metrics; rerunning into the same folder reuses every finished stage."""


@dataclass
class RunResult:
    """Where a run put its report, adapted models and bento, and how long it took."""

    output: Path
    report_json: Path
    report_html: Path
    adapted: dict[str, Path] = field(default_factory=dict)
    model_tag: str | None = None
    bento_tag: str | None = None
    seconds: float = 0.0


@dataclass
class RunData:
    """The run's prepared data: the prepared manifest, the config with channels resolved, the decoded images."""

    prepared: stages.PreparedData
    cfg: RunConfig
    cache: ImageCache

    @property
    def manifest(self):
        """The prepared manifest (splits written in)."""
        return self.prepared.manifest


def model_name(backbone: str, fraction: float) -> str:
    """How a run names an adapted model: `remedis@0.1`."""
    return f"{backbone}@{fraction:g}"


def run_pipeline(cfg: RunConfig, output: str | Path, progress: bool = True, build: bool | None = None) -> RunResult:
    """Every stage of `cfg` into the run folder `output` (module docstring); `build` overrides `serve.build`."""
    if cfg.pretrain.supervised.tasks:
        raise ConfigError("pretrain.supervised.tasks: the multi-task upstream runs with `remedis pretrain supervised "
                          "--config` (docs/cluster.md); `remedis run` trains the upstream on data.source_site")
    start = time.time()
    output = stages.check_output_folder(output)
    setup_runtime(cfg.runtime, cfg.seed)
    if is_primary():
        (output / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    data = prepare(cfg, output)
    backbones = pretrain(data, output, progress)
    result = RunResult(output, output / "report.json", output / "report.html")
    if not is_primary():
        return result  # a training-only rank: the primary process adapts, evaluates and exports
    cfg = replace(data.cfg, runtime=replace(data.cfg.runtime, devices=1, num_nodes=1))
    to_evaluate = adapt(cfg, data, backbones, result, progress)
    evaluate(cfg, data, to_evaluate, output)
    if cfg.serve.build if build is None else build:
        export(cfg, result)
    result.seconds = time.time() - start
    return result


def prepare(cfg: RunConfig, output: Path) -> RunData:
    """[1/5 data] The primary process prepares the manifest (other ranks, started by torchrun or Lightning's
    launcher, wait for it and read it), resolves the channels and decodes what stays in memory: everything,
    or (`data.stream`) the target site, every val/test split and a sample of source train images for the
    kNN monitor, while the pretraining corpora stream from shards."""
    log.info("[1/5 data] preparing manifest")
    sha = file_sha256(cfg.data.manifest) if cfg.data.manifest else None
    marker = resume.prepared_key("run", sha, cfg.data, None, cfg.seed, [])
    with primary_first(output / f".data-{marker[:16]}.done") as mine:
        if mine:
            prepared = stages.prepare_run_data(cfg.data, cfg.seed, output)
    if not mine:
        prepared = stages.prepare_run_data(cfg.data, cfg.seed, output, write=False)
    cfg = stages.resolve_channels(cfg, prepared.records)
    pre = stages.preprocessing_for(cfg)
    if cfg.data.stream:
        upstream = _upstream_records(cfg, prepared)
        bank = {r.image for r in budget_subset(upstream, min(len(upstream), MONITOR_BANK), seed=cfg.seed)} if upstream else set()
        tgt = cfg.data.target_site
        cache = load_images([r for r in prepared.records if r.split != "train" or r.site == tgt or r.image in bank], pre)
    else:
        cache = stages.load_prepared(prepared, pre)
    log.info("[1/5 data] %d images decoded (%d skipped), sites %s, classes %s",
             len(cache), len(cache.failures), prepared.manifest.sites(), prepared.task.class_names)
    return RunData(prepared, cfg, cache)


def _upstream_records(cfg: RunConfig, prepared: stages.PreparedData) -> list:
    """The source site's labeled train records (the supervised upstream's corpus)."""
    return [r for r in prepared.records if r.site == cfg.data.source_site and r.split == "train" and r.label]


def pretrain(data: RunData, output: Path, progress: bool) -> dict[str, Path | None]:
    """[2/5 pretrain] The supervised upstream on the source site, then SimCLR (MICLe) on the train images of
    every site, labeled or not; each reused when finished with the same key. Returns the adaptation starts:
    {"remedis": folder, "supervised": folder, "random": None}."""
    cfg, manifest, cache, task = data.cfg, data.manifest, data.cache, data.prepared.task
    src = cfg.data.source_site
    supervised, remedis = output / "backbones" / "supervised", output / "backbones" / "remedis"
    sup_key = resume.backbone_key("supervised", resume.corpus_key(manifest.sha256, cfg.data, cfg.model, cfg.seed, [src]),
                                  cfg.pretrain.supervised, None)
    all_sites = resume.corpus_key(manifest.sha256, cfg.data, cfg.model, cfg.seed, manifest.sites())

    def simclr_key() -> str:
        return resume.backbone_key("simclr", all_sites, cfg.pretrain.simclr, resume.weights_of(supervised))

    if resume.reusable(supervised, sup_key) and resume.reusable(remedis, simclr_key()):
        return {"remedis": remedis, "supervised": supervised, "random": None}
    upstream, corpus = _pretraining_corpora(data, output)
    log.info("[2/5 pretrain] supervised upstream on %s", src)
    stages.pretrain_supervised(cfg, upstream, stages.part(cache, src, "val"), task, supervised, sup_key, manifest.sha256,
                               progress)
    log.info("[2/5 pretrain] SimCLR on unlabeled train images of all sites")
    from remedis.pretrain.monitor import KNNMonitor

    monitor = KNNMonitor(stages.part(cache, src, "train"), stages.part(cache, src, "val"), task.class_names,
                         task.positive_index)
    stages.pretrain_simclr(cfg, corpus, supervised, remedis, simclr_key(), manifest.sha256, progress, monitor=monitor)
    return {"remedis": remedis, "supervised": supervised, "random": None}


def _pretraining_corpora(data: RunData, output: Path) -> tuple:
    """The upstream's labeled source train images and SimCLR's train images of all sites: shards
    (`data.stream`) or in-memory views."""
    cfg, prepared, cache = data.cfg, data.prepared, data.cache
    if not cfg.data.stream:
        return stages.part(cache, cfg.data.source_site, "train"), stages.part(cache, split="train", labeled=None)
    pre, root = stages.preprocessing_for(cfg), stages.shard_root(cfg.data, output)
    micle = cfg.pretrain.simclr.micle_group_size if cfg.pretrain.simclr.micle else 1
    upstream = stages.shard_corpus("supervised", _upstream_records(cfg, prepared), pre, root, 1, cfg.seed,
                                   cfg.runtime.num_workers)
    corpus = stages.shard_corpus("simclr", [r for r in prepared.records if r.split == "train"], pre, root, micle, cfg.seed,
                                 cfg.runtime.num_workers)
    return upstream, corpus


def adapt(cfg: RunConfig, data: RunData, starts: dict[str, Path | None], result: RunResult,
          progress: bool) -> list[stages.ModelToEvaluate]:
    """[3/5 adapt] Every backbone of `adapt.backbones` at every budget of `adapt.fractions` on the target
    site, then a student of each REMEDIS model (`adapt.distill_student`, or `adapt.unlabeled: distill`); with
    `adapt.unlabeled: simclr` the REMEDIS backbone first continues SimCLR on the target's train images
    (models named `remedis+site@...`). Returns them in report order."""
    tgt = cfg.data.target_site
    site = stages.SiteImages.of(data.cache, tgt, data.prepared.validation.get(tgt))
    settings = stages.AdaptSettings.from_config(cfg)
    pre = stages.preprocessing_for(cfg)
    use = cfg.adapt.unlabeled
    models, students = [], []
    for backbone in cfg.adapt.backbones:
        init, name = starts[backbone], backbone
        if backbone == "remedis" and "simclr" in use:  # the REMEDIS backbone continues on the site's own images
            init, _ = stages.site_simclr(cfg, init, site.pool, site.train, site.val, data.prepared.task,
                                         result.output / "backbones" / "remedis+site", data.manifest.sha256, tgt, progress)
            name = "remedis+site"
        distill = (cfg.adapt.distill_student or (cfg.model.backbone if "distill" in use else None)) if backbone == "remedis" else None
        budgets = [stages.BudgetSpec(model_name(name, f), model_name(name, f), f) for f in cfg.adapt.fractions]
        made = stages.adapt_budgets(settings, init, name, budgets, site, data.prepared.task, result.output,
                                    data.manifest.sha256, pre, progress, distill=distill,
                                    backbone_before=load_backbone_before(init, cfg.model.backbone, cfg.model.in_chans),
                                    selection_backbone=starts.get("remedis"))
        models += made.models
        students += made.students
    for m in models + students:
        result.adapted[m.name] = m.folder
    return models + students


def evaluate(cfg: RunConfig, data: RunData, to_evaluate: list[stages.ModelToEvaluate], output: Path) -> None:
    """[4/5 evaluate] Every model on every site's test split (the target in distribution, the others as
    OOD), far-OOD manifests and noise; writes report.json and report.html."""
    manifest, task, cache = data.manifest, data.prepared.task, data.cache
    src, tgt = cfg.data.source_site, cfg.data.target_site
    test = stages.part(cache, split="test")
    roles = {s: "source" if s == src else "target" if s == tgt else "ood" for s in manifest.sites()}
    ev = cfg.evaluate
    far_ood = load_far_ood(ev.far_ood_manifests, stages.preprocessing_for(cfg), seed=cfg.seed)
    inputs = stages.eval_inputs(ev, cfg.adapt.operating_sensitivity, test, tgt, roles, stages.part(cache, tgt, "val"), far_ood)
    log.info("[4/5 evaluate] %d models on %d test images", len(to_evaluate), len(test))
    entries = stages.evaluate_models(to_evaluate, inputs, n_boot=ev.bootstrap, seed=cfg.seed)
    for e in entries:
        auc = e["sites"][tgt]["auroc"]
        log.info("[4/5 evaluate] %s: %s test AUROC %s", e["name"], tgt, "n/a" if auc is None else f"{auc:.3f}")
    provenance = {"manifest_sha256": manifest.sha256, "seed": cfg.seed, "backbone": cfg.model.backbone,
                  "image_size": cfg.data.image_size, "class_names": task.class_names, "positive_class": task.positive_class,
                  "skipped_images": len(cache.failures), "far_ood": {k: len(v) for k, v in far_ood.items()},
                  "validation": data.prepared.validation, "config": cfg.to_dict()}
    _, html = stages.write_site_report(entries, stages.site_table(test, roles), task, tgt, provenance, output)
    log.info("[4/5 evaluate] report: %s", html)


def export(cfg: RunConfig, result: RunResult) -> None:
    """[5/5 serve] The model `serve.model` names into the BentoML store, with the report's summary, and its bento."""
    from remedis.export import build_bento, export_model

    backbone, _, fraction = cfg.serve.model.partition("@")
    if backbone == "remedis" and "simclr" in cfg.adapt.unlabeled:
        backbone = "remedis+site"
    chosen = result.adapted[model_name(backbone, float(fraction))]
    result.model_tag = export_model(chosen, cfg.serve.name, result.report_json, chosen.name)
    result.bento_tag = build_bento(result.model_tag)
    log.info("[5/5 serve] model %s, bento %s", result.model_tag, result.bento_tag)


def summary_table(report_json: Path) -> str:
    """The test AUROC per model and site, as `remedis run` prints it."""
    report = json.loads(Path(report_json).read_text())
    sites = list(report["sites"])
    width = max(len(m["name"]) for m in report["models"]) + 2
    header = "".join(f"{s} ({report['sites'][s]['role']})".rjust(22) for s in sites)
    lines = ["test AUROC per site:", "model".ljust(width) + "labels  " + header]
    for m in report["models"]:
        cells = []
        for s in sites:
            a = m["sites"][s]["auroc"]
            cells.append(("n/a" if a is None else f"{a:.3f}").rjust(22))
        lines.append(m["name"].ljust(width) + str(m["train_images"]).rjust(6) + "  " + "".join(cells))
    return "\n".join(lines)


def cmd_run(args) -> int:
    """`remedis run`: every stage, then the summary table and where the report and bento are."""
    cfg = RunConfig.from_yaml(args.config, args.set)
    if args.seed is not None:
        cfg.seed = args.seed
    result = run_pipeline(cfg, args.output, progress=not args.quiet, build=False if args.no_build else None)
    if not is_primary():
        return 0  # a training-only rank: the primary process evaluates and reports
    print(summary_table(result.report_json))
    print(f"report:  {result.report_html}")
    print(f"         {result.report_json}")
    if result.bento_tag:
        print(f"model:   {result.model_tag} (BentoML store)")
        print(f"bento:   {result.bento_tag}   serve it: bentoml serve {result.bento_tag}")
    print(f"wall time: {result.seconds:.0f} s")
    return 0


def register(sub) -> None:
    """Add `remedis run` to the command line."""
    from remedis.commands import command_parser

    r = command_parser(sub, "run", "run every stage from a config file",
                       "Run every stage from one config: data (a manifest, or the built-in synthetic 3-site dataset), "
                       "supervised upstream, SimCLR + MICLe, adaptation of every backbone at every budget, the evaluation "
                       "report, export to BentoML and the bento.", EXAMPLES)
    r.add_argument("config", help="YAML config (configs/quickstart.yaml is the demo)")
    r.add_argument("--output", "-o", required=True, help="run folder (created; a rerun reuses its finished stages)")
    r.add_argument("--seed", type=int, default=None, help="override the config's seed (splits, budgets, training)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data.image_size=128 (repeatable)")
    r.add_argument("--no-build", action="store_true", help="skip export to BentoML and `bentoml build`")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=cmd_run)
