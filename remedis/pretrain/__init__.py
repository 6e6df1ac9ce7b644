"""Stage 2 — pretrain: supervised upstream training and SimCLR contrastive self-supervision."""

from remedis.pretrain.heads import ProjectionHead
from remedis.pretrain.losses import NTXentLoss
from remedis.pretrain.simclr import SimCLRModule
from remedis.pretrain.supervised import ClassifierModule, class_weights
from remedis.pretrain.transforms import FineTuneAugment, SimCLRAugment

__all__ = ["ProjectionHead", "NTXentLoss", "SimCLRModule", "ClassifierModule", "class_weights", "FineTuneAugment", "SimCLRAugment"]
