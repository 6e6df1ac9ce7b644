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


SCORES: dict[str, OODScore] = {}


class LogitScore:
    """Base of the scores computed from logits alone: no state to fit."""

    state_keys: ClassVar[tuple[str, ...]] = ()

    def fit(self, train_embeddings: np.ndarray, train_targets: np.ndarray, k: int) -> dict[str, np.ndarray]:
        """Nothing to fit."""
        return {}


def register_score(cls):
    """Class decorator: register one instance of `cls` under `cls.name`.

    Example:
        >>> @register_score
        ... class NegMaxLogit:
        ...     name, state_keys = "max_logit", ()
        ...     def fit(self, train_embeddings, train_targets, k): return {}
        ...     def score(self, state, logits, embeddings): return -logits.max(1)
    """
    if cls.name in SCORES:
        raise ValueError(f"OOD score {cls.name!r} is registered twice")
    SCORES[cls.name] = cls()
    return cls


def get_score(name: str) -> OODScore:
    """The registered score called `name`.

    Raises:
        ValueError: no score has that name (the message lists the registered ones).
    """
    try:
        return SCORES[name]
    except KeyError:
        raise ValueError(f"OOD method {name!r} is unknown (choose one of {', '.join(SCORES)})") from None


def score_names() -> tuple[str, ...]:
    """Every registered score's name, in registration order."""
    return tuple(SCORES)


# The registered scores (importing a module registers it), in the order reports list them.
# isort: off
from remedis.ood_scores import msp  # noqa: E402,F401
from remedis.ood_scores import max_logit  # noqa: E402,F401
from remedis.ood_scores import energy  # noqa: E402,F401
from remedis.ood_scores import mahalanobis  # noqa: E402,F401
from remedis.ood_scores import knn  # noqa: E402,F401
# isort: on
