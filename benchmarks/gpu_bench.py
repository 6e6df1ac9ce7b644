"""GPU benchmarks (run by `benchmarks/gpu.sh`): SimCLR ResNet-50 @224 training and adapted-model inference.

Figures (each written to the output JSON as soon as it is measured, so a cut-off run keeps them):
- matmul bf16 / fp32 TFLOP/s at 8192^3: the card's measured limit (reference for MFU);
- SimCLR ResNet-50 @224 training, bf16 autocast + channels_last: images/s (one image = one view through
  the network) and MFU against the H100 datasheet dense bf16 peak (989 TFLOP/s) and the measured matmul;
  plain loop eager / torch.compile, Lightning (`make_trainer`) eager, plain loop fp32;
- adapted-model inference (`AdaptedModel.logits`, batch 256, bf16): ResNet-50 @224 and the demo
  `resnetv2_18_bit` @64, eager and compiled.
Batches live on the GPU already: these figures are the model + framework, not host-to-device copies.

Example:
    python benchmarks/gpu_bench.py --output /tmp/gpu.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_history, count_flops, environment, fig, matmul_gflops, sync  # noqa: E402

H100_BF16_DENSE_TFLOPS = 989.0  # datasheet, SXM, dense
DEV = "cuda"  # --device cpu runs the same code on the CPU (a dry run of the script)


class Recorder:
    def __init__(self, path: Path | None):
        self.path, self.figures = path, []
        self.result = {"suite": "gpu", "environment": environment(DEV), "figures": self.figures}

    def add(self, f: dict) -> None:
        self.figures.append(f)
        print(f"{f['name']:<58} {f['value']:>10.1f} {f['unit']:<10} ratio={f['ratio']}", flush=True)
        if self.path:
            self.path.write_text(json.dumps(self.result, indent=1))


def simclr_module(precision_bf16: bool = True):
    from remedis.models import create_backbone
    from remedis.pretrain import SimCLRModule

    m = SimCLRModule(create_backbone("resnet50", in_chans=1), temperature=0.1).to(DEV)
    return m.to(memory_format=torch.channels_last)


def views(n: int, size: int = 224):
    g = torch.Generator(device=DEV).manual_seed(0)
    return (torch.randn(n, 1, size, size, device=DEV, generator=g),
            torch.randn(n, 1, size, size, device=DEV, generator=g))


def plain_loop(module, batch, steps: int, warmup: int, bf16: bool) -> float:
    """Seconds per step of a hand-written loop: same model, loss, optimizer and precision as Lightning."""
    opt = torch.optim.AdamW(module.parameters(), lr=module.lr, weight_decay=module.weight_decay)
    module.train()

    def step():
        v1, v2 = batch
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=bf16):
            z = module.project(torch.cat([v1, v2]))
        z1, z2 = z.float().chunk(2)
        loss = module.criterion(z1, z2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for _ in range(warmup):
        step()
    sync(DEV)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync(DEV)
    assert torch.isfinite(loss), "training diverged"
    return (time.perf_counter() - t0) / steps


def lightning_loop(module, batch, steps: int, warmup: int) -> float:
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
                sync(DEV)
                self.t0 = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            sync(DEV)
            self.t1 = time.perf_counter()

    quiet_lightning()
    timer = Timer()
    runtime = RuntimeConfig(precision="bf16", accelerator="gpu" if DEV == "cuda" else "cpu")
    trainer = make_trainer(runtime, epochs=1, progress=False, callbacks=[timer])
    trainer.fit(module, DataLoader(Same(), batch_size=None, num_workers=0))
    return (timer.t1 - timer.t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", type=Path)
    ap.add_argument("--batch", type=int, default=256, help="SimCLR images per step (2x views go through the net)")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the script runs")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--history", type=Path, help="append the figures to this history JSON (e.g. benchmarks/history.json)")
    ap.add_argument("--label", default="gpu", help="a note stored with the run in --history")
    args = ap.parse_args()
    global DEV
    DEV = args.device
    if DEV == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_bench: no CUDA device")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 figures mean fp32
    rec = Recorder(args.output)
    n_mm = 2048 if args.quick else 8192
    bs, steps, warm = (8, 2, 1) if args.quick else (args.batch, args.steps, 5)

    bf16_peak = matmul_gflops(torch.bfloat16, n_mm, DEV, iters=10) / 1e3
    rec.add(fig("matmul bf16 8192^3", bf16_peak, "TFLOP/s", H100_BF16_DENSE_TFLOPS, "H100 datasheet bf16 dense"))
    fp32_peak = matmul_gflops(torch.float32, n_mm, DEV, iters=5) / 1e3
    rec.add(fig("matmul fp32 8192^3 (no tf32)", fp32_peak, "TFLOP/s", bf16_peak, "matmul bf16"))

    # --- SimCLR ResNet-50 @224 training ---
    batch = views(bs)
    module = simclr_module()
    with torch.autocast(DEV, dtype=torch.bfloat16):
        step_flops = count_flops(lambda m=module: m.criterion(*m.project(torch.cat(batch)).float().chunk(2)).backward())
    module.zero_grad(set_to_none=True)
    imgs = 2 * bs  # views through the network per step

    def report(name: str, sec: float, **extra):
        ips = imgs / sec
        tflops = step_flops / sec / 1e12
        rec.add(fig(f"SimCLR R50@224 train {name}", ips, "img/s", 2000.0, "goal 2000 img/s", goal=">= 2000 img/s",
                    batch_views=imgs, tflops=tflops, mfu_datasheet=tflops / H100_BF16_DENSE_TFLOPS,
                    mfu_measured_matmul=tflops / bf16_peak, **extra))
        return ips

    eager = report("plain bf16 eager", plain_loop(module, batch, steps, warm, True))
    rec.add(fig("SimCLR R50@224 MFU plain bf16 eager", 100 * step_flops * eager / imgs / 1e12 / H100_BF16_DENSE_TFLOPS,
                "% of 989 TF", 40.0, "goal 40% MFU", goal=">= 40%"))
    light = lightning_loop(simclr_module(), batch, steps, warm)
    rec.add(fig("SimCLR R50@224 train Lightning bf16 eager", imgs / light, "img/s", eager, "plain loop bf16 eager",
                goal="ratio >= 0.95"))
    report("plain fp32 eager", plain_loop(simclr_module(), batch, steps, warm, False))
    if DEV == "cuda":
        torch.cuda.empty_cache()

    m = simclr_module()
    m.project = torch.compile(m.project)
    t0 = time.perf_counter()
    plain_loop(m, batch, 1, 2, True)  # compiles forward and backward
    compile_s = time.perf_counter() - t0
    comp = report("plain bf16 torch.compile", plain_loop(m, batch, steps, warm, True), compile_s=compile_s)
    rec.add(fig("SimCLR R50@224 MFU plain bf16 compiled", 100 * step_flops * comp / imgs / 1e12 / H100_BF16_DENSE_TFLOPS,
                "% of 989 TF", 40.0, "goal 40% MFU", goal=">= 40%"))
    rec.add(fig("SimCLR R50@224 train compile speed-up", comp, "img/s", eager, "eager", compile_s=compile_s))
    del m, module
    if DEV == "cuda":
        torch.cuda.empty_cache()

    # --- adapted-model inference, batch 256, bf16 ---
    from remedis.adapt import AdaptedModel
    from remedis.data.preprocess import Preprocessing
    from remedis.models import Classifier

    for arch, size in (("resnet50", 224), ("resnetv2_18_bit", 64)):
        n = 8 if args.quick else 256
        model = AdaptedModel(Classifier(arch, 2, 1), ["benign", "malignant"], Preprocessing(image_size=size)).to(DEV)
        x = torch.randn(n, 1, size, size, device=DEV)
        fwd_flops = count_flops(lambda: model.logits(x))

        def ips(fn, reps=3 if args.quick else 20):
            for _ in range(3):
                fn()
            sync(DEV)
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            sync(DEV)
            return n * reps / (time.perf_counter() - t0)

        e = ips(lambda: model.logits(x))
        rec.add(fig(f"adapted {arch}@{size} infer bs{n} bf16 eager", e, "img/s", None, None,
                    tflops=fwd_flops / n * e / 1e12, mfu_datasheet=fwd_flops / n * e / 1e12 / H100_BF16_DENSE_TFLOPS))
        model.classifier = torch.compile(model.classifier)
        t0 = time.perf_counter()
        model.logits(x)
        cs = time.perf_counter() - t0
        c = ips(lambda: model.logits(x))
        rec.add(fig(f"adapted {arch}@{size} infer bs{n} bf16 compiled", c, "img/s", e, "eager", compile_s=cs,
                    tflops=fwd_flops / n * c / 1e12, mfu_datasheet=fwd_flops / n * c / 1e12 / H100_BF16_DENSE_TFLOPS))
    if args.history:
        append_history(args.history, args.label, "quick" if args.quick else "full", rec.result["environment"], rec.figures)
    print("done", flush=True)


if __name__ == "__main__":
    main()
