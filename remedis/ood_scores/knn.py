"""Deep nearest neighbours (Sun et al. 2022): the distance to the k-th nearest L2-normalised train embedding."""

from __future__ import annotations

import numpy as np

from remedis.ood_scores import register_score
from remedis.ood_scores.arrays import as_2d, l2_normalise, same_dimension


@register_score
class KNearest:
    """Euclidean distance, on the unit sphere, to the k-th nearest train embedding."""

    name = "knn"
    state_keys = ("bank", "k")

    def fit(self, train_embeddings, train_targets, k):
        """The normalised train embeddings and k (at most the bank's size)."""
        return {"bank": l2_normalise(train_embeddings).astype(np.float32),
                "k": np.array([min(k, len(train_embeddings))], dtype=np.int64)}

    def score(self, state, logits, embeddings):
        """(N,) distance to the k-th nearest bank embedding."""
        emb = as_2d("embeddings", embeddings)
        bank = state["bank"].astype(np.float64)
        same_dimension(emb, bank)
        k = int(state["k"].reshape(-1)[0])
        sim = l2_normalise(emb) @ bank.T  # cosine similarity; distance^2 = 2 - 2 sim on the unit sphere
        kth = -np.partition(-sim, k - 1, axis=1)[:, k - 1]
        return np.sqrt(np.maximum(2.0 - 2.0 * kth, 0.0))
