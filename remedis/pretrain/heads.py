"""Projection head for contrastive learning (SimCLR v2: MLP on the pooled embedding)."""

from __future__ import annotations

import torch.nn as nn


class ProjectionHead(nn.Sequential):
    """`num_layers`-layer MLP, BatchNorm + ReLU between layers, to `output_dim` (128 by default).

    Example:
        >>> head = ProjectionHead(512, 512, 128)
    """

    def __init__(self, input_dim: int, hidden_dim: int = 512, output_dim: int = 128, num_layers: int = 2):
        layers: list[nn.Module] = []
        dim = input_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            dim = hidden_dim
        layers.append(nn.Linear(dim, output_dim))
        super().__init__(*layers)
