"""Classification metrics shared by training (model selection) and evaluation (reports).

Thin wrappers over scikit-learn, the reference implementation, that handle the degenerate cases a
small site split produces (one class only) by returning NaN instead of raising.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def auroc(targets: np.ndarray, probs: np.ndarray, positive_index: int = 1) -> float:
    """Binary: AUROC of `probs[:, positive_index]`; multi-class: macro one-vs-rest AUROC."""
    targets = np.asarray(targets)
    probs = np.asarray(probs, dtype=np.float64)
    if len(np.unique(targets)) < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return float(roc_auc_score(targets == positive_index, probs[:, positive_index]))
    present = np.unique(targets)
    if len(present) < probs.shape[1]:
        return float("nan")
    return float(roc_auc_score(targets, probs / probs.sum(1, keepdims=True), multi_class="ovr", average="macro"))


def accuracy(targets: np.ndarray, probs: np.ndarray) -> float:
    return float(np.mean(np.asarray(probs).argmax(1) == np.asarray(targets))) if len(targets) else float("nan")
