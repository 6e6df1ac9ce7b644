"""Fine-tune a backbone on a site's labeled images (a label budget), select on its validation split,
calibrate, and return an `AdaptedModel`.

`backbone` is a backbone checkpoint folder (REMEDIS or supervised-only) or None for random
initialisation, so the REMEDIS gain is always measured against baselines trained the same way.

Example:
    >>> model = fine_tune(cfg, Path("runs/x/backbones/remedis"), train, val, ["benign", "malignant"], 1)
    >>> model.save("runs/x/adapted/remedis@0.1")
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from remedis.adapt.calibration import fit_temperature
from remedis.adapt.model import AdaptedModel
from remedis.config import RunConfig
from remedis.data.dataset import ImageCache, LabeledDataset
from remedis.models.checkpoint import file_sha256, load_checkpoint, load_matching
from remedis.models.classifier import Classifier
from remedis.pretrain.supervised import ClassifierModule, class_weights
from remedis.pretrain.transforms import FineTuneAugment
from remedis.training import make_trainer

log = logging.getLogger("remedis")


def fine_tune(cfg: RunConfig, backbone: Path | None, train: ImageCache, val: ImageCache,
              class_names: list[str], positive_index: int, progress: bool = True,
              provenance: dict | None = None) -> tuple[AdaptedModel, list[dict]]:
    ac = cfg.adapt
    model = Classifier(cfg.model.backbone, len(class_names), cfg.model.in_chans)
    lr = ac.lr
    backbone_hash = None
    if backbone is not None:
        state, meta = load_checkpoint(backbone)
        if meta.get("architecture") != cfg.model.backbone:
            raise ValueError(f"{backbone}: backbone is {meta.get('architecture')!r} but the config asks for {cfg.model.backbone!r}")
        load_matching(model.backbone, state, str(backbone))
        backbone_hash = meta.get("weights_sha256") or file_sha256(Path(backbone) / "model.safetensors")
    else:
        lr = ac.lr * 3  # random init needs a larger step (the reference protocol uses 1e-3 vs 3e-4)
    train_ds = LabeledDataset(train, class_names, FineTuneAugment(cfg.data.image_size, seed=cfg.seed))
    module = ClassifierModule(model, lr=lr, weight_decay=ac.weight_decay,
                              class_weights=class_weights(train_ds.targets, len(class_names)),
                              positive_index=positive_index)
    generator = torch.Generator().manual_seed(cfg.seed)
    batch = min(ac.batch_size, len(train_ds))
    train_loader = DataLoader(train_ds, batch_size=batch, shuffle=True, generator=generator,
                              drop_last=len(train_ds) > batch and len(train_ds) % batch == 1)  # BatchNorm needs >1
    val_loader = DataLoader(LabeledDataset(val, class_names), batch_size=256)
    make_trainer(cfg.runtime, ac.epochs, ac.max_steps_per_epoch, progress).fit(module, train_loader, val_loader)
    module.load_best()
    adapted = AdaptedModel(model, class_names, train.preprocessing, positive_index=positive_index)
    logits = torch.cat([adapted.logits(x) for x, _ in val_loader])
    targets = LabeledDataset(val, class_names).targets
    adapted.temperature = fit_temperature(logits, targets)
    adapted.provenance = {
        **(provenance or {}),
        "backbone_sha256": backbone_hash,
        "backbone_init": "random" if backbone is None else str(Path(backbone).name),
        "train_images": len(train),
        "val_images": len(val),
        "training_history": module.history,
    }
    return adapted, module.history
