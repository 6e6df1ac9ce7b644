"""Classification metrics: one module for training (model selection), adaptation (operating point)
and evaluation (reports with patient-level bootstrap CIs).

Thin wrappers over scikit-learn, the reference implementation, that handle the degenerate cases a
small site split produces (one class only) by returning NaN instead of raising.

Per-site metrics (`site_metrics`): images of one patient are correlated, so the bootstrap resamples
patients (with all their images), not images; all metrics of one call share the same resamples.
Binary tasks: AUROC, AUPRC, accuracy, and sensitivity/specificity at the stored operating point (a
threshold on the positive-class probability chosen on the validation split, never on test).
Multi-class: macro one-vs-rest AUROC plus AUROC per class name. Calibration: ECE (15 bins), Brier score
and reliability-diagram bins, after temperature scaling and before (T = 1).

Example:
    >>> m = site_metrics(targets, probs, patient_ids, positive_index=1, n_boot=200, seed=0, threshold=0.31,
    ...                  probs_uncalibrated=softmax(logits), class_names=["benign", "malignant"])
    >>> m["auroc"], m["auroc_ci"], m["sensitivity"], m["calibration"]["ece"]
"""

from __future__ import annotations

import math
from collections.abc import Callable

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
    """Share of rows whose most probable class is the target."""
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
    return float(pos[len(pos) - max(1, int(np.ceil(sensitivity * len(pos) - 1e-9)))])


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


def _nan_to_none(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def bootstrap_indices(patients, n_boot: int, seed: int) -> list[np.ndarray]:
    """`n_boot` image-index arrays, each all images of a with-replacement sample of the patients."""
    patients = np.asarray(patients)
    if n_boot <= 0 or len(patients) == 0:
        return []
    uniq, inverse = np.unique(patients, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.r_[0, np.cumsum(np.bincount(inverse, minlength=len(uniq)))]
    members = [order[starts[i]:starts[i + 1]] for i in range(len(uniq))]
    rng = np.random.default_rng(seed)
    return [np.concatenate([members[p] for p in rng.integers(0, len(uniq), len(uniq))]) for _ in range(n_boot)]


def percentile_ci(values: list[float], n_boot: int, alpha: float = 0.05) -> list[float | None]:
    """The (lower, upper) percentile interval of bootstrap values at confidence `level`."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if n_boot <= 0 or len(values) < max(10, n_boot // 4):  # too many degenerate resamples (one class only)
        return [None, None]
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return [float(lo), float(hi)]


def patient_bootstrap_ci(targets, probs, patients, metric: Callable, n_boot: int = 200, seed: int = 0,
                         alpha: float = 0.05) -> list[float | None]:
    """Percentile CI of `metric(targets, probs)` over bootstrap resamples of patients."""
    targets, probs = np.asarray(targets), np.asarray(probs)
    values = [metric(targets[i], probs[i]) for i in bootstrap_indices(patients, n_boot, seed)]
    return percentile_ci(values, n_boot, alpha)


def calibration(probs, targets, positive_index: int = 1, bins: int = 15) -> dict:
    """Expected calibration error, Brier score and the reliability diagram's bins of the positive class."""
    probs = np.asarray(probs, dtype=np.float64)
    return {"ece": _nan_to_none(ece(probs, targets, bins)), "brier": _nan_to_none(brier(probs, targets, positive_index)),
            "reliability": reliability_bins(probs, targets, bins) if len(targets) else None}


def site_metrics(targets, probs, patients, positive_index: int = 1, n_boot: int = 200, seed: int = 0,
                 threshold: float | None = None, probs_uncalibrated=None, class_names: list[str] | None = None) -> dict:
    """Metrics of one site's images. `probs` are calibrated (temperature-scaled) probabilities;
    `threshold` is the operating point on the positive-class probability (binary only)."""
    targets, probs = np.asarray(targets), np.asarray(probs, dtype=np.float64)
    n_classes = probs.shape[1] if probs.ndim == 2 else 2
    binary = n_classes == 2
    names = class_names or [str(i) for i in range(n_classes)]

    def point(t, p) -> dict[str, float]:
        out = {"auroc": auroc(t, p, positive_index), "accuracy": accuracy(t, p)}
        if binary:
            pos = p[:, positive_index]
            out["auprc"] = auprc(t == positive_index, pos)
            if threshold is not None:
                out["sensitivity"], out["specificity"] = sensitivity_specificity(t == positive_index, pos, threshold)
        else:
            for c, name in enumerate(names):
                y = t == c
                out[f"auroc:{name}"] = float(roc_auc_score(y, p[:, c])) if y.any() and (~y).any() else float("nan")
        return out

    full = point(targets, probs) if len(targets) else {}
    boots = [point(targets[i], probs[i]) for i in bootstrap_indices(patients, n_boot, seed)]
    result: dict = {"n_images": len(targets), "n_patients": len(set(patients))}
    for key in full:
        if key.startswith("auroc:"):
            continue
        result[key] = _nan_to_none(full[key])
        result[key + "_ci"] = percentile_ci([b[key] for b in boots], n_boot)
    if not binary and full:
        result["per_class_auroc"] = {
            name: {"auroc": _nan_to_none(full[f"auroc:{name}"]),
                   "auroc_ci": percentile_ci([b[f"auroc:{name}"] for b in boots], n_boot)} for name in names}
    if binary:
        result["threshold"] = threshold
    cal = calibration(probs, targets, positive_index)
    result["ece"] = cal["ece"]  # schema v1 key, kept at the top level
    result["calibration"] = cal
    if probs_uncalibrated is not None:
        result["calibration_uncalibrated"] = calibration(probs_uncalibrated, targets, positive_index)
    return result
