"""OOD scores: a registry where a new score is one registered class in its own file.

A score turns a model's logits and pooled embeddings into one number per image, higher = more
out-of-distribution. Some need state fitted on the in-distribution train split (class means, a bank of
embeddings); `fit` returns it as named arrays, which `remedis.adapt.ood.OODDetector` stores in
`ood.safetensors` beside the model and checks on load (`state_keys`).

To add a score: write `remedis/ood_scores/<name>.py` with a class decorated by `@register_score`,
and import it below (the import order is the order reports list the scores in). `evaluate.ood_method`
then accepts its name, `remedis evaluate` reports it, and the service can use it.

Example:
    >>> score = get_score("energy")
    >>> state = score.fit(train_embeddings, train_targets, k=10)
    >>> score.score(state, logits, embeddings)      # (N,) higher = more OOD
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import numpy as np

from remedis.registry import Registry


class OODScore(Protocol):
    """What a registered score provides.

    Attributes:
        name: its config name (`evaluate.ood_method`).
        state_keys: the arrays `fit` returns (empty: the score needs no fitted state).
    """

    name: ClassVar[str]
    state_keys: ClassVar[tuple[str, ...]]

    def fit(self, train_embeddings: np.ndarray, train_targets: np.ndarray, k: int) -> dict[str, np.ndarray]:
        """The state the score needs from the in-distribution train split (validated 2-D embeddings)."""
        ...

    def score(self, state: dict[str, np.ndarray], logits: np.ndarray | None, embeddings: np.ndarray | None) -> np.ndarray:
        """(N,) scores, higher = more OOD."""
        ...


SCORES = Registry("OOD method")
register_score = SCORES.register  # class decorator: one instance under its `name`
get_score = SCORES.lookup  # the registered score by name; ValueError lists the registered ones
score_names = SCORES.names  # every registered score's name, in registration order


class LogitScore:
    """Base of the scores computed from logits alone: no state to fit."""

    state_keys: ClassVar[tuple[str, ...]] = ()

    def fit(self, train_embeddings: np.ndarray, train_targets: np.ndarray, k: int) -> dict[str, np.ndarray]:
        """Nothing to fit."""
        return {}


# The registered scores (importing a module registers it), in the order reports list them.
# isort: off
from remedis.ood_scores import msp  # noqa: E402,F401
from remedis.ood_scores import max_logit  # noqa: E402,F401
from remedis.ood_scores import energy  # noqa: E402,F401
from remedis.ood_scores import mahalanobis  # noqa: E402,F401
from remedis.ood_scores import knn  # noqa: E402,F401
# isort: on
