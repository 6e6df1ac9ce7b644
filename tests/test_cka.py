"""Linear CKA: known invariances, agreement with the naive HSIC formula, and layer features."""

import numpy as np
import pytest
import torch
from scipy.stats import ortho_group

from remedis.evaluate.cka import cka_matrix, layer_features, linear_cka, site_embedding_distances


def naive_cka(x, y):
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h) / (n - 1) ** 2

    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


def test_cka_identity_invariances_and_naive_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 12))
    y = x @ rng.normal(size=(12, 7)) + 0.5 * rng.normal(size=(60, 7))
    assert linear_cka(x, x) == pytest.approx(1.0)
    q = ortho_group.rvs(12, random_state=1)
    assert linear_cka(x, x @ q) == pytest.approx(1.0)
    assert linear_cka(x, 3.7 * x @ q) == pytest.approx(1.0)
    assert linear_cka(x, y) == pytest.approx(linear_cka(x @ q * 0.2, y))
    assert linear_cka(x, y) == pytest.approx(naive_cka(x, y))
    assert 0.0 < linear_cka(x, y) < 1.0
    z = rng.normal(size=(60, 12))
    assert linear_cka(x, z) < 0.5 < linear_cka(x, y)
    with pytest.raises(ValueError, match="same number of rows"):
        linear_cka(x, y[:10])


def test_cka_is_not_invariant_to_anisotropic_scaling():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 6))
    assert linear_cka(x, x * np.array([10, 1, 1, 1, 1, 0.1])) < 0.99


def test_layer_features_and_cka_matrix_on_a_real_backbone():
    torch.manual_seed(0)
    from remedis.models.backbones import create_backbone

    net = create_backbone("resnetv2_18_bit", in_chans=1)
    x = torch.randn(12, 1, 32, 32)
    feats = layer_features(net, x, batch_size=5)
    assert list(feats) == ["stem.conv", "stages.0", "stages.1", "stages.2", "stages.3", "embedding"]
    assert all(v.shape[0] == 12 for v in feats.values()) and net.training
    m = np.array(cka_matrix(feats, feats))
    assert m.shape == (6, 6) and np.allclose(np.diag(m), 1.0)
    assert np.allclose(m, m.T)


def test_site_embedding_distances():
    e = {"a": np.tile([1.0, 0.0], (5, 1)), "b": np.tile([0.0, 2.0], (4, 1))}
    d = site_embedding_distances(e)
    assert d["a"]["a"] == 0.0 and d["a"]["b"] == pytest.approx(np.sqrt(2))
