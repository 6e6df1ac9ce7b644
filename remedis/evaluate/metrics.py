"""Per-site metrics with patient-level bootstrap confidence intervals, and calibration.

Images of one patient are correlated, so the bootstrap resamples patients (with all their images),
not images; resampling images would give intervals that are too narrow. All metrics of one call share
the same resamples.

Binary tasks: AUROC, AUPRC, accuracy, and sensitivity/specificity at the stored operating point (a
threshold on the positive-class probability chosen on the validation split, never on test).
Multi-class: macro one-vs-rest AUROC plus AUROC per class. Calibration: ECE (15 bins), Brier score and
reliability-diagram bins, after temperature scaling and before (T = 1).

Example:
    >>> m = site_metrics(targets, probs, patient_ids, positive_index=1, n_boot=200, seed=0, threshold=0.31,
    ...                  probs_uncalibrated=softmax(logits))
    >>> m["auroc"], m["auroc_ci"], m["sensitivity"], m["calibration"]["ece"]
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from sklearn.metrics import roc_auc_score

from remedis.metrics import accuracy, auprc, auroc, brier, ece, reliability_bins, sensitivity_specificity


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
