import math

import torch

from remedis.pretrain import NTXentLoss


def ntxent_naive(z1, z2, t):
    """Loop-by-loop NT-Xent from the SimCLR paper (eq. 1), averaged over all 2N anchors."""
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        num = math.exp(float(z[i] @ z[j]) / t)
        den = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(2 * n) if k != i)
        total += -math.log(num / den)
    return total / (2 * n)


def test_ntxent_matches_naive_formula():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    for t in (0.1, 0.5, 1.0):
        assert abs(float(NTXentLoss(t)(z1, z2)) - ntxent_naive(z1, z2, t)) < 1e-5


def test_ntxent_is_low_for_aligned_views_and_symmetric():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 32, generator=g)
    aligned = NTXentLoss(0.1)(z, z + 1e-3 * torch.randn(8, 32, generator=g))
    random = NTXentLoss(0.1)(z, torch.randn(8, 32, generator=g))
    assert aligned < random
    z2 = torch.randn(8, 32, generator=g)
    assert torch.allclose(NTXentLoss(0.2)(z, z2), NTXentLoss(0.2)(z2, z))


def test_ntxent_gradient_flows():
    z1 = torch.randn(4, 8, requires_grad=True)
    NTXentLoss(0.1)(z1, torch.randn(4, 8)).backward()
    assert torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0
