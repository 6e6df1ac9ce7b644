"""SimCLR: contrastive self-supervision of a backbone (NT-Xent on two augmented views).

REMEDIS starts SimCLR from the supervised upstream weights, on unlabeled in-domain images of every
site. AdamW with linear warm-up then cosine decay. The projection head is discarded afterwards; only
the backbone is carried to adaptation.

Example:
    >>> module = SimCLRModule(backbone, temperature=0.1)
    >>> make_trainer(runtime, epochs=10).fit(module, two_view_loader)
"""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch
import torch.nn as nn

from remedis.models.backbones import embedding_dim
from remedis.models.layout import memory_format
from remedis.pretrain.heads import ProjectionHead
from remedis.pretrain.losses import NTXentLoss


def lars(module: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """timm's LARS as SimCLR uses it: momentum 0.9; biases and normalisation parameters get neither
    weight decay nor the layer-wise trust ratio (timm adapts only groups with weight decay)."""
    from timm.optim import Lars

    decay = [p for p in module.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim <= 1]
    return Lars([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                lr=lr, momentum=0.9)


class SimCLRModule(L.LightningModule):
    """Lightning module of SimCLR: backbone + projection head, NT-Xent between two views (MICLe pairs when given), LARS or AdamW."""

    def __init__(self, backbone: nn.Module, temperature: float = 0.1, projection_dim: int = 128,
                 lr: float = 5e-4, weight_decay: float = 1e-4, warmup_fraction: float = 0.1,
                 projection_layers: int = 2, optimizer: str = "adamw"):
        super().__init__()
        self.backbone = backbone
        dim = embedding_dim(backbone)
        self.projection = ProjectionHead(dim, dim, projection_dim, num_layers=projection_layers)
        self.criterion = NTXentLoss(temperature)
        self.lr, self.weight_decay, self.warmup_fraction = lr, weight_decay, warmup_fraction
        self.optimizer_name = optimizer
        self.history: list[dict] = []
        self._losses: list[float] = []

    def setup(self, stage: str) -> None:
        # channels_last before the strategy wraps the model: converting after DDP has built its gradient
        # buckets gave wrong averaged gradients (tests/test_ddp.py)
        """Put the network in the device's memory layout."""
        self.memory_format = memory_format(self.backbone, self.trainer.strategy.root_device)
        self.backbone.to(memory_format=self.memory_format)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Projections of a normalised batch (what NT-Xent compares)."""
        x = x.contiguous(memory_format=getattr(self, "memory_format", None) or memory_format(self.backbone, x.device))
        return self.projection(self.backbone.forward_head(self.backbone.forward_features(x)))

    def training_step(self, batch, batch_idx):
        """NT-Xent of one batch of view pairs."""
        v1, v2 = batch
        z = self.project(torch.cat([v1, v2]))  # one forward pass for both views: BatchNorm sees all 2N
        z1, z2 = z.float().chunk(2)
        if self.trainer.world_size > 1:
            # Negatives from the global batch: all_gather keeps the gradient path to every process's
            # embeddings, and DDP's gradient average then equals the one-process gradient.
            from torch.distributed.nn.functional import all_gather

            z1, z2 = torch.cat(all_gather(z1)), torch.cat(all_gather(z2))
        loss = self.criterion(z1, z2)
        self._losses.append(loss.detach().item())
        self.log("nt_xent", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the history in the resume state."""
        checkpoint["remedis"] = {"history": self.history}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore the history of a resumed run."""
        self.history = list(checkpoint.get("remedis", {}).get("history", []))

    def on_train_epoch_end(self) -> None:
        """Record the epoch's mean NT-Xent."""
        self.history.append({"epoch": int(self.current_epoch), "nt_xent": float(np.mean(self._losses))})
        self._losses.clear()

    def configure_optimizers(self):
        """LARS or AdamW (`pretrain.simclr.optimizer`) with warm-up and cosine decay."""
        if self.optimizer_name == "lars":
            opt = lars(self, self.lr, self.weight_decay)
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, int(self.warmup_fraction * total))

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
