"""Streaming pretraining from litdata shards (issue 18): write speed, streaming speed and memory, and
whether the loader keeps a SimCLR step fed. JSON to --out.

  write        `write_shards` (read, hash, decode, quantise, write chunks) vs raw decode of the same files
               (read + `remedis.data.cache.decode`) with the same number of processes. Target >= 0.9x.
               Measured on sources of the network size (no resize: decoding is cheapest, the fixed
               per-image costs of hashing and writing weigh most) and on 2x larger sources (--source-size).
  stream       one epoch from the shards: decoded samples/s (no augmentation) in this process and its
               RssAnon growth (anonymous memory: chunk pages are mmap'd file pages, not the dataset in
               RAM), then SimCLR training items/s (two augmented views) with the loader's workers.
  simclr_step  items/s a SimCLR step consumes (ResNet-50, 224 px, 3-channel input, bf16 autocast where native,
               channels_last, AdamW) on this machine; loader/step ratio target >= 10x.

Synthetic sources: 8-bit grey PNGs (smooth blobs + speckle), 3 sites, 3 images per patient.

    .venv/bin/python benchmarks/bench_shards.py                          # 2,000 images, 224 px
    .venv/bin/python benchmarks/bench_shards.py --images 200000 --size 224 --workers 16   # the issue's size
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

try:
    from benchmarks._common import environment, fig
except ImportError:  # run as a script from benchmarks/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks._common import environment, fig

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "shards.json"


def rss_anon() -> int:
    """Anonymous resident memory of this process (bytes), from /proc/self/status; 0 elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _write_image(args) -> None:
    from PIL import Image

    path, i, size = args
    rng = np.random.default_rng(i)
    small = rng.random((8, 8)).astype(np.float32)
    img = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR), dtype=np.float32)
    img = img * rng.gamma(4.0, 0.25, (size, size))
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L").save(path, format="PNG", compress_level=1)


def make_sources(folder: Path, n: int, size: int, workers: int) -> list:
    from remedis.data.manifest import Record

    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder / f"img{i:07d}.png", i, size) for i in range(n)]
    with multiprocessing.get_context("fork").Pool(max(1, workers)) as pool:
        pool.map(_write_image, jobs, chunksize=64)
    return [Record(p, "", f"site-{i % 3}", f"p{i // 3:07d}") for p, i, _ in jobs]


def _raw_decode(args) -> int:
    from remedis.data.cache import decode

    path, pre = args
    decode(path, pre, path.read_bytes())
    return 1


def _one_thread(_=None) -> None:
    torch.set_num_threads(1)


def measure_write(records, pre, workers: int, folder: Path, repeat: int) -> dict:
    from remedis.data.shards import write_shards

    for r in records:  # page cache warm for both contenders
        r.image.read_bytes()
    write_shards(records[:8], pre, folder / "warm-up", num_workers=workers)  # first-use imports are not measured
    raw, write = [], []
    for k in range(repeat):
        t0 = time.perf_counter()
        with multiprocessing.get_context("fork").Pool(max(1, workers), initializer=_one_thread) as pool:
            done = sum(pool.imap_unordered(_raw_decode, [(r.image, pre) for r in records], chunksize=32))
        raw.append(time.perf_counter() - t0)
        assert done == len(records)
        out = folder / f"shards{k}"
        t0 = time.perf_counter()
        shards = write_shards(records, pre, out, num_workers=workers)
        write.append(time.perf_counter() - t0)
        if k < repeat - 1:
            shutil.rmtree(out)
    n = len(records)
    return {"raw_decode_images_per_s": n / min(raw), "write_images_per_s": n / min(write), "shards": shards,
            "shard_bytes": sum(p.stat().st_size for p in shards.folder.iterdir())}


def measure_stream(shards, batch: int, workers: int, size: int, in_chans: int, train_items: int | None = None) -> dict:
    from dataclasses import replace

    from remedis.data.streaming import ShardDataset, ShardLoader, StreamingTwoView, sample_pixels
    from remedis.training.transforms import SimCLRAugment

    class Pixels(ShardDataset):
        def item(self, sample, epoch):
            return sample_pixels(sample)[0]

    loader = ShardLoader(Pixels(shards, seed=0), batch, drop_last=True)
    peak, stop = [rss_anon()], threading.Event()

    def sample_rss():
        while not stop.wait(0.01):
            peak.append(rss_anon())

    watcher = threading.Thread(target=sample_rss, daemon=True)
    start = rss_anon()
    watcher.start()
    t0 = time.perf_counter()
    items = sum(len(b) for b in loader)
    raw_s = time.perf_counter() - t0
    stop.set()
    watcher.join()
    growth = max(peak + [rss_anon()]) - start

    pre = replace(shards.preprocessing, in_chans=in_chans)
    aug = SimCLRAugment(size, seed=0)
    loader = ShardLoader(StreamingTwoView(shards, aug, pre, seed=0), batch, drop_last=True, num_workers=workers)
    t0 = time.perf_counter()
    pairs = 0
    for v1, _v2 in loader:
        pairs += len(v1)
        if train_items and pairs >= train_items:  # the rate is steady long before a 200k epoch ends
            break
    aug_s = time.perf_counter() - t0
    return {"raw_items_per_s": items / raw_s, "raw_items": items, "rss_anon_growth_mb": growth / 2**20,
            "rss_anon_start_mb": start / 2**20, "train_items_per_s": pairs / aug_s, "train_items": pairs}


def measure_step(arch: str, size: int, batch: int, steps: int) -> dict:
    from remedis.models.backbones import create_backbone
    from remedis.pretrain.simclr import SimCLRModule

    torch.manual_seed(0)
    module = SimCLRModule(create_backbone(arch, 3))
    module.memory_format = torch.channels_last
    module.backbone.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    v1, v2 = torch.randn(batch, 3, size, size), torch.randn(batch, 3, size, size)

    from remedis.models.layout import fast_bf16

    bf16 = fast_bf16("cpu")  # what `runtime.precision: auto` trains with here (emulated bf16 is 10-30x slower)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            z = module.project(torch.cat([v1, v2]))
        z1, z2 = z.float().chunk(2)
        loss = module.criterion(z1, z2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"items_per_s": batch / float(np.median(times)), "seconds_per_step": float(np.median(times)), "batch": batch,
            "precision": "bf16" if bf16 else "fp32"}


def measure(images: int, size: int, workers: int, batch: int, arch: str, step_batch: int, steps: int, repeat: int,
            step_size: int | None = None, source_size: int | None = None, train_items: int | None = None) -> dict:
    from remedis.data.preprocess import Preprocessing

    t_start = time.perf_counter()
    step_size = step_size or size
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        records = make_sources(tmp / "src", images, size, workers)
        sources_s = time.perf_counter() - t0
        pre = Preprocessing(image_size=size)
        w = measure_write(records, pre, workers, tmp, repeat)
        s = measure_stream(w["shards"], batch, workers, size, in_chans=3, train_items=train_items)
        shutil.rmtree(tmp / "src")
        large = None
        if source_size:
            big = make_sources(tmp / "big", images, source_size, workers)
            large = measure_write(big, pre, workers, tmp / "bigshards", repeat)
    step = measure_step(arch, step_size, step_batch, steps)
    write_ratio = w["write_images_per_s"] / w["raw_decode_images_per_s"]
    large_ratio = large["write_images_per_s"] / large["raw_decode_images_per_s"] if large else None
    feed_ratio = s["train_items_per_s"] / step["items_per_s"]
    figures = [
        fig("shards write", w["write_images_per_s"], "images/s", reference=w["raw_decode_images_per_s"],
            reference_name=f"raw decode, {workers} processes", goal=">= 0.9x"),
        *([fig(f"shards write {source_size}->{size} px", large["write_images_per_s"], "images/s",
                reference=large["raw_decode_images_per_s"], reference_name=f"raw decode, {workers} processes",
                goal=">= 0.9x")] if large else []),
        fig("shards stream raw", s["raw_items_per_s"], "images/s"),
        fig("shards stream RssAnon growth", s["rss_anon_growth_mb"], "MB"),
        fig("shards stream SimCLR items", s["train_items_per_s"], "items/s", reference=step["items_per_s"],
            reference_name=f"SimCLR step {arch}@{step_size} bf16", goal=">= 10x"),
        fig(f"SimCLR step {arch}@{step_size} bf16", step["items_per_s"], "items/s"),
    ]
    return {
        "config": {"images": images, "size": size, "source_size": source_size, "workers": workers, "batch": batch, "arch": arch,
                   "step_size": step_size, "step_batch": step_batch, "steps": steps, "repeat": repeat, "train_items": train_items,
                   "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()},
        "sources_seconds": round(sources_s, 2),
        "write": {"raw_decode_images_per_s": round(w["raw_decode_images_per_s"], 1),
                  "write_images_per_s": round(w["write_images_per_s"], 1), "ratio": round(write_ratio, 3),
                  "target": 0.9, "shard_mb": round(w["shard_bytes"] / 2**20, 1),
                  "samples": len(w["shards"]), "dtypes": w["shards"].meta["dtypes"], "source_size": size},
        "write_large_sources": None if not large else {
            "source_size": source_size, "raw_decode_images_per_s": round(large["raw_decode_images_per_s"], 1),
            "write_images_per_s": round(large["write_images_per_s"], 1), "ratio": round(large_ratio, 3), "target": 0.9},
        "stream": {k: round(v, 1) if isinstance(v, float) else v for k, v in s.items()},
        "simclr_step": {k: round(v, 3) if isinstance(v, float) else v for k, v in step.items()},
        "loader_vs_step": {"ratio": round(feed_ratio, 2), "target": 10.0},
        "figures": figures,
        "environment": environment(),
        "seconds": round(time.perf_counter() - t_start, 1),
    }


def run(reduced: bool) -> dict:
    """Entry point for benchmarks/run.py (reduced: 300 images at 64 px, ResNet-18 step at 64 px)."""
    if reduced:
        return measure(300, 64, 2, 32, "resnet18", 8, 2, 1, source_size=128)
    return measure(2000, 224, 2, 32, "resnet50", 16, 3, 2, source_size=448)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000, help="synthetic source images (the issue's full size: 200000)")
    p.add_argument("--size", type=int, default=224, help="image side (sources and network input)")
    p.add_argument("--source-size", type=int, default=None, help="also measure writing sources of this side (default 2x size; 0: skip)")
    p.add_argument("--workers", type=int, default=2, help="processes for decoding/writing and loader workers")
    p.add_argument("--batch", type=int, default=32, help="loader batch size")
    p.add_argument("--arch", default="resnet50", help="backbone of the SimCLR step")
    p.add_argument("--step-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeat", type=int, default=2, help="write/raw passes; the best is reported")
    p.add_argument("--train-items", type=int, default=None, help="stop the augmented stream after N items (default: one epoch)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON output path")
    args = p.parse_args(argv)
    source = 2 * args.size if args.source_size is None else args.source_size
    result = measure(args.images, args.size, args.workers, args.batch, args.arch, args.step_batch, args.steps, args.repeat,
                     source_size=source or None, train_items=args.train_items)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("write", "write_large_sources", "stream", "simclr_step", "loader_vs_step")}, indent=1))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
