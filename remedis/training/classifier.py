"""Supervised training of a classifier (upstream pretraining; fine-tuning reuses it).

Class-weighted cross-entropy (inverse frequency) with optional label smoothing, AdamW with a
one-cycle schedule, validation AUROC every epoch and the best epoch's weights kept in memory, so
selection is by validation metric, not by the last epoch.

Example:
    >>> module = ClassifierModule(Classifier("resnetv2_18_bit", 2), lr=1e-3, class_weights=w)
    >>> make_trainer(runtime, epochs=5).fit(module, train_loader, val_loader)
    >>> module.load_best()
"""

from __future__ import annotations

import copy
import math

import lightning as L
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from remedis.metrics import accuracy, auroc
from remedis.models.layout import memory_format


def class_weights(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights (mean 1); classes absent from `targets` count once."""
    counts = torch.bincount(targets, minlength=num_classes).float().clamp(min=1)
    return counts.sum() / (num_classes * counts)


class ClassifierModule(L.LightningModule):
    """Lightning module of supervised classification (upstream pretraining and fine-tuning): class-weighted cross-
    entropy, AdamW with one-cycle, validation AUROC per epoch, the best epoch kept."""

    def __init__(self, model: nn.Module, lr: float = 1e-3, weight_decay: float = 1e-4,
                 class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0,
                 positive_index: int = 1, param_groups: list[dict] | None = None,
                 frozen: list[nn.Module] | None = None):
        super().__init__()
        self.model = model
        self.frozen = frozen or []  # modules kept in eval mode (frozen BatchNorm statistics)
        self.lr, self.weight_decay, self.label_smoothing = lr, weight_decay, label_smoothing
        self.positive_index = positive_index
        self.param_groups = param_groups
        self.register_buffer("class_weights", class_weights if class_weights is not None else torch.empty(0), persistent=False)
        self.history: list[dict] = []
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_metric = -math.inf
        self._val_probs: list[torch.Tensor] = []
        self._val_targets: list[torch.Tensor] = []
        self._train_loss: list[float] = []

    def setup(self, stage: str) -> None:
        # channels_last before the strategy wraps the model: converting after DDP has built its gradient
        # buckets gave wrong averaged gradients (tests/test_ddp.py)
        """Put the network in the memory layout of the device Lightning chose."""
        self.memory_format = memory_format(self.model, self.trainer.strategy.root_device)
        self.model.to(memory_format=self.memory_format)

    # The epoch resume file (remedis.training.EpochCheckpoint) carries what lives outside the weights.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the history and the best weights in the resume state."""
        checkpoint["remedis"] = {"history": self.history, "best_metric": self.best_metric, "best_state": self.best_state}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore the history and the best weights of a resumed run."""
        state = checkpoint.get("remedis", {})
        self.history = list(state.get("history", []))
        self.best_metric = state.get("best_metric", -math.inf)
        self.best_state = state.get("best_state")

    def on_train_epoch_start(self) -> None:
        """Keep frozen modules in eval mode (their normalisation statistics do not move)."""
        for m in self.frozen:
            m.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a normalised batch."""
        return self.model(x.contiguous(memory_format=getattr(self, "memory_format", None) or memory_format(self.model, x.device)))

    def training_step(self, batch, batch_idx):
        """Weighted cross-entropy of one batch (label smoothing as configured)."""
        x, y = batch
        logits = self(x).float()
        weight = self.class_weights if self.class_weights.numel() else None
        loss = F.cross_entropy(logits, y, weight=weight, label_smoothing=self.label_smoothing)
        self._train_loss.append(loss.detach().item())
        self.log("loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        """Collect the batch's probabilities and targets for the epoch's AUROC."""
        x, y = batch
        self._val_probs.append(self(x).float().softmax(1).cpu())
        self._val_targets.append(y.cpu())

    def on_validation_epoch_end(self) -> None:
        """Compute validation AUROC and accuracy, record the epoch, keep the best weights."""
        if not self._val_probs:
            return
        probs, targets = torch.cat(self._val_probs), torch.cat(self._val_targets)
        if self.trainer.world_size > 1:  # DDP: every process scores the whole validation split
            probs = self.all_gather(probs.to(self.device)).flatten(0, 1).cpu()
            targets = self.all_gather(targets.to(self.device)).flatten(0, 1).cpu()
        probs, targets = probs.numpy(), targets.numpy()
        self._val_probs.clear()
        self._val_targets.clear()
        val_auroc = auroc(targets, probs, self.positive_index)
        record = {
            "epoch": int(self.current_epoch),
            "train_loss": float(np.mean(self._train_loss)) if self._train_loss else float("nan"),
            "val_auroc": val_auroc,
            "val_accuracy": accuracy(targets, probs),
        }
        self._train_loss.clear()
        self.history.append(record)
        self.log("val_auroc", val_auroc if not math.isnan(val_auroc) else 0.0, prog_bar=True)
        metric = val_auroc if not math.isnan(val_auroc) else record["val_accuracy"]
        if metric > self.best_metric:  # strict: ties keep the earlier (less fitted) epoch
            self.best_metric = metric
            self.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in self.model.state_dict().items()})

    def load_best(self) -> None:
        """Load the weights of the epoch with the best validation AUROC."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)

    def configure_optimizers(self):
        """AdamW over the parameter groups with a one-cycle schedule."""
        groups = self.param_groups or [{"params": [p for p in self.model.parameters() if p.requires_grad]}]
        opt = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        max_lrs = [g.get("lr", self.lr) for g in opt.param_groups]
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lrs, total_steps=steps, pct_start=0.15)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
