"""Memory layout: which tensor layout each backbone runs fastest in, and a max-pool that is fast in both.

Measured on this project's CPU (AVX-512 BF16, 1 thread, bf16 autocast; `benchmarks/bench_compute.py`):
- PyTorch's CPU max-pool is 15x slower on NCHW tensors than on channels_last ones (66 vs 4.4 ms for
  the BiT stem's 32x64x66x66 map): it was a fifth of a ResNetV2-18's forward pass.
  `LayoutMaxPool2d` pools in channels_last and hands back the layout it was given.
- GroupNorm (the BiT norm) is several times slower on channels_last tensors on CPU, and copies them;
  BatchNorm is not. So on CPU a network with GroupNorm runs NCHW, one with BatchNorm channels_last;
  on GPUs channels_last always (tensor-core convolutions).
  Against channels_last everywhere with a plain max-pool (`bench_compute.layout_figures`), the
  BiT ResNetV2-18 infers 1.29-1.30x faster and trains 1.08-1.10x faster; resnet18 is unchanged.

Example:
    >>> fmt = memory_format(net, "cpu")            # torch.contiguous_format for a BiT ResNetV2
    >>> net.to(memory_format=fmt); y = net(x.contiguous(memory_format=fmt))
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn


class LayoutMaxPool2d(nn.MaxPool2d):
    """`nn.MaxPool2d` computed on a channels_last view (the fast CPU kernel), returned in the input's
    layout so the layers after it keep theirs. Exactly the same values: a max does not depend on layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Max pooling that keeps the input's memory layout."""
        if x.dim() != 4 or x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            return super().forward(x)  # already channels_last (or not an image batch): nothing to do
        return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous()


def use_layout_pooling(net: nn.Module) -> nn.Module:
    """Swap every plain `nn.MaxPool2d` in `net` for `LayoutMaxPool2d` (same settings, no weights)."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.MaxPool2d:
                setattr(parent, name, LayoutMaxPool2d(child.kernel_size, child.stride, child.padding, child.dilation,
                                                      child.return_indices, child.ceil_mode))
    return net


def memory_format(net: nn.Module, device: str | torch.device) -> torch.memory_format:
    """The layout `net` runs fastest in on `device` (see the module docstring for the measurements)."""
    if torch.device(device).type == "cpu" and any(isinstance(m, nn.GroupNorm) for m in net.modules()):
        return torch.contiguous_format
    return torch.channels_last


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def fast_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 autocast is fast on this device: a CUDA GPU with bf16, or a CPU with native bf16
    instructions (AVX-512 BF16 or AMX). Elsewhere it is emulated: measured on an AVX2-only AMD EPYC
    (Zen 2), a resnet18 training step at 64 px took 12.8 s in bf16 against 0.95 s in fp32.

    `REMEDIS_BF16=1` / `0` overrides the detection.

    Example:
        >>> fast_bf16("cpu")   # False on an AVX2-only CPU
        False
    """
    forced = os.environ.get("REMEDIS_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})
