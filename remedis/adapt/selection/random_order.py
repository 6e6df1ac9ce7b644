"""Random choice: a seeded random order, patient-aware like the others (the baseline they must beat)."""

from __future__ import annotations

import numpy as np

from remedis.adapt.selection import PatientGate, Selection, SelectionPool, register_strategy


@register_strategy
class RandomOrder:
    """A seeded permutation of the pool, one image per patient first."""

    name = "random"

    def select(self, pool: SelectionPool, budget: int, seed: int) -> Selection:
        """`budget` images in a random order fixed by `seed`."""
        gate = PatientGate(pool)
        chosen: list[int] = []
        for i in np.random.default_rng(seed).permutation(len(pool.patients)):
            if len(chosen) == budget:
                break
            if gate.allowed(int(i)):
                gate.take(int(i))
                chosen.append(int(i))
        while len(chosen) < budget:  # every patient covered: second images, in the same order
            pick = gate.first(np.random.default_rng(seed).permutation(len(pool.patients)))
            if pick is None:
                break
            gate.take(pick)
            chosen.append(pick)
        return Selection(chosen, [-1] * len(chosen))
