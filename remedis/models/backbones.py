"""Backbones built by name through timm.

Every backbone is a timm model created with `num_classes=0`, so `forward_features` gives the feature
map and `forward_head` the pooled embedding; heads live in remedis. Names are timm's own
(`resnet18`, `resnet50`, `resnetv2_50x1_bit`, `resnetv2_101x1_bit`, ...) plus `resnetv2_18_bit` and
`resnetv2_34_bit`: timm's ResNetV2 with the BiT layers (weight-standardised convs + GroupNorm) at
CPU-friendly depth.

Example:
    >>> net = create_backbone("resnetv2_18_bit", in_chans=1)
    >>> emb = net.forward_head(net.forward_features(torch.zeros(2, 1, 64, 64)))   # (2, 512)
"""

from __future__ import annotations

from functools import partial

import timm
import torch.nn as nn
from timm.layers import GroupNormAct, StdConv2d

from remedis.models.layout import use_layout_pooling

# Small BiT-style ResNetV2s: same StdConv2d + GroupNorm(32) layers as timm's BiT models.
_BIT_SMALL = {"resnetv2_18_bit": "resnetv2_18", "resnetv2_34_bit": "resnetv2_34"}


def create_backbone(name: str, in_chans: int = 1) -> nn.Module:
    # Max-pools run in channels_last whatever the layout around them (15x faster on CPU; layout.py).
    """A timm backbone by name with `in_chans` input channels and no classifier head (no pretrained download)."""
    return use_layout_pooling(_create(name, in_chans))


def _create(name: str, in_chans: int) -> nn.Module:
    if name in _BIT_SMALL:
        return timm.create_model(
            _BIT_SMALL[name],
            pretrained=False,
            num_classes=0,
            in_chans=in_chans,
            conv_layer=StdConv2d,
            norm_layer=partial(GroupNormAct, num_groups=32),
            stem_type="fixed",
        )
    if not timm.is_model(name):
        raise ValueError(f"unknown backbone {name!r}: use a timm model name or one of {sorted(_BIT_SMALL)}")
    # pretrained=False always: weights come from a local file (no downloads at run time).
    return timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans)


def embedding_dim(backbone: nn.Module) -> int:
    """Width of the backbone's pooled features."""
    return int(backbone.num_features)


def backbone_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The backbone as [stem, block 0, block 1, ...] for partial fine-tuning (REMEDIS's
    `fine_tune_after_block`). Works for timm ResNet (layer1..4) and ResNetV2 (stages)."""
    if hasattr(backbone, "stages"):  # timm ResNetV2 / BiT
        return [backbone.stem, *backbone.stages]
    if hasattr(backbone, "layer1"):  # timm ResNet
        stem = nn.ModuleList([m for m in (backbone.conv1, backbone.bn1) if m is not None])
        return [stem, backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4]
    raise ValueError(f"partial fine-tuning: no block structure known for {type(backbone).__name__}")


def fold_std_conv(net: nn.Module) -> nn.Module:
    """Replace each timm StdConv2d by a plain Conv2d holding its standardised weight (inference only).

    Weight standardisation recomputes each filter's mean/variance on every forward pass; frozen
    weights need it once. Same outputs (to ~1e-6), +60% images/s for the BiT-style demo model on CPU.
    """
    import torch
    import torch.nn.functional as F
    from timm.layers import StdConv2d

    for parent in list(net.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, StdConv2d) and not getattr(child, "same_pad", False):
                conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                                 child.dilation, child.groups, bias=child.bias is not None)
                with torch.no_grad():
                    w = child.weight
                    conv.weight.copy_(F.batch_norm(w.reshape(1, child.out_channels, -1), None, None, training=True,
                                                   momentum=0.0, eps=child.eps).reshape_as(w))
                    if child.bias is not None:
                        conv.bias.copy_(child.bias)
                setattr(parent, child_name, conv.to(w.device))
    return net
