"""Layout choices (remedis.models.layout): same numbers, the fast layout per network and device."""

import torch
import torch.nn as nn

from remedis.models import Classifier, create_backbone
from remedis.models.layout import LayoutMaxPool2d, memory_format, use_layout_pooling


def test_layout_max_pool_equals_max_pool_and_keeps_the_input_layout():
    torch.manual_seed(0)
    ref = nn.MaxPool2d(3, 2, padding=1)
    pool = LayoutMaxPool2d(3, 2, padding=1)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(4, 8, 17, 17, dtype=dtype)
        out = pool(x)
        assert torch.equal(out, ref(x))
        assert out.is_contiguous()
        xcl = x.contiguous(memory_format=torch.channels_last)
        out_cl = pool(xcl)
        assert torch.equal(out_cl, ref(x))
        assert out_cl.is_contiguous(memory_format=torch.channels_last) and not out_cl.is_contiguous()


def test_layout_max_pool_gradient_equals_max_pool_gradient():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    (LayoutMaxPool2d(3, 2)(x) * torch.arange(16.0).reshape(4, 4)).sum().backward()
    (nn.MaxPool2d(3, 2)(x2) * torch.arange(16.0).reshape(4, 4)).sum().backward()
    assert torch.equal(x.grad, x2.grad)


def test_every_backbone_pools_through_the_layout_pool():
    for name in ("resnetv2_18_bit", "resnet18"):
        net = create_backbone(name, in_chans=1)
        pools = [m for m in net.modules() if isinstance(m, nn.MaxPool2d)]
        assert pools and all(type(m) is LayoutMaxPool2d for m in pools)
    wrapped = use_layout_pooling(nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2, ceil_mode=True)))
    assert type(wrapped[1]) is LayoutMaxPool2d and wrapped[1].ceil_mode


def test_memory_format_is_nchw_for_group_norm_nets_on_cpu_only():
    bit = create_backbone("resnetv2_18_bit", in_chans=1)
    bn = create_backbone("resnet18", in_chans=1)
    assert memory_format(bit, "cpu") == torch.contiguous_format
    assert memory_format(bn, "cpu") == torch.channels_last
    assert memory_format(bit, torch.device("cuda")) == torch.channels_last


def test_classifier_outputs_do_not_depend_on_layout_in_fp32():
    torch.manual_seed(0)
    for name in ("resnetv2_18_bit", "resnet18"):
        clf = Classifier(name, 2, in_chans=3).eval()
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            a = clf(x)
            clf.to(memory_format=torch.channels_last)
            b = clf(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
