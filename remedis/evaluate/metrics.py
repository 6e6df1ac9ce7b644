"""Per-site metrics with patient-level bootstrap confidence intervals.

Images of one patient are correlated, so the bootstrap resamples patients (with all their images),
not images; resampling images would give intervals that are too narrow.

Example:
    >>> m = site_metrics(targets, probs, patient_ids, positive_index=1, n_boot=200, seed=0)
    >>> m["auroc"], m["auroc_ci"]
"""

from __future__ import annotations

import math

import numpy as np
import torch

from remedis.adapt.calibration import expected_calibration_error
from remedis.metrics import accuracy, auroc


def _nan_to_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def patient_bootstrap_ci(targets, probs, patients, metric, n_boot: int = 200, seed: int = 0, alpha: float = 0.05):
    """Percentile CI of `metric(targets, probs)` over bootstrap resamples of patients."""
    targets, probs, patients = np.asarray(targets), np.asarray(probs), np.asarray(patients)
    if n_boot <= 0 or len(targets) == 0:
        return [None, None]
    uniq, inverse = np.unique(patients, return_inverse=True)
    members = [np.flatnonzero(inverse == i) for i in range(len(uniq))]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(uniq), len(uniq))
        idx = np.concatenate([members[p] for p in pick])
        v = metric(targets[idx], probs[idx])
        if not math.isnan(v):
            values.append(v)
    if len(values) < max(10, n_boot // 4):  # too many degenerate resamples (one class only)
        return [None, None]
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return [float(lo), float(hi)]


def site_metrics(targets, probs, patients, positive_index: int = 1, n_boot: int = 200, seed: int = 0) -> dict:
    targets, probs = np.asarray(targets), np.asarray(probs)

    def _auroc(t, p):
        return auroc(t, p, positive_index)

    return {
        "n_images": int(len(targets)),
        "n_patients": int(len(set(patients))),
        "auroc": _nan_to_none(_auroc(targets, probs)),
        "auroc_ci": patient_bootstrap_ci(targets, probs, patients, _auroc, n_boot, seed),
        "accuracy": _nan_to_none(accuracy(targets, probs)),
        "accuracy_ci": patient_bootstrap_ci(targets, probs, patients, accuracy, n_boot, seed),
        "ece": _nan_to_none(expected_calibration_error(torch.as_tensor(probs), torch.as_tensor(targets))) if len(targets) else None,
    }
