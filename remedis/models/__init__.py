"""Shared model code: the timm backbone factory, the classifier and carried checkpoints."""

from remedis.models.backbones import create_backbone, embedding_dim
from remedis.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from remedis.models.classifier import Classifier

__all__ = ["create_backbone", "embedding_dim", "Classifier", "CheckpointError", "load_checkpoint", "save_checkpoint"]
