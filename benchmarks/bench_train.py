"""Training-step benchmarks: Lightning (`SimCLRModule` + `make_trainer`) vs a plain PyTorch loop.

Both loops train the same SimCLR model (demo backbone `resnetv2_18_bit` at 64 px) on the same
in-memory batch with the same optimizer, LR schedule and precision, so the ratio is the framework's
overhead (goal: Lightning >= 0.95x the plain loop). bf16 autocast + channels_last vs fp32 is measured
on the plain loop. Images/s counts images (each gives two views through the network).

Example:
    >>> from benchmarks import bench_train; bench_train.run(reduced=True)["figures"][0]["name"]
    'SimCLR resnetv2_18_bit@64 bs4 train plain fp32'
"""

from __future__ import annotations

import math
import time

import torch

try:
    from benchmarks._common import count_flops, fig
except ImportError:  # run as a script from benchmarks/
    from _common import count_flops, fig

BACKBONE, SIZE = "resnetv2_18_bit", 64


def _module():
    from remedis.models import create_backbone
    from remedis.pretrain import SimCLRModule

    torch.manual_seed(0)
    return SimCLRModule(create_backbone(BACKBONE, in_chans=1), temperature=0.1)


def _batch(n: int):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, SIZE, SIZE, generator=g), torch.randn(n, 1, SIZE, SIZE, generator=g)


def plain_loop(batch, steps: int, warmup: int, bf16: bool) -> float:
    """Seconds per step: the loop a user would write by hand (same work as SimCLRModule.training_step)."""
    module = _module()
    module.backbone.to(memory_format=torch.channels_last)  # what SimCLRModule.on_fit_start does
    module.train()
    opt, sched = _optim(module, steps + warmup)
    losses = []

    def step():
        v1, v2 = batch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            z = module.project(torch.cat([v1, v2]))
        loss = module.criterion(*z.float().chunk(2))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.detach().item())  # Lightning's module logs the loss every step too

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if not all(math.isfinite(v) for v in losses):
        raise RuntimeError("plain loop: loss is not finite")
    return (time.perf_counter() - t0) / steps


def _optim(module, total: int):
    # SimCLRModule.configure_optimizers needs a trainer for the step count; same recipe, built directly.
    opt = torch.optim.AdamW(module.parameters(), lr=module.lr, weight_decay=module.weight_decay)
    warm = max(1, int(module.warmup_fraction * total))

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def lightning_loop(batch, steps: int, warmup: int, bf16: bool) -> float:
    import lightning as L
    from torch.utils.data import DataLoader, Dataset

    from remedis.config import RuntimeConfig
    from remedis.training import make_trainer, quiet_lightning

    class Same(Dataset):
        def __len__(self):
            return steps + warmup

        def __getitem__(self, i):
            return batch

    class Timer(L.Callback):
        t0 = t1 = 0.0

        def on_train_batch_start(self, trainer, pl_module, b, batch_idx):
            if batch_idx == warmup:
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, b, batch_idx):
            self.t1 = time.perf_counter()

    quiet_lightning()
    timer = Timer()
    runtime = RuntimeConfig(precision="bf16" if bf16 else "fp32", accelerator="cpu")
    module = _module()
    trainer = make_trainer(runtime, epochs=1, progress=False, callbacks=[timer])
    trainer.fit(module, DataLoader(Same(), batch_size=None, num_workers=0))
    if not all(math.isfinite(h["nt_xent"]) for h in module.history):
        raise RuntimeError("Lightning loop: loss is not finite")
    return (timer.t1 - timer.t0) / steps


def run(reduced: bool) -> dict:
    n, steps, warmup = (4, 2, 1) if reduced else (32, 6, 2)
    batch = _batch(n)
    m = _module()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        step_flops = count_flops(lambda: m.criterion(*m.project(torch.cat(batch)).float().chunk(2)).backward())
    figures = []
    # Best of `repeats`, interleaved: on a shared machine the fastest run is the least disturbed one.
    best: dict[str, float] = {}
    for _ in range(1 if reduced else 3):
        for key, loop, bf16 in (("p32", plain_loop, False), ("p16", plain_loop, True),
                                ("l16", lightning_loop, True), ("l32", lightning_loop, False)):
            best[key] = max(best.get(key, 0.0), n / loop(batch, steps, warmup, bf16))
    plain32, plain16, light16, light32 = best["p32"], best["p16"], best["l16"], best["l32"]
    label = f"SimCLR {BACKBONE}@{SIZE} bs{n}"
    figures.append(fig(f"{label} train plain fp32", plain32, "img/s", None, None, gflops=step_flops / n * plain32 / 1e9))
    figures.append(fig(f"{label} train plain bf16+CL", plain16, "img/s", plain32, "plain fp32",
                       gflops=step_flops / n * plain16 / 1e9))
    figures.append(fig(f"{label} train Lightning bf16", light16, "img/s", plain16, "plain bf16+CL", goal="ratio >= 0.95"))
    figures.append(fig(f"{label} train Lightning fp32", light32, "img/s", plain32, "plain fp32", goal="ratio >= 0.95"))
    return {"figures": figures}


if __name__ == "__main__":
    import json
    import sys

    torch.set_num_threads(1)
    print(json.dumps(run(reduced="--reduced" in sys.argv), indent=1))
