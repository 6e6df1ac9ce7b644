"""The stage API: every stage as functions of plain typed objects, the one implementation behind
`remedis run`, `remedis pretrain`, `remedis adapt` and `remedis evaluate`, so they give the same numbers for the
same model, manifest, splits and seed. Resume keys come from `remedis.resume`.

data (`stages.data`)
    prepare_records    manifest + data config -> PreparedData: label map (checked), patient-level splits
                       (a validation split carved from train when a manifest has train and test but no val), task
    prepare_run_data   a run's manifest (or the synthetic one), checked against the config, prepared and written
    load_prepared      PreparedData -> ImageCache of its images (one decode; splits are index views)
    budget_images      a site's train images -> the nested label budget (fraction or image count)
    shard_corpus       a pretraining corpus -> litdata shards, written once, reused by key
    pretrain_data      a manifest -> what one pretraining stage trains on (in memory or shards)
    multitask_data     `pretrain.supervised.tasks` -> every task prepared and decoded
pretrain (`stages.pretrain`)
    pretrain_supervised, pretrain_multitask, pretrain_simclr
                       images -> a backbone folder (reused when finished with the same key)
    site_simclr        a backbone + one site's train images, labeled or not -> the site's own backbone
select (`stages.select`)
    select_images      a backbone + a site's unlabeled images -> the worklist of images to label next
adapt (`stages.adapt`)
    adapt_budgets      backbone + site + budgets -> complete adapted model folders (and distilled students)
    adapt_budget       one budget: the fine-tuning recipe, calibration, operating point, OOD detector, contract
    distill_budget     an adapted model -> a small student on the site's images, complete like its teacher
evaluate (`stages.evaluate`)
    evaluate_models    model folders + test images -> report entries (one full evaluation per model)
    write_site_report  entries -> report.json + report.html
export: `remedis.export` (model folder -> BentoML store + bento)

Stage folders (`remedis.data`, `.pretrain`, `.adapt`, `.evaluate`) never import this package or the
command line; this package imports them (the import-linter contracts in pyproject.toml check it).

Example:
    >>> prepared = prepare_records(read_manifest("site.csv"), cfg.data, seed=0, sites=["site-B"])
    >>> cache = load_prepared(prepared, Preprocessing(64))
    >>> site = SiteImages.of(cache, "site-B", prepared.validation.get("site-B"))
    >>> made = adapt_budgets(AdaptSettings.from_config(cfg), Path("backbones/remedis"), "remedis",
    ...                      [BudgetSpec("remedis@10%", "remedis@10pct", 0.1)], site, prepared.task, Path("out"),
    ...                      prepared.manifest.sha256, cache.preprocessing)
"""

from remedis.stages.adapt import (
    RANDOM,
    AdaptedSet,
    AdaptSettings,
    BudgetSpec,
    SiteImages,
    adapt_budget,
    adapt_budgets,
    adaptation_start,
    complete_model,
    distill_budget,
    fit_input_contract,
)
from remedis.stages.data import (
    MIN_FREE_BYTES,
    MultitaskData,
    PreparedData,
    PretrainData,
    Task,
    budget_fraction,
    budget_images,
    check_output_folder,
    configured_manifest,
    load_prepared,
    multitask_data,
    part,
    prepare_records,
    prepare_run_data,
    preprocessing_for,
    pretrain_data,
    resolve_channels,
    shard_corpus,
    shard_root,
)
from remedis.stages.evaluate import ModelToEvaluate, eval_inputs, evaluate_models, site_table, write_site_report
from remedis.stages.pretrain import pretrain_multitask, pretrain_simclr, pretrain_supervised, site_simclr
from remedis.stages.select import Worklist, select_images, site_pool

__all__ = [
    "MIN_FREE_BYTES", "RANDOM", "AdaptSettings", "AdaptedSet", "BudgetSpec", "ModelToEvaluate", "MultitaskData",
    "PreparedData", "PretrainData", "SiteImages", "Task", "adapt_budget", "adapt_budgets", "adaptation_start",
    "budget_fraction", "budget_images", "check_output_folder", "complete_model", "configured_manifest", "distill_budget",
    "eval_inputs", "evaluate_models", "fit_input_contract", "load_prepared", "multitask_data", "part", "prepare_records",
    "prepare_run_data", "preprocessing_for", "pretrain_data", "pretrain_multitask", "pretrain_simclr",
    "pretrain_supervised", "resolve_channels", "select_images", "shard_corpus", "shard_root", "site_pool", "site_simclr", "site_table",
    "Worklist", "write_site_report",
]
