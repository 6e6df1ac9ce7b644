"""Stage 2 — pretrain: supervised upstream training and SimCLR contrastive self-supervision."""

from remedis.pretrain.heads import ProjectionHead
from remedis.pretrain.losses import NTXentLoss
from remedis.pretrain.simclr import SimCLRModule

__all__ = ["ProjectionHead", "NTXentLoss", "SimCLRModule"]
