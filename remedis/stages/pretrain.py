"""The pretraining stages: supervised upstream (one task or several), then SimCLR (MICLe) from its weights.

Each function trains one backbone folder unless a finished one with the same resume key is there
(`remedis.resume`), and says which: `remedis run` and `remedis pretrain` call these, so a backbone trained
by either is reused by both. They take the whole `RunConfig` because the backbone folder records it
(`meta.json` "config", the provenance a site reads).

Example:
    >>> corpus = resume.corpus_key(manifest.sha256, cfg.data, cfg.model, cfg.seed, ["site-A"])
    >>> key = resume.backbone_key("supervised", corpus, cfg.pretrain.supervised, None)
    >>> pretrain_supervised(cfg, train, val, task, Path("runs/x/backbones/supervised"), key, manifest.sha256)
    False
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from remedis.config import RunConfig
from remedis.data.dataset import ImageCache
from remedis.resume import reusable
from remedis.stages.data import MultitaskData, Task

log = logging.getLogger("remedis")


def pretrain_supervised(cfg: RunConfig, train: Any, val: ImageCache, task: Task, folder: Path, key: str,
                        manifest_sha256: str | None, progress: bool = True) -> bool:
    """Supervised upstream on labeled images into the backbone folder `folder`.

    Args:
        cfg: the run config with its channels resolved (`pretrain.supervised`, `model`, `runtime`, `seed`).
        train: the labeled train images (`ImageCache`, or a `ShardSet` to stream).
        val: the labeled validation images (epoch selection by validation AUROC).
        task: class names and positive class.
        folder: the backbone folder to write.
        key: its resume key (`resume.backbone_key`).
        manifest_sha256: recorded in the folder's stage history.
        progress: show progress bars.

    Returns:
        True when a finished folder with `key` was reused, False when it was trained now.
    """
    from remedis.pretrain.jobs import train_supervised

    if reusable(folder, key):
        return True
    train_supervised(cfg, train, val, task.class_names, task.positive_index, folder, manifest_sha256, progress, stage_key=key)
    return False


def pretrain_simclr(cfg: RunConfig, corpus: Any, init: Path | None, folder: Path, key: str, manifest_sha256: str | None,
                    progress: bool = True, monitor: Any = None) -> bool:
    """SimCLR (MICLe when `pretrain.simclr.micle`) on unlabeled images into the backbone folder `folder`.

    Args:
        cfg: the run config with its channels resolved (`pretrain.simclr`, `model`, `runtime`, `seed`).
        corpus: the images, labels ignored (`ImageCache`, or a `ShardSet` whose samples group a patient's images).
        init: the backbone it starts from (the supervised upstream), or None for random initialisation.
        folder: the backbone folder to write.
        key: its resume key (`resume.backbone_key`, with the weights hash of `init`).
        manifest_sha256: recorded in the folder's stage history.
        progress: show progress bars.
        monitor: a `KNNMonitor` measuring the representation each epoch, or None.

    Returns:
        True when a finished folder with `key` was reused, False when it was trained now.
    """
    from remedis.pretrain.jobs import train_simclr

    if reusable(folder, key):
        return True
    train_simclr(cfg, corpus, init, folder, manifest_sha256, progress, stage_key=key, monitor=monitor)
    return False


def pretrain_multitask(data: MultitaskData, folder: Path, key: str, progress: bool = True) -> bool:
    """The multi-task supervised upstream (a head per task on one backbone) into `folder`.

    Args:
        data: the prepared tasks (`stages.multitask_data`).
        folder: the backbone folder to write.
        key: its resume key (`resume.multitask_key`).
        progress: show progress bars.

    Returns:
        True when a finished folder with `key` was reused, False when it was trained now.
    """
    from remedis.pretrain.jobs import train_multitask

    if reusable(folder, key):
        return True
    log.info("[pretrain supervised] %d tasks, %d images -> %s", len(data.tasks), sum(len(c) for c in data.train), folder)
    train_multitask(data.cfg, data.tasks, data.train, data.val, folder, progress, stage_key=key)
    return False


def site_simclr(cfg: RunConfig, backbone: Path, site_images: Any, labeled: ImageCache, val: ImageCache, task: Task,
                folder: Path, manifest_sha256: str, site: str, progress: bool = True) -> tuple[Path, bool]:
    """Continue SimCLR (MICLe when `pretrain.simclr.micle`) from `backbone` on one site's train images,
    labeled or not (`adapt.unlabeled: simclr`): a backbone of the site's own distribution to adapt from.
    Only train images: no val or test image of the site reaches it.

    Args:
        cfg: the run config with the backbone's architecture and channels (`pretrain.simclr` schedule).
        backbone: the backbone it continues.
        site_images: the site's train images, labeled or not.
        labeled: the site's labeled train images (the kNN monitor's bank).
        val: the site's labeled validation images (the kNN monitor's queries).
        task: class names and positive class (the monitor).
        folder: the site backbone's folder.
        manifest_sha256: the manifest's hash (key, provenance).
        site: the site's name (key).
        progress: show progress bars.

    Returns:
        (the folder, True when a finished one was reused).
    """
    from remedis import resume
    from remedis.pretrain.monitor import KNNMonitor

    corpus = resume.corpus_key(manifest_sha256, cfg.data, cfg.model, cfg.seed, [site])
    key = resume.backbone_key("site-simclr", corpus, cfg.pretrain.simclr, resume.weights_of(backbone))
    monitor = KNNMonitor(labeled, val, task.class_names, task.positive_index) if len(labeled) and len(val) else None
    if not reusable(folder, key):
        log.info("[adapt] continuing SimCLR from %s on %d train images of %s (labeled or not)", backbone.name,
                 len(site_images), site)
    return folder, pretrain_simclr(cfg, site_images, backbone, folder, key, manifest_sha256, progress, monitor=monitor)
