"""Mahalanobis distance (Lee et al. 2018, on the pooled embedding): the distance to the nearest class mean
under one shared, Ledoit-Wolf shrunk covariance."""

from __future__ import annotations

import numpy as np

from remedis.ood_scores import register_score
from remedis.ood_scores.arrays import as_2d, same_dimension


@register_score
class Mahalanobis:
    """min over classes of the squared Mahalanobis distance of the embedding to the class mean."""

    name = "mahalanobis"
    state_keys = ("means", "precision")

    def fit(self, train_embeddings, train_targets, k):
        """Class means and the precision of the shared covariance (shrunk: site train sets have far fewer
        images than embedding dimensions, so the plain covariance is singular)."""
        from sklearn.covariance import LedoitWolf

        emb = train_embeddings
        y = np.asarray(train_targets)
        if len(y) != len(emb):
            raise ValueError(f"train_targets: has {len(y)} entries, train_embeddings has {len(emb)} rows")
        classes = np.unique(y)
        means = np.stack([emb[y == c].mean(0) for c in classes])
        centred = emb - means[np.searchsorted(classes, y)]
        cov = LedoitWolf(assume_centered=True).fit(centred).covariance_
        try:  # shrinkage makes it positive definite unless every embedding is identical
            precision = np.linalg.inv(cov)
        except np.linalg.LinAlgError:
            precision = np.linalg.pinv(cov, hermitian=True)
        return {"means": means.astype(np.float32), "precision": precision.astype(np.float32)}

    def score(self, state, logits, embeddings):
        """(N,) distance to the nearest class mean."""
        emb = as_2d("embeddings", embeddings)
        means, prec = state["means"].astype(np.float64), state["precision"].astype(np.float64)
        same_dimension(emb, means)
        d = emb[:, None, :] - means[None, :, :]  # (N, C, D)
        return np.einsum("ncd,de,nce->nc", d, prec, d).min(1)
