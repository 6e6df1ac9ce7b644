"""Compute benchmarks: the machine's matmul limit and conv backbone inference against it.

Figures:
- matmul fp32 and bf16 GFLOP/s (n x n x n, random data): the machine's limit, measured in this process;
- per backbone (`resnet18`, `resnet50`, `resnetv2_50x1_bit` @224, `resnetv2_18_bit` @64, the demo size),
  inference images/s in fp32 (contiguous) and bf16 autocast + channels_last, and achieved GFLOP/s
  (FLOPs counted by torch's FlopCounterMode) as a fraction of the bf16 matmul peak (goal >= 30%);
- torch.compile for inference: compile time, and images/s compiled vs eager (bf16 + channels_last);
  full mode compiles `resnetv2_18_bit`@64 and `resnet50`@224, reduced mode `resnet10t`@32 (compile time
  is the cost there); `BENCH_COMPILE_TARGETS=name@size,...` picks others;
- remedis's memory layout (`remedis.models.layout`) against channels_last everywhere with a plain
  max-pool, for the BiT demo backbone and resnet18 @128: inference and a bf16 training step;
- BiT backbones with weight standardisation folded for inference (`fold_std_conv`) vs as trained:
  StdConv2d re-standardises every weight on every forward pass, a cost that inference need not pay.

Example:
    >>> from benchmarks import bench_compute; bench_compute.run(reduced=True)["figures"][0]["name"]
    'matmul fp32'
"""

from __future__ import annotations

import os
import tempfile
import time

import torch
import torch.nn as nn

try:
    from benchmarks._common import count_flops, fig, matmul_gflops, time_per_call
except ImportError:  # run as a script from benchmarks/
    from _common import count_flops, fig, matmul_gflops, time_per_call

from remedis.models.backbones import fold_std_conv

BACKBONES = [("resnet18", 224), ("resnet50", 224), ("resnetv2_50x1_bit", 224), ("resnetv2_18_bit", 64)]


def _model(name: str, channels_last: bool) -> torch.nn.Module:
    from remedis.models import create_backbone

    torch.manual_seed(0)
    net = create_backbone(name, in_chans=1).eval()
    return net.to(memory_format=torch.channels_last) if channels_last else net


def _infer(net: torch.nn.Module, x: torch.Tensor, bf16: bool):
    def call():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return net(x)
    return call


def backbone_figures(name: str, size: int, batch: int, iters: int, bf16_peak: float) -> list[dict]:
    x32 = torch.randn(batch, 1, size, size, generator=torch.Generator().manual_seed(0))
    net = _model(name, channels_last=False)
    flops_per_image = count_flops(_infer(net, x32[:1], bf16=False))
    out = []
    t32 = time_per_call(_infer(net, x32, bf16=False), warmup=1, iters=iters)
    netcl = net.to(memory_format=torch.channels_last)
    xcl = x32.contiguous(memory_format=torch.channels_last)
    t16 = time_per_call(_infer(netcl, xcl, bf16=True), warmup=1, iters=iters)
    ips32, ips16 = batch / t32, batch / t16
    label = f"{name}@{size}"
    out.append(fig(f"{label} infer fp32", ips32, "img/s", None, None, batch=batch,
                   gflops=flops_per_image * ips32 / 1e9, gflop_per_image=flops_per_image / 1e9))
    out.append(fig(f"{label} infer bf16+CL", ips16, "img/s", ips32, "fp32 eager", batch=batch,
                   gflops=flops_per_image * ips16 / 1e9))
    out.append(fig(f"{label} bf16+CL achieved / bf16 matmul peak", flops_per_image * ips16 / 1e9, "GFLOP/s", bf16_peak,
                   "matmul bf16", goal="ratio >= 0.30"))
    return out


def fold_figures(name: str, size: int, batch: int, iters: int) -> list[dict]:
    x = torch.randn(batch, 1, size, size, generator=torch.Generator().manual_seed(1))
    net = _model(name, channels_last=True)
    with torch.inference_mode():
        ref = net(x)
    folded = fold_std_conv(_model(name, channels_last=True)).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        err = float((folded(x) - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    if err > 1e-4:  # folding must not change the function (fp32 cross-check against timm's StdConv2d)
        raise RuntimeError(f"fold_std_conv changed {name}'s output: relative max error {err:.2e}")
    xcl = x.contiguous(memory_format=torch.channels_last)
    before = batch / time_per_call(_infer(net, xcl, bf16=True), warmup=1, iters=iters)
    after = batch / time_per_call(_infer(folded, xcl, bf16=True), warmup=1, iters=iters)
    gflop = count_flops(_infer(folded, xcl[:1], bf16=False)) / 1e9
    return [fig(f"{name}@{size} infer bf16+CL StdConv folded", after, "img/s", before, "as trained (StdConv2d)",
                batch=batch, fold_rel_error=err, gflops=gflop * after, gflops_before=gflop * before)]


def layout_figures(name: str, size: int, batch: int, iters: int) -> list[dict]:
    """remedis's layout choice (`remedis.models.layout`: channels_last max-pool, NCHW for GroupNorm nets
    on CPU) against channels_last everywhere with a plain max-pool, bf16: inference and a training step."""
    from remedis.models.layout import memory_format

    def plain_pools(net):
        for parent in list(net.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.MaxPool2d):
                    setattr(parent, child_name, nn.MaxPool2d(child.kernel_size, child.stride, child.padding,
                                                             child.dilation, child.return_indices, child.ceil_mode))
        return net

    x = torch.randn(batch, 1, size, size, generator=torch.Generator().manual_seed(2))
    old = plain_pools(_model(name, channels_last=True))
    new = _model(name, channels_last=False)
    fmt = memory_format(new, "cpu")
    new.to(memory_format=fmt)
    xcl, xnew = x.contiguous(memory_format=torch.channels_last), x.contiguous(memory_format=fmt)
    with torch.inference_mode():
        err = float((new(x) - old(x)).abs().max() / old(x).abs().max().clamp_min(1e-12))
    if err > 1e-4:  # the layout must not change the function (fp32)
        raise RuntimeError(f"layout changed {name}'s output: relative max error {err:.2e}")
    before = batch / time_per_call(_infer(old, xcl, bf16=True), warmup=1, iters=iters)
    after = batch / time_per_call(_infer(new, xnew, bf16=True), warmup=1, iters=iters)

    def train_step(net, inp):
        net.train()

        def call():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = net(inp).float().square().mean()
            loss.backward()
        return call
    t_before = time_per_call(train_step(old, xcl), warmup=1, iters=iters)
    t_after = time_per_call(train_step(new, xnew), warmup=1, iters=iters)
    fmt_name = "NCHW" if fmt == torch.contiguous_format else "channels_last"
    return [fig(f"{name}@{size} infer bf16 remedis layout ({fmt_name})", after, "img/s", before,
                "channels_last + plain max-pool", batch=batch, rel_error=err),
            fig(f"{name}@{size} train step bf16 remedis layout ({fmt_name})", batch / t_after, "img/s",
                batch / t_before, "channels_last + plain max-pool", batch=batch)]


def _compile_targets(reduced: bool) -> list[tuple[str, int]]:
    env = os.environ.get("BENCH_COMPILE_TARGETS")
    if env == "none":  # no torch.compile figures (a cold compile is the slowest part on a small CPU)
        return []
    if env:
        return [(t.split("@")[0], int(t.split("@")[1])) for t in env.split(",") if t]
    # Full: the demo backbone (what adapt and serving run) and resnet50. Reduced: the smallest timm ResNet,
    # since compiling the demo backbone alone takes 80-90 s on 2 shared cores.
    return [("resnet10t", 32)] if reduced else [("resnetv2_18_bit", 64), ("resnet50", 224)]


def compile_figures(name: str, size: int, batch: int, iters: int) -> list[dict]:
    torch._dynamo.reset()
    net = _model(name, channels_last=True)
    x = torch.randn(batch, 1, size, size).contiguous(memory_format=torch.channels_last)
    eager = batch / time_per_call(_infer(net, x, bf16=True), warmup=1, iters=iters)
    compiled = torch.compile(net)
    # Cold compile: a fresh inductor cache, so the time is what a first run (a new machine) pays.
    saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        try:
            t0 = time.perf_counter()
            _infer(compiled, x, bf16=True)()
            compile_s = time.perf_counter() - t0
        finally:
            if saved is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved
    comp = batch / time_per_call(_infer(compiled, x, bf16=True), warmup=1, iters=iters)
    label = f"{name}@{size}"
    return [fig(f"{label} infer bf16+CL torch.compile", comp, "img/s", eager, "eager bf16+CL", batch=batch,
                compile_s=compile_s),
            fig(f"{label} torch.compile time (cold cache)", compile_s, "s", None, None)]


def run(reduced: bool) -> dict:
    # The limit is the best rate over sizes and repeats: on a CPU shared with other jobs, sizes whose
    # operands leave the per-core L2 (n >= 1024 here) lose 2-3x to contention in the shared L3.
    sizes = (256, 512) if reduced else (256, 512, 1024)
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        best[dtype] = max((matmul_gflops(dtype, n, iters=3), n) for n in sizes for _ in range(2))
    (fp32, n32), (bf16, n16) = best[torch.float32], best[torch.bfloat16]
    figures = [fig("matmul fp32", fp32, "GFLOP/s", None, None, n=n32),
               fig("matmul bf16", bf16, "GFLOP/s", fp32, "matmul fp32", n=n16)]
    batch, iters = (2, 2) if reduced else (16, 5)
    for name, size in BACKBONES:
        figures += backbone_figures(name, size, batch, iters, bf16)
    for name, size in (("resnetv2_18_bit", 64), ("resnetv2_50x1_bit", 224)):
        figures += fold_figures(name, size, batch, iters)
    for name, size in (("resnetv2_18_bit", 64 if reduced else 128), ("resnet18", 64 if reduced else 128)):
        figures += layout_figures(name, size, batch, iters)
    for name, size in _compile_targets(reduced):
        figures += compile_figures(name, size, batch, iters)
    return {"figures": figures}


if __name__ == "__main__":
    import json
    import sys

    torch.set_num_threads(1)
    print(json.dumps(run(reduced="--reduced" in sys.argv), indent=1))
