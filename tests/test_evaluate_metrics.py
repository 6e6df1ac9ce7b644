"""Report metrics against scikit-learn and naive reference implementations."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from remedis.metrics import (
    auprc,
    bootstrap_indices,
    brier,
    ece,
    patient_bootstrap_ci,
    reliability_bins,
    sensitivity_specificity,
    site_metrics,
    threshold_for_sensitivity,
)


def _binary(seed=0, n=120):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p1 = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.5 * (2 * y - 1))))
    return y, np.stack([1 - p1, p1], 1), np.repeat(np.arange(n // 3), 3)


def naive_ece(probs, targets, bins=15):
    conf, pred = probs.max(1), probs.argmax(1)
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i in range(len(conf)) if lo < conf[i] <= hi or (b == 0 and conf[i] == 0)]
        if members:
            acc = np.mean([pred[i] == targets[i] for i in members])
            total += len(members) / len(conf) * abs(acc - np.mean([conf[i] for i in members]))
    return total


def test_binary_metrics_match_sklearn():
    y, p, pid = _binary()
    m = site_metrics(y, p, pid, positive_index=1, n_boot=50, seed=0, threshold=0.5)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p[:, 1]))
    assert m["auprc"] == pytest.approx(average_precision_score(y, p[:, 1]))
    assert m["accuracy"] == pytest.approx(np.mean(p.argmax(1) == y))
    assert m["calibration"]["brier"] == pytest.approx(brier_score_loss(y, p[:, 1]))
    assert m["sensitivity"] == pytest.approx(np.mean(p[y == 1, 1] >= 0.5))
    assert m["specificity"] == pytest.approx(np.mean(p[y == 0, 1] < 0.5))
    for key in ("auroc", "auprc", "accuracy", "sensitivity", "specificity"):
        lo, hi = m[key + "_ci"]
        assert lo <= m[key] <= hi and hi - lo > 0, key
    # Positive class 0 instead of 1: the metrics follow the chosen class.
    m0 = site_metrics(y, p, pid, positive_index=0, n_boot=0)
    assert m0["auprc"] == pytest.approx(average_precision_score(y == 0, p[:, 0])) and m0["auroc_ci"] == [None, None]


def test_fast_auroc_and_auprc_equal_sklearn_with_ties():
    from remedis.metrics import binary_auroc

    rng = np.random.default_rng(7)
    for _ in range(5):
        y = rng.integers(0, 2, 80).astype(bool)
        s = np.round(rng.normal(size=80) + y, 1)  # rounded: many ties
        assert binary_auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert auprc(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_ece_matches_naive_loop():
    for seed in range(3):
        rng = np.random.default_rng(seed)
        probs = rng.dirichlet([0.5, 0.5, 0.5], 300)
        probs[:5] = [1 / 3, 1 / 3, 1 / 3]  # confidence exactly on a bin edge (5/15)
        y = rng.integers(0, 3, 300)
        assert ece(probs, y) == pytest.approx(naive_ece(probs, y), abs=1e-12)
    r = reliability_bins(probs, y)
    assert sum(r["count"]) == 300 and len(r["edges"]) == 16


def test_multiclass_brier_halved_equals_binary_definition():
    y, p, _ = _binary(1)
    onehot_sum = np.mean(((p - np.eye(2)[y]) ** 2).sum(1))
    assert brier(p, y) == pytest.approx(onehot_sum / 2) == pytest.approx(brier_score_loss(y, p[:, 1]))


def test_multiclass_macro_and_per_class_auroc():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 150)
    logits = rng.normal(size=(150, 3)) + 1.2 * np.eye(3)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = site_metrics(y, p, np.arange(150), n_boot=30, class_names=["a", "b", "c"])
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    for c, name in enumerate("abc"):
        assert m["per_class_auroc"][name]["auroc"] == pytest.approx(roc_auc_score(y == c, p[:, c]))
    assert "sensitivity" not in m and "auprc" not in m


def test_operating_point_is_the_most_specific_threshold_meeting_sensitivity():
    y, p, _ = _binary(3, n=200)
    t = threshold_for_sensitivity(y == 1, p[:, 1], 0.9)
    sens, _ = sensitivity_specificity(y == 1, p[:, 1], t)
    assert sens >= 0.9
    above = np.sort(p[y == 1, 1])
    higher = above[above > t]
    if len(higher):
        assert sensitivity_specificity(y == 1, p[:, 1], higher[0])[0] < 0.9


def test_bootstrap_resamples_whole_patients():
    pid = np.array(["p1", "p1", "p1", "p2", "p3", "p3"])
    for idx in bootstrap_indices(pid, 20, seed=0):
        picked = pid[idx]
        # each patient appears a multiple of its image count: patients are drawn whole
        assert np.sum(picked == "p1") % 3 == 0 and np.sum(picked == "p3") % 2 == 0
        assert len(set(picked)) <= 3


def test_patient_level_ci_is_wider_than_image_level_for_clustered_images():
    # 40 patients x 5 identical images: an image-level bootstrap would think there are 200 independent
    # images and give a too-narrow interval.
    y, p, _ = _binary(4, n=40)
    Y, P = np.repeat(y, 5), np.repeat(p, 5, axis=0)

    def acc(t, q):
        return float(np.mean(q.argmax(1) == t))

    by_patient = patient_bootstrap_ci(Y, P, np.repeat(np.arange(40), 5), acc, 400, 0)
    by_image = patient_bootstrap_ci(Y, P, np.arange(200), acc, 400, 0)
    assert by_patient[1] - by_patient[0] > 1.5 * (by_image[1] - by_image[0])


def test_uncalibrated_calibration_is_reported_and_single_class_site_has_no_auroc():
    y, p, pid = _binary(5)
    sharp = p ** 3 / (p ** 3).sum(1, keepdims=True)
    m = site_metrics(y, p, pid, n_boot=0, probs_uncalibrated=sharp)
    assert m["calibration_uncalibrated"]["ece"] == pytest.approx(ece(sharp, y))
    one = site_metrics(np.ones(6, int), p[:6], pid[:6], n_boot=20)
    assert one["auroc"] is None and one["auroc_ci"] == [None, None] and one["accuracy"] is not None
