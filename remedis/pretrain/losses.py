"""NT-Xent, the SimCLR contrastive loss.

For 2N embeddings (two views of N images), each view's positive is the other view of its image and
its negatives are the other 2N - 2 views in the batch, so the batch size sets the number of
negatives (gradient accumulation does not add negatives).

Example:
    >>> loss = NTXentLoss(temperature=0.1)(z1, z2)    # z1, z2: (N, D) projections of the two views
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class NTXentLoss(nn.Module):
    """NT-Xent, SimCLR's contrastive loss: each view's positive is its pair among 2N views, at temperature
    `temperature` (gathered across ranks when distributed)."""

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """The loss of two (N, D) projections of the same N items."""
        if z1.shape != z2.shape or z1.ndim != 2:
            raise ValueError(f"expected two (N, D) tensors of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
        n = z1.shape[0]
        z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
        logits = z @ z.T / self.temperature
        logits.fill_diagonal_(float("-inf"))  # a view is not its own negative
        targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
        return F.cross_entropy(logits, targets)
