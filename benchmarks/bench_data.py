"""Data-stage throughput on the real CT kit (../shared/data/ct-dicom), as JSON.

Measured in one process, on files already in the OS page cache (every pass reads the same bytes):
  raw_decode      pydicom.dcmread + pixel_array: the reference every DICOM loader pays
  first_epoch     load_images with a fresh on-disk cache: read, hash, decode, LUTs, resize, store
  cached_epoch    load_images again on that cache (a second run / epoch): no decoding
  uncached_memory load_images with no disk cache (what a run without cache_dir pays each run)
Targets: first_epoch >= 0.9x raw_decode; cached_epoch >= 10x first_epoch.

    .venv/bin/python benchmarks/bench_data.py [--repeat 3] [--workers 0] [--size 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
KIT = ROOT.parent / "shared" / "data" / "ct-dicom" / "manifest.csv"


def best_rate(fn, n_images: int, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n_images / min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=3, help="passes per measurement; the best is reported")
    p.add_argument("--workers", type=int, default=0, help="num_workers for load_images")
    p.add_argument("--size", type=int, default=64, help="Preprocessing.image_size")
    p.add_argument("--manifest", default=str(KIT))
    args = p.parse_args(argv)
    print(json.dumps(measure(args.manifest, args.repeat, args.workers, args.size), indent=2))
    return 0


def run(reduced: bool) -> dict:
    """Entry point for benchmarks/run.py (reduced: one pass per measurement)."""
    return measure(str(KIT), repeat=1 if reduced else 3, workers=0, size=64)


def measure(manifest: str, repeat: int, workers: int, size: int) -> dict:
    torch.set_num_threads(1)
    if not Path(manifest).is_file():
        return {"skipped": f"{manifest} not present"}

    import pydicom

    from remedis.data import Preprocessing, load_images, read_manifest

    records = read_manifest(manifest).records
    paths = [r.image for r in records]
    n = len(paths)
    for path in paths:  # page cache warm for every contender alike
        path.read_bytes()

    def raw():
        for path in paths:
            _ = pydicom.dcmread(path).pixel_array

    pre = Preprocessing(image_size=size)
    raw_rate = best_rate(raw, n, repeat)
    first_times = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(repeat):  # each pass gets a fresh, empty cache folder
            t0 = time.perf_counter()
            first = load_images(records, pre, cache_dir=Path(tmp) / f"c{k}", num_workers=workers)
            first_times.append(time.perf_counter() - t0)
        first_rate = n / min(first_times)
        cached_rate = best_rate(lambda: load_images(records, pre, cache_dir=Path(tmp) / "c0", num_workers=workers), n, repeat)
        again = load_images(records, pre, cache_dir=Path(tmp) / "c0")
    memory_rate = best_rate(lambda: load_images(records, pre, num_workers=workers), n, repeat)
    identical = bool(torch.equal(first.pixels, again.pixels))
    out = {
        "kit": str(Path(manifest).parent.name),
        "images": n,
        "image_size": size,
        "workers": workers,
        "torch_threads": torch.get_num_threads(),
        "images_per_s": {
            "raw_decode": round(raw_rate, 1),
            "first_epoch": round(first_rate, 1),
            "cached_epoch": round(cached_rate, 1),
            "uncached_memory": round(memory_rate, 1),
        },
        "ratios": {
            "first_vs_raw": round(first_rate / raw_rate, 3),
            "cached_vs_first": round(cached_rate / first_rate, 2),
        },
        "targets": {"first_vs_raw": 0.9, "cached_vs_first": 10.0},
        "cached_equals_first": identical,
        "failures": len(first.failures),
    }
    return out


if __name__ == "__main__":
    sys.exit(main())
