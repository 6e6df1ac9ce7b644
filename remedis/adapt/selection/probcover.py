"""ProbCover (Yehuda, Dekel, Hacohen & Weinshall, NeurIPS 2022): choose the images whose delta-balls cover
the most of the pool not yet covered. Delta is the largest radius at which 95% of the balls stay pure
(hold one k-means pseudo-class only), estimated without labels."""

from __future__ import annotations

import numpy as np

from remedis.adapt.selection import PatientGate, Selection, SelectionPool, register_strategy
from remedis.adapt.selection.clustering import kmeans


def pure_radius(embeddings: np.ndarray, seed: int, purity: float = 0.95, pseudo_classes: int = 10,
                queries: int = 2000) -> float:
    """The largest delta at which `purity` of the balls hold one pseudo-class: a ball around image i is pure
    while delta is below i's distance to its nearest image of another k-means cluster."""
    from sklearn.metrics import pairwise_distances_chunked

    clusters = kmeans(embeddings, pseudo_classes, seed)
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(embeddings), size=min(queries, len(embeddings)), replace=False)
    nearest_other = []
    for start, block in zip(range(0, len(sample), 512),
                            pairwise_distances_chunked(embeddings[sample], embeddings, working_memory=256)):
        rows = sample[start:start + len(block)]
        block = np.where(clusters[None, :] == clusters[rows][:, None], np.inf, block)
        nearest_other.append(block.min(1))
    d = np.concatenate(nearest_other) if nearest_other else np.array([np.inf])
    d = d[np.isfinite(d)]
    return float(np.quantile(d, 1.0 - purity)) if len(d) else 1.0


@register_strategy
class ProbCover:
    """Greedy maximum coverage of delta-balls; when everything is covered, the rest in a seeded random order."""

    name = "probcover"
    purity = 0.95

    def select(self, pool: SelectionPool, budget: int, seed: int) -> Selection:
        """`budget` images, each the centre of the ball covering most not-yet-covered images."""
        from sklearn.neighbors import radius_neighbors_graph

        emb = pool.embeddings
        delta = pure_radius(emb, seed, self.purity)
        graph = radius_neighbors_graph(emb, radius=max(delta, 1e-6), mode="connectivity", include_self=True).tocsr()
        covered = np.zeros(len(emb), dtype=bool)
        for i in np.flatnonzero(pool.labeled):
            covered[graph.indices[graph.indptr[i]:graph.indptr[i + 1]]] = True
        degree = np.asarray(graph @ (~covered).astype(np.float64)).ravel()
        fallback = np.random.default_rng(seed).permutation(len(emb))
        gate = PatientGate(pool)
        chosen: list[int] = []
        while len(chosen) < budget:
            if degree.max(initial=0.0) > 0:
                pick = gate.first(np.argsort(-degree, kind="stable"))
            else:
                pick = gate.first(fallback)
            if pick is None:
                break
            gate.take(pick)
            chosen.append(pick)
            ball = graph.indices[graph.indptr[pick]:graph.indptr[pick + 1]]
            newly = ball[~covered[ball]]
            if len(newly):
                covered[newly] = True
                degree -= np.asarray(graph[newly].sum(0)).ravel()  # the graph is symmetric
        return Selection(chosen, [-1] * len(chosen))
