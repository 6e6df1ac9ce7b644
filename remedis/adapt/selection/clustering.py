"""What the clustering strategies share: k-means on the embeddings and each image's typicality."""

from __future__ import annotations

import numpy as np

KMEANS_FULL_UP_TO = 50  # more clusters than this: mini-batch k-means (as TypiClust does), minutes -> seconds


def kmeans(embeddings: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """Cluster index per image (scikit-learn k-means; mini-batch for many clusters), deterministic by seed."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    n_clusters = max(1, min(int(n_clusters), len(embeddings)))
    if n_clusters <= KMEANS_FULL_UP_TO:
        model = KMeans(n_clusters=n_clusters, n_init=3, random_state=seed)
    else:
        model = MiniBatchKMeans(n_clusters=n_clusters, n_init=3, random_state=seed, batch_size=max(1024, 4 * n_clusters))
    return model.fit_predict(embeddings).astype(np.int64)


def typicality(embeddings: np.ndarray, clusters: np.ndarray, neighbours: int = 20) -> np.ndarray:
    """1 / (mean distance to the `neighbours` nearest images of the same cluster): high in a cluster's dense
    core, low at its edges (TypiClust's typicality). A lone image scores 0."""
    from sklearn.neighbors import NearestNeighbors

    out = np.zeros(len(embeddings), dtype=np.float64)
    for c in np.unique(clusters):
        members = np.flatnonzero(clusters == c)
        k = min(neighbours, len(members) - 1)
        if k < 1:
            continue
        dist, _ = NearestNeighbors(n_neighbors=k + 1).fit(embeddings[members]).kneighbors(embeddings[members])
        out[members] = 1.0 / (dist[:, 1:].mean(1) + 1e-12)  # column 0 is the image itself
    return out
