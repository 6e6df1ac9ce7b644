"""Energy score (Liu et al. 2020): -logsumexp(logits), from logits alone."""

from __future__ import annotations

from remedis.ood_scores import LogitScore, register_score
from remedis.ood_scores.arrays import as_2d, logsumexp


@register_score
class Energy(LogitScore):
    """-logsumexp of the logits (the free energy at temperature 1)."""

    name = "energy"

    def score(self, state, logits, embeddings):
        """(N,) -logsumexp(logits)."""
        return -logsumexp(as_2d("logits", logits))
