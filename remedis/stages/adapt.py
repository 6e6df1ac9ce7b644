"""The adaptation stage: a backbone and a site's labeled images at label budgets -> complete adapted
model folders (the fine-tuning recipe, calibration, operating point, OOD detector, input contract), and
optionally a small student distilled from each.

`adapt_budgets` is the one loop `remedis run` and `remedis adapt` share: per budget the nested subset of the
site's train images, the resume key (`resume.adapt_key`), the model folder (reused when finished with the
same inputs), and the `ModelToEvaluate` the evaluation stage takes. Stage functions take the config sections
they read (`AdaptSettings`), not the whole run config.

Example:
    >>> settings = AdaptSettings.from_config(cfg)
    >>> site = SiteImages.of(cache, "site-B")
    >>> budgets = [BudgetSpec("remedis@10%", "remedis@10pct", 0.1)]
    >>> adapted = adapt_budgets(settings, Path("backbones/remedis"), "remedis", budgets, site, task, Path("out"),
    ...                         manifest.sha256, preprocessing_for(cfg))
    >>> adapted.models[0].folder
    PosixPath('out/adapted/remedis@10pct')
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remedis import resume
from remedis.adapt.finetune import fine_tune
from remedis.adapt.model import AdaptedModel
from remedis.adapt.ood import fit_model_detector
from remedis.config import AdaptConfig, DataConfig, RunConfig, RuntimeConfig
from remedis.data.contract import InputContract, describe_file
from remedis.data.dataset import ImageCache
from remedis.data.preprocess import Preprocessing
from remedis.data.readers import ImageReadError
from remedis.evaluate.evaluation import recipe_ablation
from remedis.stages.data import Task, budget_fraction, part
from remedis.stages.evaluate import ModelToEvaluate
from remedis.stages.select import BudgetChooser

log = logging.getLogger("remedis")

RANDOM = "random"  # the backbone name of the random-initialisation baseline


@dataclass(frozen=True)
class AdaptSettings:
    """The config sections adaptation reads.

    Args:
        recipe: the `adapt` section (sweep, soup, WiSE-FT, operating sensitivity, distillation).
        runtime: the `runtime` section (devices, precision, workers).
        architecture: the network (`model.backbone`; a pretrained backbone's own architecture).
        seed: the seed of budgets, training and the ablation's bootstrap.
        ood_method: the OOD score of the detector (`evaluate.ood_method`, a registered score, `remedis.ood_scores.score_names()`).
        ood_accept_rate: share of validation images the detector accepts (`evaluate.ood_accept_rate`).
        bootstrap: bootstrap resamples of the recipe ablation's CIs (`evaluate.bootstrap`).
        data: the `data` section, hashed into resume keys only.
    """

    recipe: AdaptConfig
    runtime: RuntimeConfig
    architecture: str
    seed: int
    ood_method: str = "mahalanobis"
    ood_accept_rate: float = 0.95
    bootstrap: int = 200
    data: DataConfig = field(default_factory=DataConfig)

    @classmethod
    def from_config(cls, cfg: RunConfig) -> AdaptSettings:
        """The sections of a run config."""
        ev = cfg.evaluate
        return cls(cfg.adapt, cfg.runtime, cfg.model.backbone, cfg.seed, ev.ood_method, ev.ood_accept_rate, ev.bootstrap,
                   cfg.data)


@dataclass
class SiteImages:
    """A site's decoded images, as adaptation uses them.

    Args:
        site: the site's name.
        train: its labeled train images (budgets are drawn from them).
        val: its labeled validation images (selection, calibration, OOD threshold).
        test: its labeled test images (the recipe ablation; reported only).
        pool: its train images, labeled or not (what a distilled student learns from).
        validation: how its validation split was made (provenance).
    """

    site: str
    train: ImageCache
    val: ImageCache
    test: ImageCache
    pool: ImageCache
    validation: str | None = None

    @classmethod
    def of(cls, cache: ImageCache, site: str, validation: str | None = None) -> SiteImages:
        """The site's splits of a decoded manifest."""
        return cls(site, part(cache, site, "train"), part(cache, site, "val"), part(cache, site, "test"),
                   part(cache, site, "train", labeled=None), validation)


@dataclass(frozen=True)
class BudgetSpec:
    """One label budget: the model's name in reports, its folder under `adapted/`, the budget (a fraction
    in (0, 1] or an image count)."""

    name: str
    folder: str
    budget: float | int


@dataclass
class AdaptedSet:
    """What `adapt_budgets` made: the adapted models, then their distilled students (if any)."""

    models: list[ModelToEvaluate] = field(default_factory=list)
    students: list[ModelToEvaluate] = field(default_factory=list)


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


def complete_model(model: AdaptedModel, train: ImageCache, val: ImageCache, ood_method: str, ood_accept_rate: float,
                   contract_images: ImageCache | None = None) -> AdaptedModel:
    """Give an adapted model what serving needs besides weights and calibration: the OOD detector (state
    on `train`, threshold accepting `ood_accept_rate` of `val`) and the input contract (fitted on
    `contract_images`, default `train`)."""
    model.ood_detector = fit_model_detector(model, train, val, ood_method, ood_accept_rate)
    model.input_contract = fit_input_contract(contract_images if contract_images is not None else train)
    return model


def adapt_budget(settings: AdaptSettings, backbone: Path | None, train: ImageCache, val: ImageCache, task: Task,
                 folder: Path, provenance: dict[str, Any] | None = None, progress: bool = True,
                 ablation_test: ImageCache | None = None, contract_images: ImageCache | None = None) -> AdaptedModel:
    """Adapt `backbone` (None: random initialisation) to one label budget and write a complete model folder.

    Args:
        settings: the recipe, runtime, architecture, seed and OOD settings.
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
    model, _, variants = fine_tune(settings.recipe, settings.runtime, settings.architecture, settings.seed, backbone,
                                   train, val, task.class_names, task.positive_index, progress, provenance=provenance)
    complete_model(model, train, val, settings.ood_method, settings.ood_accept_rate, contract_images)
    if ablation_test is not None and len(ablation_test):
        model.provenance["recipe_ablation"] = recipe_ablation(model, variants, ablation_test, settings.bootstrap, settings.seed)
    model.save(folder)
    return model


def distill_budget(settings: AdaptSettings, teacher_folder: Path, arch: str, site_images: ImageCache, val: ImageCache,
                   train: ImageCache, folder: Path, progress: bool = True, provenance: dict[str, Any] | None = None,
                   init: Path | None = None) -> AdaptedModel:
    """Distil an adapted model into an `arch` student on the site's train images (labeled or not), and
    write a complete folder: calibration on `val`, the OOD detector and input contract on the teacher's
    budget `train`, like the teacher's own. The student sees the labels of `train` only, and starts from
    the backbone `init` (None: random weights)."""
    from remedis.adapt.distill import distill

    ac = settings.recipe
    student = distill(AdaptedModel.load(teacher_folder), site_images, val, arch, epochs=ac.distill_epochs,
                      temperature=ac.distill_temperature, runtime=settings.runtime, seed=settings.seed,
                      sensitivity=ac.operating_sensitivity, progress=progress, init=init,
                      labeled_images=[r.image for r in train.records])
    student.provenance = {**student.provenance, **(provenance or {})}
    complete_model(student, train, val, settings.ood_method, settings.ood_accept_rate)
    student.save(folder)
    return student


def adaptation_start(backbone: Path | None, architecture: str, in_chans: int | None) -> Any:
    """What adaptation starts from, for its resume key: the backbone's weights hash, or (random init) the network."""
    return (RANDOM, architecture, in_chans) if backbone is None else resume.weights_of(backbone)


def adapt_budgets(settings: AdaptSettings, backbone: Path | None, backbone_name: str, budgets: Sequence[BudgetSpec],
                  site: SiteImages, task: Task, output: Path, manifest_sha256: str, preprocessing: Preprocessing,
                  progress: bool = True, distill: str | None = None, backbone_before: Any = None,
                  notes: dict[str, Any] | None = None, selection_backbone: Path | None = None) -> AdaptedSet:
    """Adapt one backbone to a site at every budget; a budget that finished with the same inputs is reused.

    Args:
        settings: the config sections adaptation reads.
        backbone: the backbone folder, or None for random initialisation.
        backbone_name: how reports name it ("remedis", "supervised", "random", the folder's name).
        budgets: the label budgets, with the names and folders of their models.
        site: the site's images.
        task: class names and positive class.
        output: the run folder; models go to `output/adapted/<budget folder>`.
        manifest_sha256: the manifest's hash (resume key, provenance).
        preprocessing: how the images were decoded (resume key).
        progress: show progress bars.
        distill: also distil each adapted model into this small architecture on the site's pool (None: no).
        backbone_before: the loaded backbone the models started from (CKA in the evaluation), or None.
        notes: more provenance for every model (e.g. which unlabeled images were used).
        selection_backbone: whose embeddings `adapt.selection` chooses the budgets' images on (default
            `backbone`; `remedis run` passes the REMEDIS backbone so every backbone gets the same images).

    Returns:
        the models, then their students, as the evaluation stage takes them.
    """
    start = adaptation_start(backbone, settings.architecture, preprocessing.in_chans)
    chooser = BudgetChooser(settings.recipe.selection, selection_backbone or backbone, site.train, settings.seed)
    if chooser.key() is not None:
        start = (start, chooser.key())
    made = AdaptedSet()
    for spec in budgets:
        train = site.train if isinstance(spec.budget, float) and spec.budget == 1.0 else chooser.images(spec.budget)
        folder = output / "adapted" / spec.folder
        key = resume.adapt_key(manifest_sha256, site.site, settings.data, settings.recipe, settings.ood_method,
                               settings.ood_accept_rate, settings.seed, spec.budget, start, preprocessing.to_dict())
        if not resume.reusable(folder, key):
            log.info("[adapt] %s: %d labeled images of %s", spec.name, len(train), site.site)
            adapt_budget(settings, backbone, train, site.val, task, folder, progress=progress,
                         provenance={"manifest_sha256": manifest_sha256, "target_site": site.site, "budget": spec.budget,
                                     "selection": settings.recipe.selection,
                                     "validation": site.validation, "stage_key": key, **(notes or {})},
                         ablation_test=site.test)
        fraction = budget_fraction(spec.budget, len(site.train))
        made.models.append(ModelToEvaluate(folder, spec.name, backbone_name, fraction, len(train), train=train,
                                           backbone_before=backbone_before))
        if distill:
            made.students.append(_student(settings, spec, distill, key, folder, site, train, output, progress,
                                          f"{backbone_name}-student", fraction, notes, backbone))
    return made


def _student(settings: AdaptSettings, spec: BudgetSpec, arch: str, teacher_key: str, teacher_folder: Path, site: SiteImages,
             train: ImageCache, output: Path, progress: bool, backbone_name: str, fraction: float,
             notes: dict[str, Any] | None = None, backbone: Path | None = None) -> ModelToEvaluate:
    """One budget's distilled student (`distill_budget`), reused when finished from the same teacher and settings.
    A student of the backbone's own architecture starts from the backbone."""
    from remedis.models.checkpoint import read_meta

    ac = settings.recipe
    name = f"{spec.name}-student-{arch}"
    folder = output / "adapted" / f"{spec.folder}-student-{arch}"
    init = backbone if backbone is not None and read_meta(backbone).get("architecture") == arch else None
    key = resume.distill_key(teacher_key, resume.weights_of(teacher_folder), arch, ac.distill_epochs, ac.distill_temperature,
                             settings.ood_method, settings.ood_accept_rate, resume.weights_of(init) if init else None)
    if not resume.reusable(folder, key):
        log.info("[adapt] distilling %s into %s on %d %s images", spec.name, arch, len(site.pool), site.site)
        distill_budget(settings, teacher_folder, arch, site.pool, site.val, train, folder, progress,
                       provenance={"stage_key": key, "teacher": spec.name, **(notes or {})}, init=init)
    return ModelToEvaluate(folder, name, backbone_name, fraction, len(train), train=train, extra={"distilled": True})
