"""Backbone + linear head, the model every stage trains and serving runs."""

from __future__ import annotations

import torch
import torch.nn as nn

from remedis.models.backbones import create_backbone, embedding_dim


class Classifier(nn.Module):
    """`forward_features` -> pooled embedding (`embed`) -> linear `head` -> logits."""

    def __init__(self, backbone_name: str, num_classes: int, in_chans: int = 1):
        super().__init__()
        self.backbone_name = backbone_name
        self.backbone = create_backbone(backbone_name, in_chans=in_chans)
        self.head = nn.Linear(embedding_dim(self.backbone), num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features of a normalised batch."""
        return self.backbone.forward_head(self.backbone.forward_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a normalised batch."""
        return self.head(self.embed(x))

    def logits_and_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """One pass for both: (B, num_classes + embedding_dim), `[logits | embedding]` (the OOD detector
        needs the embedding, the answer the logits)."""
        e = self.embed(x)
        return torch.cat([self.head(e), e], 1)
