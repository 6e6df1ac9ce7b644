"""The one rule every data-efficiency claim uses: the smallest label budget whose test AUROC is
non-inferior to the best 100%-label baseline of any backbone (random initialisation included).

Non-inferiority is a one-sided test on the paired AUROC difference: resample the test *patients* with
replacement (every image of a drawn patient, the same draw for both models), take the 5th percentile of
AUROC(candidate) - AUROC(baseline) over the resamples (a one-sided 95% bound), and call the candidate
non-inferior when that bound is above -margin. Margins 0.02 (the claim) and 0.05 (a common margin in
diagnostic non-inferiority studies) are reported side by side, with the point estimates beside them.

Example:
    >>> claim = data_efficiency_claim({0.1: p10, 0.25: p25, 1.0: p100}, {"random@1": pr, "supervised@1": ps},
    ...                               y, patients, n_boot=2000, seed=0)
    >>> claim["margins"]["0.02"]["budget"], claim["best_baseline"]
    (0.25, 'random@1')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from remedis.metrics import auroc, bootstrap_indices

MARGINS = (0.02, 0.05)
LEVEL = 0.95  # one-sided


def _runs(probs) -> list[np.ndarray]:
    """One model's (N, C) probabilities, or a list of them (one per seed) -> a list of arrays."""
    if isinstance(probs, np.ndarray) and probs.ndim == 2:
        return [probs]
    return [np.asarray(p) for p in probs]


def _mean_auroc(y: np.ndarray, runs: list[np.ndarray], idx, positive_index: int) -> float:
    return float(np.mean([auroc(y[idx], p[idx], positive_index) for p in runs]))


def paired_difference(targets, probs_a, probs_b, patients, n_boot: int = 2000, seed: int = 0, positive_index: int = 1,
                      level: float = LEVEL) -> dict:
    """AUROC(a) - AUROC(b) on the same images, with its one-sided lower bound from a paired patient bootstrap.

    Several seeds of each arm on the same test images: pass a list of arrays per arm; the difference is then
    that of the seed-mean AUROCs, resampled with the same patients for every seed.

    Args:
        targets: (N,) class index per test image.
        probs_a, probs_b: (N, C) probabilities of the two models on the same images (or a list per seed).
        patients: (N,) patient of each image (the resampling unit).
        n_boot: bootstrap resamples.
        seed: the resampling seed (the same draws for every comparison with it).
        positive_index: the positive class.
        level: one-sided confidence of the bound.

    Returns:
        {"difference", "lower", "auroc_a", "auroc_b", "resamples"} (`lower` None when too few resamples
        hold both classes).
    """
    y, a, b = np.asarray(targets), _runs(probs_a), _runs(probs_b)
    diffs = []
    for idx in bootstrap_indices(patients, n_boot, seed):
        d = _mean_auroc(y, a, idx, positive_index) - _mean_auroc(y, b, idx, positive_index)
        if not np.isnan(d):
            diffs.append(d)
    everything = np.arange(len(y))
    auc_a, auc_b = _mean_auroc(y, a, everything, positive_index), _mean_auroc(y, b, everything, positive_index)
    lower = float(np.quantile(diffs, 1.0 - level)) if len(diffs) >= max(10, n_boot // 4) else None
    return {"difference": float(auc_a - auc_b), "lower": lower, "auroc_a": float(auc_a), "auroc_b": float(auc_b),
            "resamples": len(diffs)}


def data_efficiency_claim(candidates: Mapping[float, np.ndarray], baselines: Mapping[str, np.ndarray], targets,
                          patients, margins: Sequence[float] = MARGINS, n_boot: int = 2000, seed: int = 0,
                          positive_index: int = 1) -> dict:
    """The smallest candidate budget non-inferior to the best full-label baseline, per margin.

    Args:
        candidates: label fraction -> the candidate model's test probabilities at that budget (or a list,
            one per seed: the claim is then about the seed means).
        baselines: name -> the test probabilities of each 100%-label baseline (every backbone, random init
            included; a list per seed like the candidates).
        targets, patients: the test images' classes and patients (the same images for every model).
        margins: non-inferiority margins in AUROC.
        n_boot, seed, positive_index: as `paired_difference`.

    Returns:
        {"best_baseline", "baseline_auroc", "budgets": [{fraction, auroc, difference, lower}], "margins":
        {"0.02": {"budget": smallest non-inferior fraction or None, "auroc", "lower"}, ...}}.
    """
    if not baselines:
        raise ValueError("data_efficiency_claim: no baseline to compare with")
    y = np.asarray(targets)
    scores = {name: _mean_auroc(y, _runs(p), np.arange(len(y)), positive_index) for name, p in baselines.items()}
    best = max(scores, key=lambda n: scores[n])
    rows = []
    for fraction in sorted(candidates):
        d = paired_difference(y, candidates[fraction], baselines[best], patients, n_boot, seed, positive_index)
        rows.append({"fraction": float(fraction), "auroc": d["auroc_a"], "difference": d["difference"], "lower": d["lower"]})
    out = {"best_baseline": best, "baseline_auroc": float(scores[best]), "baselines": {k: float(v) for k, v in scores.items()},
           "rule": f"smallest budget whose one-sided {LEVEL:.0%} paired patient-bootstrap lower bound of the AUROC "
                   f"difference to the best 100% baseline is above -margin ({n_boot} resamples, seed {seed})",
           "budgets": rows, "margins": {}}
    for margin in margins:
        hit = next((r for r in rows if r["lower"] is not None and r["lower"] > -margin), None)
        out["margins"][f"{margin:g}"] = ({"budget": hit["fraction"], "auroc": hit["auroc"], "lower": hit["lower"]}
                                         if hit else {"budget": None})
    return out
