"""Fine-tune a backbone on a site's labeled images (a label budget) and return an `AdaptedModel`.

One call runs the whole adaptation recipe:
1. a small sweep, the grid learning rate x weight decay x augmentation strength (`adapt.lr`,
   `adapt.weight_decay`, `adapt.augment_strength` plus the `adapt.sweep_*` lists), each member
   fine-tuned with early selection on the site's validation AUROC (full, partial or linear
   fine-tuning, or LP-FT: full fine-tuning from a logistic-regression head fitted on frozen
   embeddings, the probe itself kept as one more member; class-weighted loss);
2. the members combined by `adapt.soup` (best member, uniform or greedy soup);
3. WiSE-FT: the backbone interpolated towards its initial weights, alpha chosen on validation;
4. temperature scaling and the operating threshold (validation sensitivity `operating_sensitivity`).

`backbone` is a backbone checkpoint folder (REMEDIS or supervised-only) or None for random
initialisation, so the REMEDIS gain is always measured against baselines trained the same way.

Besides the model, `fine_tune` returns the recipe's intermediate weights (`variants`: the linear probe
under LP-FT, the best single sweep member, the soup before WiSE-FT), so a caller can measure on its
test split what each step adds; nothing there is used for any choice.

Example:
    >>> model, history, variants = fine_tune(cfg.adapt, cfg.runtime, "resnetv2_50x1_bit", 0, Path("runs/x/backbones/remedis"),
    ...                                      train, val, ["benign", "malignant"], 1)
    >>> model.save("runs/x/adapted/remedis@0.1")
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from remedis.adapt.calibration import fit_temperature
from remedis.adapt.linear_head import fit_linear_head
from remedis.adapt.model import AdaptedModel
from remedis.adapt.weights import greedy_soup, uniform_soup, wise_ft
from remedis.config import AdaptConfig, RuntimeConfig
from remedis.data.dataset import EpochSampler, ImageCache, LabeledDataset, seed_loader_worker
from remedis.data.preprocess import Preprocessing
from remedis.metrics import auroc, threshold_for_sensitivity
from remedis.models.backbones import backbone_blocks
from remedis.models.checkpoint import load_checkpoint, load_matching
from remedis.models.classifier import Classifier
from remedis.training import make_trainer
from remedis.training.classifier import ClassifierModule, class_weights
from remedis.training.transforms import FineTuneAugment

log = logging.getLogger("remedis")


@dataclass
class SweepMember:
    """One fine-tuned point of the sweep: its hyperparameters, weights, validation AUROC and history."""

    lr: float
    state: dict[str, torch.Tensor]
    val_auroc: float
    history: list[dict]
    weight_decay: float | None = None  # None: the LP-FT probe (no gradient training)
    augment_strength: float | None = None


def check_adaptation_data(train: ImageCache, val: ImageCache, class_names: list[str], where: str) -> None:
    """Fail before training when a budget or split cannot support the task, naming what is missing."""
    if not len(val):
        raise ValueError(f"{where}: the site has no labeled validation image (no row with split 'val'); give the manifest "
                         "a val split, or leave the split column empty for remedis to split by patient")
    if not len(train):
        raise ValueError(f"{where}: the site has no labeled train image (no row with split 'train')")
    for name, cache, advice in (("training budget", train, "use a larger budget"),
                                ("validation split", val, "the site's val split needs every class")):
        present = {r.label for r in cache.records}
        missing = [c for c in class_names if c not in present]
        if missing:
            raise ValueError(f"{where}: the {name} has no image of class(es) {missing} "
                             f"({len(cache)} images); {advice}, or check the site's labels")


def _freeze(model: Classifier, mode: str, after_block: int) -> list[torch.nn.Module]:
    """Freeze backbone parts per `mode`; return the frozen modules (kept in eval mode)."""
    if mode in ("full", "lp-ft") or (mode == "partial" and after_block < 0):
        return []
    if mode == "linear":
        frozen = [model.backbone]
    else:
        blocks = backbone_blocks(model.backbone)
        if after_block >= len(blocks):
            raise ValueError(f"adapt.fine_tune_after_block: {after_block} but the backbone has blocks 0..{len(blocks) - 1}")
        frozen = blocks[: after_block + 1]
    for m in frozen:
        m.requires_grad_(False)
    return frozen


def _val_auroc(model: AdaptedModel, state, loader) -> float:
    model.classifier.load_state_dict(state)
    logits = torch.cat([model.logits(x) for x, _ in loader])
    targets = torch.cat([y for _, y in loader])
    return auroc(targets.numpy(), logits.softmax(1).numpy(), model.positive_index)


@dataclass(frozen=True)
class Schedule:
    """Epochs and steps of one sweep member: `adapt.min_steps` stretches a small budget's schedule by a
    whole factor, validating every `val_every` epochs, so it trains at least min_steps optimizer steps
    with the same number of validations."""

    batch: int
    drop_last: bool
    steps_per_epoch: int
    val_every: int
    epochs: int

    @classmethod
    def of(cls, ac, n_train: int) -> "Schedule":
        """The schedule of `ac` (the adapt section) for `n_train` labeled images."""
        batch = min(ac.batch_size, n_train)
        drop_last = n_train > batch and n_train % batch == 1  # no 1-image batch
        steps = n_train // batch if drop_last else math.ceil(n_train / batch)
        if ac.max_steps_per_epoch:
            steps = min(steps, ac.max_steps_per_epoch)
        val_every = max(1, math.ceil(math.ceil(ac.min_steps / steps) / ac.epochs))
        return cls(batch, drop_last, steps, val_every, ac.epochs * val_every)


@dataclass(frozen=True)
class _Setup:
    """What every step of the recipe reads: the `adapt` and `runtime` sections, the network, the seed and
    the preprocessing of the training images (their size and channels)."""

    recipe: AdaptConfig
    runtime: RuntimeConfig
    architecture: str
    seed: int
    preprocessing: Preprocessing


def _initial_model(setup: _Setup, n_classes: int, init_state, backbone) -> Classifier:
    """The network with its initial backbone weights (none: random initialisation) and a new head."""
    model = Classifier(setup.architecture, n_classes, setup.preprocessing.in_chans)
    if init_state is not None:
        load_matching(model.backbone, init_state, str(backbone))
    return model


def _probe(setup: _Setup, init_state, backbone, train: ImageCache, val: ImageCache, class_names: list[str],
           positive_index: int) -> tuple[SweepMember, dict[str, torch.Tensor], dict]:
    """LP-FT's first step: the initial backbone (random init included, as a baseline) plus a logistic-regression
    head fitted on frozen embeddings; kept as one more sweep member, its head starts every other member."""
    L.seed_everything(setup.seed, verbose=False)
    model = _initial_model(setup, len(class_names), init_state, backbone)
    c, probe_auroc = fit_linear_head(model, train, val, class_names, positive_index)
    head_state = {k: v.detach().clone() for k, v in model.head.state_dict().items()}
    log.info("adapt: linear probe head (C=%g) val AUROC %.3f", c, probe_auroc)
    member = SweepMember(0.0, {k: v.detach().clone() for k, v in model.state_dict().items()}, probe_auroc,
                         [{"epoch": -1, "val_auroc": probe_auroc, "linear_probe_C": c}])
    return member, head_state, {"C": c, "val_auroc": probe_auroc}


def _sweep(setup: _Setup, init_state, backbone, train: ImageCache, val_loader, class_names: list[str],
           positive_index: int, head_state, schedule: Schedule, progress: bool) -> list[SweepMember]:
    """Step 1: one fine-tuning per point of the grid learning rate x weight decay x augmentation strength,
    each with early selection on validation AUROC; every member starts from the same head and data order."""
    ac, pre = setup.recipe, setup.preprocessing
    train_ds = LabeledDataset(train, class_names)
    weights = class_weights(train_ds.targets, len(class_names))
    grid = itertools.product([ac.lr, *ac.sweep_lrs], [ac.weight_decay, *ac.sweep_weight_decays],
                             [ac.augment_strength, *ac.sweep_augment_strengths])
    members = []
    for lr, weight_decay, strength in grid:
        if init_state is None:
            lr = lr * 3  # random init needs a larger step (the reference protocol uses 1e-3 vs 3e-4)
        L.seed_everything(setup.seed, verbose=False)
        model = _initial_model(setup, len(class_names), init_state, backbone)
        if head_state is not None:
            model.head.load_state_dict(head_state)
        frozen = _freeze(model, ac.mode, ac.fine_tune_after_block)
        groups = [{"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": lr * ac.backbone_lr_scale},
                  {"params": list(model.head.parameters()), "lr": lr}]
        groups = [g for g in groups if g["params"]]
        module = ClassifierModule(model, lr=lr, weight_decay=weight_decay, class_weights=weights,
                                  label_smoothing=ac.label_smoothing, positive_index=positive_index,
                                  param_groups=groups, frozen=frozen)
        workers = setup.runtime.num_workers
        member_ds = LabeledDataset(train, class_names, FineTuneAugment(pre.image_size, seed=setup.seed, strength=strength,
                                                                       channels=pre.channels))
        train_loader = DataLoader(member_ds, batch_size=schedule.batch, sampler=EpochSampler(len(train_ds), setup.seed),
                                  drop_last=schedule.drop_last,
                                  num_workers=workers, persistent_workers=workers > 0,
                                  worker_init_fn=seed_loader_worker if workers > 0 else None)
        callbacks = []
        if ac.patience:
            from lightning.pytorch.callbacks import EarlyStopping

            callbacks.append(EarlyStopping("val_auroc", mode="max", patience=ac.patience))
        make_trainer(setup.runtime, schedule.epochs, ac.max_steps_per_epoch, progress, callbacks,
                     val_every=schedule.val_every, stage="adapt").fit(module, train_loader, val_loader)
        module.load_best()
        members.append(SweepMember(lr, {k: v.detach().clone() for k, v in model.state_dict().items()},
                                   module.best_metric, module.history, weight_decay, strength))
    return members


def _soup(members: list[SweepMember], method: str, metric) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Step 2: the members combined: the best one, a uniform soup or a greedy soup (by validation AUROC)."""
    best = max(range(len(members)), key=lambda i: members[i].val_auroc)
    if len(members) == 1 or method == "best":
        return members[best].state, [best]
    if method == "uniform":
        return uniform_soup([m.state for m in members]), list(range(len(members)))
    return greedy_soup([m.state for m in members], metric)


def _wise_ft(init_state, state, alphas, metric) -> tuple[dict[str, torch.Tensor], float, dict[float, float]]:
    """Step 3: WiSE-FT, the backbone interpolated towards its initial weights; alpha with the highest
    validation AUROC, on ties the larger one (closer to the fine-tuned model)."""
    scores = {a: metric(wise_ft(init_state, state, a, prefix="backbone.")) for a in sorted(set(alphas) | {1.0})}
    alpha = max(scores, key=lambda a: (round(scores[a], 6), a))
    return wise_ft(init_state, state, alpha, prefix="backbone."), alpha, scores


def _calibrate(model: AdaptedModel, val_loader, val_targets: torch.Tensor, sensitivity: float) -> None:
    """Step 4: temperature scaling and the operating threshold (validation sensitivity), on validation."""
    logits = torch.cat([model.logits(x) for x, _ in val_loader])
    model.temperature = fit_temperature(logits, val_targets)
    probs = model.probs_from_logits(logits).numpy()
    model.threshold = threshold_for_sensitivity(val_targets.numpy() == model.positive_index, probs[:, model.positive_index],
                                                sensitivity)
    model.operating_point = {"sensitivity": sensitivity, "chosen_on": "validation"}


def fine_tune(  # long: half docstring; the recipe's four steps in order
        recipe: AdaptConfig, runtime: RuntimeConfig, architecture: str, seed: int, backbone: Path | None,
        train: ImageCache, val: ImageCache, class_names: list[str], positive_index: int, progress: bool = True,
        provenance: dict | None = None) -> tuple[AdaptedModel, list[dict], dict[str, dict[str, torch.Tensor]]]:
    """The adaptation recipe (module docstring) on one label budget.

    Args:
        recipe: the `adapt` section (sweep grid, schedule, soup, WiSE-FT, operating sensitivity).
        runtime: the `runtime` section (devices, precision, loader workers).
        architecture: the network (`model.backbone`); a backbone folder must hold the same.
        seed: seeds every member's initial head, data order and augmentation.
        backbone: backbone checkpoint folder, or None for random initialisation.
        train: the budget's labeled images; their preprocessing gives the input size and channels.
        val: the site's labeled validation images (every choice is made on them).
        class_names: the classes, in order.
        positive_index: the positive class of binary AUROC and of the operating point.
        progress: show progress bars.
        provenance: recorded in the model, besides what the recipe adds.

    Returns:
        the adapted model, the training history of its first soup member and the recipe's intermediate
        weights (`variants`).
    """
    ac = recipe
    setup = _Setup(recipe, runtime, architecture, seed, train.preprocessing)
    in_chans = train.preprocessing.in_chans
    check_adaptation_data(train, val, class_names, "adapt")
    init_state, backbone_hash = None, None
    if backbone is not None:
        init_state, meta = load_checkpoint(backbone)
        if meta.get("architecture") != architecture or meta.get("in_chans", in_chans) != in_chans:
            raise ValueError(f"{backbone}: backbone is {meta.get('architecture')!r} with {meta.get('in_chans')} input "
                             f"channel(s) but the config asks for {architecture!r} with {in_chans}")
        backbone_hash = meta.get("weights_sha256")
    val_ds = LabeledDataset(val, class_names)
    val_loader = DataLoader(val_ds, batch_size=256)
    schedule = Schedule.of(ac, len(train))
    if schedule.val_every > 1:
        log.info("adapt: %d epochs of %d step(s) (validation every %d) to reach adapt.min_steps=%d",
                 schedule.epochs, schedule.steps_per_epoch, schedule.val_every, ac.min_steps)

    members: list[SweepMember] = []
    head_state, probe = None, {}
    if ac.mode == "lp-ft":
        member, head_state, probe = _probe(setup, init_state, backbone, train, val, class_names, positive_index)
        members.append(member)
    members += _sweep(setup, init_state, backbone, train, val_loader, class_names, positive_index, head_state, schedule,
                      progress)

    adapted = AdaptedModel(Classifier(architecture, len(class_names), in_chans), class_names,
                           train.preprocessing, positive_index=positive_index)

    def metric(state):
        return _val_auroc(adapted, state, val_loader)

    best_member = max(range(len(members)), key=lambda i: members[i].val_auroc)
    variants = {"best_member": members[best_member].state}
    if probe:
        variants = {"linear_probe": members[0].state, **variants}
    state, soup_members = _soup(members, ac.soup, metric)
    variants["soup"] = state
    alpha, alpha_scores = 1.0, {}
    if ac.wise_ft and init_state is not None and ac.mode != "linear":
        state, alpha, alpha_scores = _wise_ft(init_state, state, ac.wise_alphas, metric)
    adapted.classifier.load_state_dict(state)
    _calibrate(adapted, val_loader, val_ds.targets, ac.operating_sensitivity)

    adapted.provenance = {**(provenance or {}), **_recipe_record(
        ac, backbone, backbone_hash, probe, train, val, schedule, members, soup_members, alpha, alpha_scores),
        "val_auroc": float(metric(state))}
    history = members[soup_members[0]].history
    return adapted, history, variants


def _recipe_record(ac: AdaptConfig, backbone: Path | None, backbone_hash: str | None, probe: dict, train: ImageCache,
                   val: ImageCache, schedule: Schedule, members: list[SweepMember], soup_members: list[int], alpha: float,
                   alpha_scores: dict[float, float]) -> dict:
    """What the recipe did, for the model's provenance: its start, data, schedule, every sweep member, the soup
    and WiSE-FT."""
    return {
        "backbone_sha256": backbone_hash,
        "backbone_init": "random" if backbone is None else str(Path(backbone).name),
        "mode": ac.mode,
        **({"linear_probe": probe} if probe else {}),
        "train_images": len(train),
        "val_images": len(val),
        "epochs": schedule.epochs,
        "steps": schedule.epochs * schedule.steps_per_epoch,
        "sweep": [{"lr": m.lr, "weight_decay": m.weight_decay, "augment_strength": m.augment_strength,
                   "val_auroc": m.val_auroc, "history": m.history} for m in members],
        "soup": {"method": ac.soup if len(members) > 1 else "single", "members": soup_members},
        "wise_ft": {"alpha": alpha, "val_auroc_by_alpha": {str(k): v for k, v in alpha_scores.items()}},
    }
