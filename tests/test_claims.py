"""The one claim rule (remedis.evaluate.claims): a paired patient bootstrap of the AUROC difference, checked
against scikit-learn and against cases whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from remedis.evaluate.claims import data_efficiency_claim, paired_difference


def _probs(score: np.ndarray) -> np.ndarray:
    return np.stack([1 - score, score], 1)


def _case(seed: int = 0, n: int = 300):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    patients = np.repeat(np.arange(n // 2), 2)  # two images per patient: the bootstrap resamples pairs
    signal = y + rng.normal(0, 1.0, n)
    return y, patients, signal, rng


def test_difference_matches_scikit_learn_and_identical_models_are_non_inferior():
    y, patients, signal, rng = _case()
    weaker = signal + rng.normal(0, 1.5, len(y))
    d = paired_difference(y, _probs(1 / (1 + np.exp(-signal))), _probs(1 / (1 + np.exp(-weaker))), patients, n_boot=500)
    assert d["difference"] == pytest.approx(roc_auc_score(y, signal) - roc_auc_score(y, weaker), abs=1e-12)
    assert d["lower"] < d["difference"] and d["resamples"] == 500
    sure = _probs(1 / (1 + np.exp(-signal)))
    same = paired_difference(y, sure, sure, patients, n_boot=200)
    assert same["difference"] == 0.0 and same["lower"] == 0.0  # paired: identical models never differ


def test_the_smallest_non_inferior_budget_against_the_best_baseline():
    y, patients, signal, rng = _case(1, 400)
    noisy = {f: signal + rng.normal(0, s, len(y)) for f, s in ((0.1, 3.0), (0.25, 0.6), (1.0, 0.1))}
    candidates = {f: _probs(1 / (1 + np.exp(-v))) for f, v in noisy.items()}
    baselines = {"random@1": _probs(1 / (1 + np.exp(-(signal + rng.normal(0, 0.3, len(y)))))),
                 "supervised@1": _probs(1 / (1 + np.exp(-(signal + rng.normal(0, 2.0, len(y))))))}
    claim = data_efficiency_claim(candidates, baselines, y, patients, n_boot=500, seed=0)
    assert claim["best_baseline"] == "random@1"  # the best baseline, whatever its backbone
    by = {r["fraction"]: r for r in claim["budgets"]}
    assert by[0.1]["lower"] < -0.05  # far worse: not non-inferior at either margin
    assert claim["margins"]["0.05"]["budget"] in (0.25, 1.0) and claim["margins"]["0.02"]["budget"] in (0.25, 1.0, None)
    assert claim["margins"]["0.05"]["budget"] <= (claim["margins"]["0.02"]["budget"] or 1.0)  # a wider margin is never later
    with pytest.raises(ValueError, match="no baseline"):
        data_efficiency_claim(candidates, {}, y, patients)


def test_seeds_of_one_arm_are_compared_by_their_mean_auroc_on_the_same_resamples():
    y, patients, signal, rng = _case(2)
    seeds_a = [_probs(1 / (1 + np.exp(-(signal + rng.normal(0, s, len(y)))))) for s in (0.5, 1.0, 1.5)]
    seeds_b = [_probs(1 / (1 + np.exp(-(signal + rng.normal(0, s, len(y)))))) for s in (1.0, 1.0)]
    d = paired_difference(y, seeds_a, seeds_b, patients, n_boot=300)
    mean = lambda runs: np.mean([roc_auc_score(y, p[:, 1]) for p in runs])  # noqa: E731
    assert d["difference"] == pytest.approx(mean(seeds_a) - mean(seeds_b), abs=1e-12)
    single = paired_difference(y, seeds_a[0], seeds_b[0], patients, n_boot=300)
    assert single == paired_difference(y, [seeds_a[0]], [seeds_b[0]], patients, n_boot=300)  # a list of one is one model
    claim = data_efficiency_claim({0.1: seeds_b, 1.0: seeds_a}, {"x@1": seeds_a}, y, patients, n_boot=300)
    assert claim["baseline_auroc"] == pytest.approx(mean(seeds_a)) and claim["budgets"][1]["difference"] == 0.0
