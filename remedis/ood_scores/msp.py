"""Maximum softmax probability (Hendrycks & Gimpel 2017): -max softmax, from logits alone."""

from __future__ import annotations

import numpy as np

from remedis.ood_scores import LogitScore, register_score
from remedis.ood_scores.arrays import as_2d


@register_score
class MaxSoftmax(LogitScore):
    """-max softmax probability of the raw (uncalibrated) logits."""

    name = "msp"

    def score(self, state, logits, embeddings):
        """(N,) -max softmax probability."""
        logits = as_2d("logits", logits)
        z = logits - logits.max(1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        return -p.max(1)
