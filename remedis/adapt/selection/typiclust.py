"""TypiClust (Hacohen, Dekel & Weinshall, ICML 2022): cluster the pool into (labeled + budget) clusters and
label the most typical image of the largest clusters that hold no label yet. At small budgets it beats
random choice by wide margins, because every label lands in a dense, representative region."""

from __future__ import annotations

import numpy as np

from remedis.adapt.selection import PatientGate, Selection, SelectionPool, register_strategy
from remedis.adapt.selection.clustering import kmeans, typicality


@register_strategy
class TypiClust:
    """Most typical image of the largest least-labeled cluster, one cluster at a time."""

    name = "typiclust"
    max_clusters = 500  # as the paper, to keep k-means fast on large pools
    min_cluster_size = 5  # smaller clusters are outliers: chosen only after every larger one
    neighbours = 20

    def select(self, pool: SelectionPool, budget: int, seed: int) -> Selection:
        """`budget` images: per pick, the cluster with the fewest labels (then the largest), its most typical image."""
        emb = pool.embeddings
        n_clusters = min(int(pool.labeled.sum()) + budget, self.max_clusters, len(emb))
        clusters = kmeans(emb, n_clusters, seed)
        typical = typicality(emb, clusters, self.neighbours)
        n_clusters = int(clusters.max()) + 1
        sizes = np.bincount(clusters, minlength=n_clusters)
        labels_in = np.bincount(clusters[pool.labeled], minlength=n_clusters)
        by_typicality = {c: (m := np.flatnonzero(clusters == c))[np.argsort(-typical[m], kind="stable")]
                         for c in range(n_clusters)}
        gate = PatientGate(pool)
        chosen: list[int] = []
        picked_clusters: list[int] = []
        while len(chosen) < budget:
            order = sorted(range(n_clusters), key=lambda c: (labels_in[c], sizes[c] < self.min_cluster_size, -sizes[c], c))
            pick, cluster = next(((i, c) for c in order if (i := gate.first(by_typicality[c])) is not None), (None, -1))
            if pick is None:
                break  # nothing left to choose
            gate.take(pick)
            labels_in[cluster] += 1
            chosen.append(pick)
            picked_clusters.append(int(cluster))
        return Selection(chosen, picked_clusters)
