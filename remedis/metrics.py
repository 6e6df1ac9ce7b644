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
        return binary_auroc(targets == positive_index, probs[:, positive_index])
    present = np.unique(targets)
    if len(present) < probs.shape[1]:
        return float("nan")
    return float(roc_auc_score(targets, probs / probs.sum(1, keepdims=True), multi_class="ovr", average="macro"))


def binary_auroc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney form of the binary AUROC (ties count one half): equal to scikit-learn's
    roc_auc_score (tested), ~20x cheaper, which matters inside the bootstrap loops."""
    from scipy.stats import rankdata

    positive = np.asarray(positive, dtype=bool)
    n1 = int(positive.sum())
    n0 = len(positive) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def accuracy(targets: np.ndarray, probs: np.ndarray) -> float:
    return float(np.mean(np.asarray(probs).argmax(1) == np.asarray(targets))) if len(targets) else float("nan")


def auprc(targets: np.ndarray, scores: np.ndarray) -> float:
    """Average precision of binary `targets` (bool) ranked by `scores` (NaN with no positive): the sum
    over distinct thresholds, high to low, of recall gained x precision, exactly scikit-learn's
    average_precision_score (tested) without its input checks, which dominate inside bootstraps."""
    y = np.asarray(targets, dtype=bool)
    if not y.any():
        return float("nan")
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last position of each distinct score
    tps = np.cumsum(y)[last]
    precision = tps / (last + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def sensitivity_specificity(targets: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float]:
    """Binary `targets` (bool) called positive when `scores >= threshold`."""
    targets = np.asarray(targets, dtype=bool)
    called = np.asarray(scores) >= threshold
    sens = float(called[targets].mean()) if targets.any() else float("nan")
    spec = float((~called[~targets]).mean()) if (~targets).any() else float("nan")
    return sens, spec


def threshold_for_sensitivity(targets: np.ndarray, scores: np.ndarray, sensitivity: float = 0.9) -> float:
    """The largest threshold on `scores` whose sensitivity (`scores >= t` among positives) is at least
    `sensitivity`: the most specific operating point that meets the sensitivity target."""
    pos = np.sort(np.asarray(scores, dtype=np.float64)[np.asarray(targets, dtype=bool)])
    if len(pos) == 0:
        return 0.5
    # Keep at least ceil(sensitivity * P) positives at or above the threshold.
    return float(pos[len(pos) - int(np.ceil(sensitivity * len(pos)))])


def reliability_bins(probs: np.ndarray, targets: np.ndarray, bins: int = 15) -> dict[str, list]:
    """Equal-width bins over the top-class confidence (right-closed, as in Guo et al. 2017):
    per bin the image count, mean confidence and accuracy (None for empty bins)."""
    probs = np.asarray(probs, dtype=np.float64)
    conf, correct = probs.max(1), probs.argmax(1) == np.asarray(targets)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    sum_conf = np.bincount(idx, weights=conf, minlength=bins)
    sum_acc = np.bincount(idx, weights=correct.astype(np.float64), minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mc, acc = sum_conf / count, sum_acc / count
    return {"edges": edges.tolist(), "count": count.tolist(),
            "confidence": [None if c == 0 else float(v) for c, v in zip(count, mc)],
            "accuracy": [None if c == 0 else float(v) for c, v in zip(count, acc)]}


def ece(probs: np.ndarray, targets: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: sum over bins of |accuracy - confidence| weighted by bin share."""
    if len(targets) == 0:
        return float("nan")
    r = reliability_bins(probs, targets, bins)
    n = sum(r["count"])
    return float(sum(c / n * abs(a - m) for c, a, m in zip(r["count"], r["accuracy"], r["confidence"]) if c))


def brier(probs: np.ndarray, targets: np.ndarray, positive_index: int = 1) -> float:
    """Binary: mean (p_positive - y)^2 (scikit-learn's brier_score_loss); multi-class: mean over
    images of the squared error summed over classes, halved so both agree for two classes."""
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets)
    if len(targets) == 0:
        return float("nan")
    if probs.shape[1] == 2:
        return float(np.mean((probs[:, positive_index] - (targets == positive_index)) ** 2))
    onehot = np.eye(probs.shape[1])[targets]
    return float(np.mean(((probs - onehot) ** 2).sum(1)) / 2)
