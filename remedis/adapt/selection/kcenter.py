"""k-center greedy (core-set; Sener & Savarese, ICLR 2018): each pick the image farthest from every labeled
or chosen one. It covers the space's extremes, which helps at larger budgets and is known to pick outliers
at small ones."""

from __future__ import annotations

import numpy as np

from remedis.adapt.selection import PatientGate, Selection, SelectionPool, register_strategy


def _distances(embeddings: np.ndarray, i: int) -> np.ndarray:
    """Euclidean distance of every image to image `i`."""
    return np.linalg.norm(embeddings - embeddings[i], axis=1)


@register_strategy
class KCenter:
    """Farthest-first traversal from the labeled set (from the image nearest the mean when nothing is labeled)."""

    name = "kcenter"

    def select(self, pool: SelectionPool, budget: int, seed: int) -> Selection:
        """`budget` images, each the farthest from all labeled and chosen ones."""
        emb = pool.embeddings
        nearest = np.full(len(emb), np.inf)
        for i in np.flatnonzero(pool.labeled):
            nearest = np.minimum(nearest, _distances(emb, i))
        gate = PatientGate(pool)
        chosen: list[int] = []
        while len(chosen) < budget:
            if np.isinf(nearest).all():  # nothing labeled yet: start at the centre of the pool
                order = np.argsort(np.linalg.norm(emb - emb.mean(0), axis=1), kind="stable")
            else:
                order = np.argsort(-nearest, kind="stable")
            pick = gate.first(order)
            if pick is None:
                break
            gate.take(pick)
            chosen.append(pick)
            nearest = np.minimum(nearest, _distances(emb, pick))
        return Selection(chosen, [-1] * len(chosen))
