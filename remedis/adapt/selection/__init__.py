"""Which images to label next: selection strategies as a registry (one registered class per file).

A strategy sees the site's pool as L2-normalised embeddings (from the backbone the site will adapt, with
its preprocessing), which images are already labeled, and each image's patient; it returns the images to
label, in order. Every strategy is patient-aware through `PatientGate`: it prefers images of patients
with no labeled or chosen image yet, and takes a second image of a patient only when no other remains.

Strategies:
    typiclust  the most typical image of each of the largest clusters without labels (Hacohen et al.,
               ICML 2022): the pick for small budgets
    probcover  greedy maximum coverage of delta-balls around the images (Yehuda et al., NeurIPS 2022)
    kcenter    farthest-first traversal from the labeled set (core-set; Sener & Savarese, ICLR 2018)
    random     a seeded random order (the baseline the others must beat)

To add one: write `remedis/adapt/selection/<name>.py` with a class decorated by `@register_strategy`,
and import it below.

Example:
    >>> pool = SelectionPool(embeddings, patients, labeled=np.zeros(len(patients), bool))
    >>> chosen = get_strategy("typiclust").select(pool, budget=50, seed=0)
    >>> chosen.indices[:3], chosen.clusters[:3]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import numpy as np

from remedis.registry import Registry


@dataclass
class SelectionPool:
    """The site's images as a strategy sees them.

    Args:
        embeddings: (N, D) L2-normalised embeddings.
        patients: each image's patient pseudonym.
        labeled: (N,) True for images already labeled (they guide the choice and are never chosen).
    """

    embeddings: np.ndarray
    patients: list[str]
    labeled: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.embeddings = np.asarray(self.embeddings, dtype=np.float32)
        if self.labeled is None:
            self.labeled = np.zeros(len(self.embeddings), dtype=bool)
        self.labeled = np.asarray(self.labeled, dtype=bool)
        if not (len(self.embeddings) == len(self.patients) == len(self.labeled)):
            raise ValueError(f"selection pool: {len(self.embeddings)} embeddings, {len(self.patients)} patients and "
                             f"{len(self.labeled)} labeled flags must be as many")

    @property
    def unlabeled(self) -> int:
        """How many images can still be chosen."""
        return int((~self.labeled).sum())


@dataclass
class Selection:
    """What a strategy chose: image indices in the order to label them, and each one's cluster (-1: none)."""

    indices: list[int]
    clusters: list[int]


class SelectionStrategy(Protocol):
    """What a registered strategy provides: its name and `select`."""

    name: ClassVar[str]

    def select(self, pool: SelectionPool, budget: int, seed: int) -> Selection:
        """`budget` images of the pool's unlabeled ones, in the order to label them (deterministic by seed)."""
        ...


class PatientGate:
    """One image per patient first: images of patients already labeled or chosen wait until no other is left.

    Example:
        >>> gate = PatientGate(pool)
        >>> i = gate.first(candidates_in_preference_order)
        >>> gate.take(i)
    """

    def __init__(self, pool: SelectionPool):
        self.patients = list(pool.patients)
        self.taken = np.array(pool.labeled, dtype=bool)
        self.images_of: dict[str, list[int]] = {}
        for i, p in enumerate(self.patients):
            self.images_of.setdefault(p, []).append(i)
        self.covered = {p for p, lab in zip(self.patients, pool.labeled) if lab}
        # untaken images whose patient has no labeled or chosen image yet
        self.free = sum(1 for i, p in enumerate(self.patients) if not self.taken[i] and p not in self.covered)

    def allowed(self, i: int) -> bool:
        """Image `i` may be chosen now: not taken, and its patient new unless no image of a new patient is left."""
        return not self.taken[i] and (self.patients[i] not in self.covered or self.free == 0)

    def first(self, candidates) -> int | None:
        """The first allowed image among `candidates` (in preference order), or None."""
        return next((int(i) for i in candidates if self.allowed(int(i))), None)

    def take(self, i: int) -> None:
        """Mark image `i` chosen, and its patient covered."""
        p = self.patients[i]
        if p not in self.covered:
            self.covered.add(p)
            self.free -= sum(1 for j in self.images_of[p] if not self.taken[j])
        self.taken[i] = True


STRATEGIES = Registry("selection strategy")
register_strategy = STRATEGIES.register  # class decorator: one instance under its `name`
get_strategy = STRATEGIES.lookup  # the registered strategy by name; ValueError lists the registered ones
strategy_names = STRATEGIES.names  # every registered strategy's name


# The registered strategies (importing a module registers it).
# isort: off
from remedis.adapt.selection import typiclust  # noqa: E402,F401
from remedis.adapt.selection import probcover  # noqa: E402,F401
from remedis.adapt.selection import kcenter  # noqa: E402,F401
from remedis.adapt.selection import random_order  # noqa: E402,F401
# isort: on
