"""Pretraining jobs: supervised upstream, then SimCLR from its weights. Each writes a backbone
checkpoint folder (see `remedis.models.checkpoint`) that the next stage, or another site, reads."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from remedis.config import RunConfig
from remedis.data.dataset import EpochSampler, ImageCache, LabeledDataset, TwoViewDataset, seed_loader_worker
from remedis.data.shards import ShardSet
from remedis.models.backbones import create_backbone
from remedis.models.checkpoint import load_checkpoint, load_matching, save_checkpoint
from remedis.models.classifier import Classifier
from remedis.models.external import load_external_weights
from remedis.pretrain.micle import MICLeDataset
from remedis.pretrain.monitor import KNNMonitor
from remedis.pretrain.simclr import SimCLRModule
from remedis.training import fit_resumable, make_trainer
from remedis.training.classifier import ClassifierModule, class_weights
from remedis.training.transforms import FineTuneAugment, SimCLRAugment

log = logging.getLogger("remedis")


def _loader(dataset, batch_size: int, shuffle: bool, cfg: RunConfig, drop_last: bool = False,
            sampler: EpochSampler | None = None) -> DataLoader:
    # Training loaders shuffle with EpochSampler (or a subclass, `sampler`): order and augmentations are
    # functions of (seed, epoch), which is what makes a resumed stage equal an uninterrupted one.
    if sampler is None and shuffle:
        sampler = EpochSampler(len(dataset), cfg.seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      num_workers=cfg.runtime.num_workers,
                      persistent_workers=cfg.runtime.num_workers > 0,
                      worker_init_fn=seed_loader_worker if cfg.runtime.num_workers > 0 else None)


def _source(data, cfg: RunConfig) -> tuple:
    """(ShardSet or None, preprocessing, sites, images) of a stage's training data: an in-memory
    `ImageCache`, or shards (`remedis.data.shards`: a `ShardSet` or its folder) that are streamed. The
    shards fix the pixels (size, channels, aspect); `model.in_chans`, when set, the network input."""
    if isinstance(data, ImageCache):
        return None, data.preprocessing, sorted({r.site for r in data.records}), len(data)
    from remedis.data.shards import open_shards

    shards = open_shards(data)
    pre = shards.preprocessing
    if cfg.model.in_chans and cfg.model.in_chans != pre.in_chans:
        pre = dataclasses.replace(pre, in_chans=int(cfg.model.in_chans))
    return shards, pre, shards.sites, shards.images


def _shard_loader(dataset, batch_size: int, cfg: RunConfig, drop_last: bool, max_steps: int | None):
    # litdata's loader: Lightning checkpoints its position (mid-epoch resume), and order and augmentations
    # are functions of (seed, epoch, group), so a resumed stage equals an uninterrupted one.
    from remedis.data.streaming import ShardLoader

    return ShardLoader(dataset, batch_size, max_batches=max_steps, drop_last=drop_last, num_workers=cfg.runtime.num_workers)


def resume_file(output: Path, stage_key: str | None) -> Path | None:
    """runs/x/backbones/<stage> -> runs/x/backbones/.<stage>-<key>.resume.ckpt (the per-epoch training
    state of an unfinished stage; keyed so a changed config never resumes from a stale state)."""
    if not stage_key:
        return None
    return Path(output).parent / f".{Path(output).name}-{stage_key[:16]}.resume.ckpt"


def _log_dir(output: Path) -> Path:
    """runs/x/backbones/<stage> -> runs/x/logs/<stage> (Lightning's CSV metrics, outside the checkpoint)."""
    return Path(output).parent.parent / "logs" / Path(output).name


def _every_steps(cfg: RunConfig, shards) -> int | None:
    """`runtime.checkpoint_every_steps` for streaming stages; in-memory loaders cannot resume mid-epoch."""
    every = getattr(cfg.runtime, "checkpoint_every_steps", None)
    if every and shards is None:
        log.info("runtime.checkpoint_every_steps applies to streaming (shard) stages; this stage checkpoints per epoch")
        return None
    return every


def _shard_note(shards) -> dict:
    """Stage-history provenance of streamed shards (nothing for in-memory stages)."""
    if shards is None:
        return {}
    return {"shards": {"samples": len(shards), "group_size": shards.group_size,
                       "content_key": shards.meta.get("content_key"), "skipped": shards.meta.get("skipped", {}).get("count", 0)}}


def backbone_meta(cfg: RunConfig, preprocessing, stage_history: list[dict]) -> dict:
    """The meta.json of a backbone folder: architecture, input channels, preprocessing, stage history, config."""
    return {
        "kind": "backbone",
        "architecture": cfg.model.backbone,
        "in_chans": preprocessing.in_chans,  # the data decides (remedis.stages.resolve_channels)
        "preprocessing": preprocessing.to_dict(),
        "stage_history": stage_history,
        "config": cfg.to_dict(),
    }


def train_supervised(cfg: RunConfig, train: ImageCache | ShardSet | str | Path, val: ImageCache, class_names: list[str],
                     positive_index: int, output: Path, manifest_sha256: str | None, progress: bool = True,
                     stage_key: str | None = None) -> Path:
    """Supervised upstream pretraining on labeled source images (in memory, or streamed from group_size-1
    shards); writes a backbone checkpoint."""
    sc = cfg.pretrain.supervised
    shards, preprocessing, sites, n_images = _source(train, cfg)
    cfg = cfg.with_preprocessing(preprocessing)
    # Each stage starts from the seed, not from whatever RNG state earlier stages left: a pipeline
    # that resumes after (or reuses) a finished stage then builds the same initial weights.
    L.seed_everything(cfg.seed, verbose=False)
    model = Classifier(cfg.model.backbone, len(class_names), cfg.model.in_chans)
    if cfg.model.weights:  # start the upstream stage from external (e.g. ImageNet BiT) weights
        load_external_weights(model.backbone, cfg.model.weights)
    augment = FineTuneAugment(cfg.data.image_size, seed=cfg.seed, strength=sc.augment_strength, channels=cfg.data.channels)
    if shards is None:
        train_ds = LabeledDataset(train, class_names, augment)
        targets = train_ds.targets
        train_loader = _loader(train_ds, sc.batch_size, True, cfg, drop_last=len(train_ds) > sc.batch_size)
    else:
        from remedis.data.streaming import StreamingLabeled

        train_ds = StreamingLabeled(shards, class_names, augment, preprocessing, seed=cfg.seed)
        targets = train_ds.targets()
        train_loader = _shard_loader(train_ds, sc.batch_size, cfg, len(shards) > sc.batch_size, sc.max_steps_per_epoch)
    module = ClassifierModule(model, lr=sc.lr, weight_decay=sc.weight_decay,
                              class_weights=class_weights(targets, len(class_names)),
                              label_smoothing=sc.label_smoothing, positive_index=positive_index)
    resume = resume_file(output, stage_key)
    trainer = make_trainer(cfg.runtime, sc.epochs, sc.max_steps_per_epoch, progress, log_dir=_log_dir(output),
                           resume_file=resume, checkpoint_every_steps=_every_steps(cfg, shards), stage="supervised")
    fit_resumable(trainer, module, train_loader, _loader(LabeledDataset(val, class_names), 256, False, cfg), resume_file=resume)
    module.load_best()
    history = [{"stage": "supervised", "manifest_sha256": manifest_sha256, "sites": sites,
                "images": n_images, "class_names": class_names, "epochs": module.history, **_shard_note(shards)}]
    meta = {**backbone_meta(cfg, preprocessing, history), "stage_key": stage_key}
    if trainer.is_global_zero:  # every rank holds the same weights: one writes the folder
        save_checkpoint(output, model.backbone.state_dict(), meta)
        best = max((h["val_auroc"] for h in module.history), default=float("nan"))
        log.info("supervised upstream: best val AUROC %.3f -> %s", best, output)
    trainer.strategy.barrier("supervised backbone saved")
    return Path(output)


def train_simclr(cfg: RunConfig, unlabeled: ImageCache | ShardSet | str | Path, init: Path | None, output: Path,
                 manifest_sha256: str | None, progress: bool = True, stage_key: str | None = None,
                 monitor: KNNMonitor | None = None) -> Path:
    """SimCLR on unlabeled images (labels ignored; in memory, or streamed from shards, where MICLe pairs
    come from the shards' patient groups), starting from `init` (the supervised backbone)."""
    sc = cfg.pretrain.simclr
    shards, preprocessing, sites, n_images = _source(unlabeled, cfg)
    cfg = cfg.with_preprocessing(preprocessing)
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
                        elastic_prob=sc.elastic_prob, channels=cfg.data.channels)
    batch = min(sc.batch_size, len(unlabeled) if shards is None else len(shards))
    if shards is None:
        dataset = MICLeDataset(unlabeled, aug, seed=cfg.seed) if sc.micle else TwoViewDataset(unlabeled, aug)
        if sc.micle:
            log.info("MICLe: %.0f%% of images have a partner image of the same patient", 100 * dataset.multi_image_fraction)
        train_loader = _loader(dataset, batch, True, cfg, drop_last=True)
    else:
        from remedis.data.streaming import StreamingTwoView

        dataset = StreamingTwoView(shards, aug, preprocessing, seed=cfg.seed, micle=sc.micle)
        if sc.micle:
            log.info("MICLe: %d of %d shard samples hold >= 2 images of one patient (group size %d)",
                     shards.meta.get("multi_image_samples", 0), len(shards), shards.group_size)
        train_loader = _shard_loader(dataset, batch, cfg, True, sc.max_steps_per_epoch)
    callbacks = [monitor] if monitor is not None else []
    if monitor is not None:
        before = monitor.measure(backbone)
        log.info("kNN monitor: AUROC %.3f before SimCLR", before)
    resume = resume_file(output, stage_key)
    trainer = make_trainer(cfg.runtime, sc.epochs, sc.max_steps_per_epoch, progress, callbacks, log_dir=_log_dir(output),
                           resume_file=resume, checkpoint_every_steps=_every_steps(cfg, shards), stage="simclr")
    fit_resumable(trainer, module, train_loader, resume_file=resume)
    for record, value in zip(module.history, monitor.history if monitor is not None else []):
        record["knn_auroc"] = value
    stage_history.append({"stage": "simclr", "manifest_sha256": manifest_sha256,
                          "sites": sites, "images": n_images, **_shard_note(shards),
                          "temperature": sc.temperature, "batch_size": batch, "micle": sc.micle,
                          "knn_auroc_before": before if monitor is not None else None, "epochs": module.history})
    meta = {**backbone_meta(cfg, preprocessing, stage_history), "stage_key": stage_key}
    if trainer.is_global_zero:
        save_checkpoint(output, backbone.state_dict(), meta)
        if module.history:
            log.info("SimCLR: NT-Xent %.3f -> %.3f, kNN AUROC %s -> %s", module.history[0]["nt_xent"],
                     module.history[-1]["nt_xent"], f"{before:.3f}" if monitor else "n/a",
                     f"{module.history[-1].get('knn_auroc', float('nan')):.3f}" if monitor else "n/a")
    trainer.strategy.barrier("simclr backbone saved")
    return Path(output)


def train_multitask(  # long: the stage top to bottom: data, model, fit, record
        cfg: RunConfig, tasks: list, train: list[ImageCache], val: list[ImageCache], output: Path,
        progress: bool = True, stage_key: str | None = None) -> Path:
    """Multi-task supervised upstream (`remedis.pretrain.multitask`): one backbone, a head per task, batches
    mixing the tasks by their weights; writes a backbone folder whose history records every task.

    Args:
        cfg: the run config (`pretrain.supervised` schedule; `model.in_chans` the network's input channels).
        tasks: the `UpstreamTask`s (class names, weights, provenance in `info`).
        train, val: per task, its labeled train and validation images (in memory; subsets are index views).
        output: the backbone folder to write.

    An epoch is `pretrain.supervised.max_steps_per_epoch` batches, else as many samples as all tasks' train
    images together. The best epoch (mean validation AUROC over the tasks) is kept.
    """
    from remedis.pretrain.multitask import MultiTaskClassifier, MultiTaskDataset, MultiTaskModule, TaskMixSampler

    sc = cfg.pretrain.supervised
    in_chans = int(cfg.model.in_chans or max(c.preprocessing.in_chans for c in train))
    for task, cache in zip(tasks, train):
        if cache.preprocessing.in_chans != in_chans:
            raise ValueError(f"task {task.name}: images prepared for {cache.preprocessing.in_chans} input channels, "
                             f"the backbone takes {in_chans} (set model.in_chans: 3 for grey and colour tasks together)")
    L.seed_everything(cfg.seed, verbose=False)
    model = MultiTaskClassifier(cfg.model.backbone, tasks, in_chans)
    if cfg.model.weights:
        load_external_weights(model.backbone, cfg.model.weights)
    augments = [FineTuneAugment(cfg.data.image_size, seed=cfg.seed, strength=sc.augment_strength,
                                channels=c.preprocessing.channels) for c in train]
    train_ds = MultiTaskDataset(train, tasks, augments)
    length = sc.max_steps_per_epoch * sc.batch_size if sc.max_steps_per_epoch else None
    sampler = TaskMixSampler(train_ds.sizes, [t.weight for t in tasks], cfg.seed, length)
    train_loader = _loader(train_ds, sc.batch_size, True, cfg, drop_last=len(sampler) > sc.batch_size, sampler=sampler)
    val_loader = _loader(MultiTaskDataset(val, tasks), 256, False, cfg)
    weights = []
    for t, task in enumerate(tasks):
        if task.multi_label:
            weights.append(None)
        else:
            weights.append(class_weights(train_ds.targets[t][:, :len(task.class_names)].argmax(1), len(task.class_names)))
    module = MultiTaskModule(model, tasks, weights, lr=sc.lr, weight_decay=sc.weight_decay, label_smoothing=sc.label_smoothing)
    resume = resume_file(output, stage_key)
    trainer = make_trainer(cfg.runtime, sc.epochs, None, progress, log_dir=_log_dir(output), resume_file=resume,
                           stage="supervised")
    fit_resumable(trainer, module, train_loader, val_loader, resume_file=resume)
    module.load_best()
    # What a site adapting this backbone decodes its images with: colour when any task was colour (a grey
    # image decoded for 3 channels is the grey image repeated, as the grey tasks were seen), else grey.
    pre = max((c.preprocessing for c in train), key=lambda p: p.channels)
    history = [{"stage": "supervised", "multitask": True, "images": sum(len(c) for c in train),
                "sites": sorted({r.site for c in train for r in c.records}), "epochs": module.history,
                "tasks": [{"name": t.name, "class_names": t.class_names, "positive_index": t.positive_index,
                           "multi_label": t.multi_label, "weight": t.weight, "train_images": len(c), "val_images": len(v),
                           "channels": c.preprocessing.channels, **t.info} for t, c, v in zip(tasks, train, val)]}]
    meta = {**backbone_meta(cfg.with_preprocessing(pre), pre, history), "stage_key": stage_key}
    if trainer.is_global_zero:
        save_checkpoint(output, model.backbone.state_dict(), meta)
        best = max(module.history, key=lambda h: h["val_auroc"] if h["val_auroc"] == h["val_auroc"] else -1, default=None)
        if best:
            log.info("multi-task upstream: best mean val AUROC %.3f (%s) -> %s", best["val_auroc"],
                     ", ".join(f"{k} {v['val_auroc']:.3f}" for k, v in best["tasks"].items()), output)
    trainer.strategy.barrier("multi-task backbone saved")
    return Path(output)
