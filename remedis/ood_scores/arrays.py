"""Array checks and small numerics the OOD scores share."""

from __future__ import annotations

import numpy as np


def as_2d(name: str, x, n: int | None = None) -> np.ndarray:
    """`x` as a finite float64 (N, D) array; a clear error naming `name` otherwise (`n`: the rows expected)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (N, D), got shape {x.shape}")
    if n is not None and len(x) != n:
        raise ValueError(f"{name}: has {len(x)} rows, expected {n}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return x


def same_dimension(embeddings: np.ndarray, fitted: np.ndarray) -> None:
    """Refuse embeddings whose dimension differs from the fitted state's."""
    if embeddings.shape[1] != fitted.shape[1]:
        raise ValueError(f"embeddings: dimension {embeddings.shape[1]} does not match the detector's {fitted.shape[1]}")


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def logsumexp(x: np.ndarray) -> np.ndarray:
    """Row-wise log-sum-exp, stable for large logits."""
    m = x.max(1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(1, keepdims=True)))[:, 0]
