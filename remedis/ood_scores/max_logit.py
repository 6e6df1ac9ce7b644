"""Maximum logit (Hendrycks et al. 2022): -max logit, from logits alone."""

from __future__ import annotations

from remedis.ood_scores import LogitScore, register_score
from remedis.ood_scores.arrays import as_2d


@register_score
class MaxLogit(LogitScore):
    """-max logit (the temperature does not change its ranking)."""

    name = "max_logit"

    def score(self, state, logits, embeddings):
        """(N,) -max logit."""
        return -as_2d("logits", logits).max(1)
