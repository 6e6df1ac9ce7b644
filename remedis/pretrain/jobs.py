"""Pretraining jobs: supervised upstream, then SimCLR from its weights. Each writes a backbone
checkpoint folder (see `remedis.models.checkpoint`) that the next stage, or another site, reads."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from remedis.config import RunConfig
from remedis.data.dataset import EpochSampler, ImageCache, LabeledDataset, TwoViewDataset, seed_loader_worker
from remedis.models.backbones import create_backbone
from remedis.models.checkpoint import load_checkpoint, load_matching, save_checkpoint
from remedis.models.classifier import Classifier
from remedis.models.external import load_external_weights
from remedis.pretrain.micle import MICLeDataset
from remedis.pretrain.monitor import KNNMonitor
from remedis.pretrain.simclr import SimCLRModule
from remedis.pretrain.supervised import ClassifierModule, class_weights
from remedis.pretrain.transforms import FineTuneAugment, SimCLRAugment
from remedis.training import fit_resumable, make_trainer

log = logging.getLogger("remedis")


def _loader(dataset, batch_size: int, shuffle: bool, cfg: RunConfig, drop_last: bool = False) -> DataLoader:
    # Training loaders shuffle with EpochSampler: order and augmentations are functions of (seed, epoch),
    # which is what makes a resumed stage equal an uninterrupted one.
    sampler = EpochSampler(len(dataset), cfg.seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      num_workers=cfg.runtime.num_workers,
                      persistent_workers=cfg.runtime.num_workers > 0,
                      worker_init_fn=seed_loader_worker if cfg.runtime.num_workers > 0 else None)


def resume_file(output: Path, stage_key: str | None) -> Path | None:
    """runs/x/backbones/<stage> -> runs/x/backbones/.<stage>-<key>.resume.ckpt (the per-epoch training
    state of an unfinished stage; keyed so a changed config never resumes from a stale state)."""
    if not stage_key:
        return None
    return Path(output).parent / f".{Path(output).name}-{stage_key[:16]}.resume.ckpt"


def _log_dir(output: Path) -> Path:
    """runs/x/backbones/<stage> -> runs/x/logs/<stage> (Lightning's CSV metrics, outside the checkpoint)."""
    return Path(output).parent.parent / "logs" / Path(output).name


def backbone_meta(cfg: RunConfig, preprocessing, stage_history: list[dict]) -> dict:
    return {
        "kind": "backbone",
        "architecture": cfg.model.backbone,
        "in_chans": cfg.model.in_chans,
        "preprocessing": preprocessing.to_dict(),
        "stage_history": stage_history,
        "config": cfg.to_dict(),
    }


def train_supervised(cfg: RunConfig, train: ImageCache, val: ImageCache, class_names: list[str],
                     positive_index: int, output: Path, manifest_sha256: str | None, progress: bool = True,
                     stage_key: str | None = None) -> Path:
    """Supervised upstream pretraining on labeled source images; writes a backbone checkpoint."""
    sc = cfg.pretrain.supervised
    # Each stage starts from the seed, not from whatever RNG state earlier stages left: a pipeline
    # that resumes after (or reuses) a finished stage then builds the same initial weights.
    L.seed_everything(cfg.seed, verbose=False)
    model = Classifier(cfg.model.backbone, len(class_names), cfg.model.in_chans)
    if cfg.model.weights:  # start the upstream stage from external (e.g. ImageNet BiT) weights
        load_external_weights(model.backbone, cfg.model.weights)
    train_ds = LabeledDataset(train, class_names, FineTuneAugment(cfg.data.image_size, seed=cfg.seed,
                                                                  strength=sc.augment_strength))
    module = ClassifierModule(model, lr=sc.lr, weight_decay=sc.weight_decay,
                              class_weights=class_weights(train_ds.targets, len(class_names)),
                              label_smoothing=sc.label_smoothing, positive_index=positive_index)
    resume = resume_file(output, stage_key)
    trainer = make_trainer(cfg.runtime, sc.epochs, sc.max_steps_per_epoch, progress, log_dir=_log_dir(output),
                           resume_file=resume)
    fit_resumable(trainer, module, _loader(train_ds, sc.batch_size, True, cfg, drop_last=len(train_ds) > sc.batch_size),
                  _loader(LabeledDataset(val, class_names), 256, False, cfg), resume_file=resume)
    module.load_best()
    history = [{"stage": "supervised", "manifest_sha256": manifest_sha256, "sites": sorted({r.site for r in train.records}),
                "images": len(train), "class_names": class_names, "epochs": module.history}]
    meta = {**backbone_meta(cfg, train.preprocessing, history), "stage_key": stage_key}
    path = save_checkpoint(output, model.backbone.state_dict(), meta)
    best = max((h["val_auroc"] for h in module.history), default=float("nan"))
    log.info("supervised upstream: best val AUROC %.3f -> %s", best, path)
    return path


def train_simclr(cfg: RunConfig, unlabeled: ImageCache, init: Path | None, output: Path,
                 manifest_sha256: str | None, progress: bool = True, stage_key: str | None = None,
                 monitor: KNNMonitor | None = None) -> Path:
    """SimCLR on unlabeled images (labels ignored), starting from `init` (the supervised backbone)."""
    sc = cfg.pretrain.simclr
    L.seed_everything(cfg.seed, verbose=False)  # see train_supervised
    backbone = create_backbone(cfg.model.backbone, cfg.model.in_chans)
    stage_history: list[dict] = []
    if init is not None:
        state, meta = load_checkpoint(init)
        load_matching(backbone, state, str(init))
        stage_history = list(meta.get("stage_history", []))
    module = SimCLRModule(backbone, temperature=sc.temperature, projection_dim=sc.projection_dim, lr=sc.lr,
                          weight_decay=sc.weight_decay, projection_layers=sc.projection_layers, optimizer=sc.optimizer)
    aug = SimCLRAugment(cfg.data.image_size, sc.min_crop_scale, seed=cfg.seed, hist_eq_prob=sc.hist_eq_prob,
                        elastic_prob=sc.elastic_prob)
    batch = min(sc.batch_size, len(unlabeled))
    dataset = MICLeDataset(unlabeled, aug, seed=cfg.seed) if sc.micle else TwoViewDataset(unlabeled, aug)
    if sc.micle:
        log.info("MICLe: %.0f%% of images have a partner image of the same patient", 100 * dataset.multi_image_fraction)
    callbacks = [monitor] if monitor is not None else []
    if monitor is not None:
        before = monitor.measure(backbone)
        log.info("kNN monitor: AUROC %.3f before SimCLR", before)
    resume = resume_file(output, stage_key)
    trainer = make_trainer(cfg.runtime, sc.epochs, sc.max_steps_per_epoch, progress, callbacks, log_dir=_log_dir(output),
                           resume_file=resume)
    fit_resumable(trainer, module, _loader(dataset, batch, True, cfg, drop_last=True), resume_file=resume)
    for record, value in zip(module.history, monitor.history if monitor is not None else []):
        record["knn_auroc"] = value
    stage_history.append({"stage": "simclr", "manifest_sha256": manifest_sha256,
                          "sites": sorted({r.site for r in unlabeled.records}), "images": len(unlabeled),
                          "temperature": sc.temperature, "batch_size": batch, "micle": sc.micle,
                          "knn_auroc_before": before if monitor is not None else None, "epochs": module.history})
    meta = {**backbone_meta(cfg, unlabeled.preprocessing, stage_history), "stage_key": stage_key}
    path = save_checkpoint(output, backbone.state_dict(), meta)
    if module.history:
        log.info("SimCLR: NT-Xent %.3f -> %.3f, kNN AUROC %s -> %s", module.history[0]["nt_xent"],
                 module.history[-1]["nt_xent"], f"{before:.3f}" if monitor else "n/a",
                 f"{module.history[-1].get('knn_auroc', float('nan')):.3f}" if monitor else "n/a")
    return path
