"""OOD scores, detector fitting/persistence and OOD metrics on constructed cases with known answers."""

import json

import numpy as np
import pytest
from scipy.spatial.distance import mahalanobis
from scipy.special import logsumexp, softmax
from sklearn.metrics import roc_curve
from sklearn.neighbors import NearestNeighbors

from remedis.adapt.ood import (
    OODDetector,
    all_scores,
    fit_ood_detector,
    fit_state,
    fpr_at_tpr,
    ood_auroc,
    threshold_for_accept_rate,
)
from remedis.ood_scores import score_names

METHODS = score_names()


def test_ood_auroc_and_fpr95_on_known_score_sets():
    id_s = np.arange(100.0)
    assert ood_auroc(id_s, id_s + 100) == 1.0 and fpr_at_tpr(id_s, id_s + 100) == 0.0
    assert ood_auroc(id_s, id_s) == 0.5
    assert ood_auroc(id_s + 100, id_s) == 0.0 and fpr_at_tpr(id_s + 100, id_s) == 1.0
    # Overlap: OOD scores 50..149. 95% of ID accepted at score <= 94, which lets OOD 50..94 (45 of 100) in.
    ood_s = np.arange(50.0, 150.0)
    assert fpr_at_tpr(id_s, ood_s) == pytest.approx(0.45)
    naive = np.mean([(o > i) + 0.5 * (o == i) for o in ood_s for i in id_s])
    assert ood_auroc(id_s, ood_s) == pytest.approx(naive)
    # Against scikit-learn's ROC with in-distribution as the positive class (score negated).
    fpr, tpr, _ = roc_curve(np.r_[np.ones(100), np.zeros(100)], -np.r_[id_s, ood_s], drop_intermediate=False)
    assert fpr_at_tpr(id_s, ood_s) == pytest.approx(fpr[np.argmax(tpr >= 0.95)])


def test_threshold_accepts_the_requested_share():
    s = np.random.default_rng(0).normal(size=1000)
    t = threshold_for_accept_rate(s, 0.95)
    assert np.mean(s <= t) >= 0.95 and np.mean(s < t) < 0.95


def test_logit_scores_match_scipy():
    logits = np.random.default_rng(1).normal(size=(20, 3)) * 3
    det = {m: OODDetector(m, 0.0) for m in ("msp", "max_logit", "energy")}
    assert np.allclose(det["msp"].score(logits, None), -softmax(logits, 1).max(1))
    assert np.allclose(det["max_logit"].score(logits, None), -logits.max(1))
    assert np.allclose(det["energy"].score(logits, None), -logsumexp(logits, 1))


def _two_class(rng, n=200, d=8):
    y = rng.integers(0, 2, n)
    emb = rng.normal(size=(n, d)) + 3.0 + 3.0 * y[:, None]  # off the origin: kNN uses directions
    return emb, y


def _logits(emb):
    z = (emb.mean(1) - 4.5) * 4  # confident: about -6 for class 0, +6 for class 1
    return np.stack([-z, z], 1)


def test_mahalanobis_matches_scipy_with_the_stored_precision():
    rng = np.random.default_rng(2)
    emb, y = _two_class(rng)
    state = fit_state("mahalanobis", emb, y)
    q = rng.normal(size=(5, 8)) * 4
    got = OODDetector("mahalanobis", 0.0, state).score(None, q)
    vi = state["precision"].astype(np.float64)
    want = [min(mahalanobis(x, m, vi) ** 2 for m in state["means"].astype(np.float64)) for x in q]
    assert np.allclose(got, want, rtol=1e-5)
    assert np.allclose(state["means"], [emb[y == c].mean(0) for c in (0, 1)], atol=1e-5)


def test_knn_matches_sklearn_nearest_neighbours():
    rng = np.random.default_rng(3)
    emb, y = _two_class(rng, n=60)
    q = rng.normal(size=(7, 8))
    got = OODDetector("knn", 0.0, fit_state("knn", emb, y, k=5)).score(None, q)

    def norm(a):
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    dist, _ = NearestNeighbors(n_neighbors=5).fit(norm(emb)).kneighbors(norm(q))
    assert np.allclose(got, dist[:, 4], atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_detector_accepts_95pct_of_validation_and_flags_far_outliers(method, tmp_path):
    rng = np.random.default_rng(4)
    emb, y = _two_class(rng, n=300)
    logits = _logits(emb)
    val_emb, _ = _two_class(rng, n=200)
    det = fit_ood_detector(method, emb, y, _logits(val_emb), val_emb)
    assert det.method == method and np.mean(~det.is_ood(_logits(val_emb), val_emb)) >= 0.95
    # Far OOD: embeddings in a direction orthogonal to both classes, with ambiguous near-zero logits.
    far = rng.normal(size=(50, 8))
    far[:, :4] += 25.0
    far[:, 4:] -= 25.0
    far_logits = np.zeros((50, 2)) + rng.normal(scale=0.01, size=(50, 2))
    flagged = det.is_ood(far_logits, far)
    assert flagged.mean() > 0.9, (method, flagged.mean())
    det.save(tmp_path)
    again = OODDetector.load(tmp_path)
    assert again.method == method and again.threshold == pytest.approx(det.threshold)
    assert np.allclose(again.score(logits, emb), det.score(logits, emb), rtol=1e-5, atol=1e-5)


def test_load_returns_none_without_detector_and_rejects_tampering(tmp_path):
    assert OODDetector.load(tmp_path) is None
    rng = np.random.default_rng(5)
    emb, y = _two_class(rng, n=40)
    fit_ood_detector("knn", emb, y, np.zeros((10, 2)), emb[:10]).save(tmp_path)
    meta = json.loads((tmp_path / "ood.json").read_text())
    assert meta["method"] == "knn" and len(meta["weights_sha256"]) == 64
    data = bytearray((tmp_path / "ood.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "ood.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="hash does not match"):
        OODDetector.load(tmp_path)


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="unknown"):
        fit_ood_detector("odin", np.zeros((4, 2)), [0, 1, 0, 1], np.zeros((4, 2)), np.zeros((4, 2)))
    det = fit_ood_detector("knn", np.eye(4), [0, 1, 0, 1], np.zeros((4, 2)), np.eye(4))
    with pytest.raises(ValueError, match="dimension 3"):
        det.score(np.zeros((2, 2)), np.zeros((2, 3)))


def test_all_scores_gives_every_method():
    rng = np.random.default_rng(6)
    emb, y = _two_class(rng, n=50)
    s = all_scores(np.zeros((3, 2)), emb[:3], emb, y)
    assert set(s) == set(METHODS) and all(v.shape == (3,) for v in s.values())
