"""Scaling: time per epoch and peak memory of a streaming epoch at 1k / 10k (/ 100k, full mode) images.

Each epoch streams synthetic grayscale images (a dark elliptical lesion in gamma speckle, rendered
per index from its own seed, vectorised numpy), through remedis' `Preprocessing` (antialiased resize +
normalisation), a DataLoader, and one SGD step of a small conv net per batch. Nothing holds the whole
dataset: time should grow linearly (ratio of time to 10x the 1k epoch's ~ 1) and peak RSS stay flat
(ratio to the 1k epoch's peak ~ 1).

Example:
    >>> from benchmarks import bench_scaling; bench_scaling.run(reduced=True)["figures"][0]["unit"]
    's'
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, IterableDataset

try:
    from benchmarks._common import fig, peak_rss
except ImportError:  # run as a script from benchmarks/
    from _common import fig, peak_rss

RAW, SIZE, BATCH = 48, 32, 128


class StreamingSynthetic(IterableDataset):
    """`n` synthetic (image, label) pairs rendered on demand; image i depends only on (seed, i)."""

    def __init__(self, n: int, seed: int = 0):
        from remedis.data.preprocess import Preprocessing

        self.n, self.seed = n, seed
        self.pre = Preprocessing(image_size=SIZE)
        yy, xx = np.mgrid[0:RAW, 0:RAW].astype(np.float32) / RAW
        self.yy, self.xx = yy, xx

    def render(self, i: int) -> tuple[np.ndarray, int]:
        rng = np.random.default_rng((self.seed, i))
        label = int(rng.integers(2))
        cy, cx = rng.uniform(0.3, 0.7, 2)
        ry, rx = rng.uniform(0.08, 0.2, 2) * (1.0 + 0.3 * label)
        lesion = ((self.yy - cy) / ry) ** 2 + ((self.xx - cx) / rx) ** 2 < 1.0
        tissue = rng.gamma(4.0, 0.25, size=(RAW, RAW)).astype(np.float32) * 0.5
        img = np.where(lesion, tissue * 0.3, tissue)
        return np.clip(img, 0.0, 1.0), label

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        start, step = (info.id, info.num_workers) if info else (0, 1)
        for i in range(start, self.n, step):
            img, label = self.render(i)
            yield self.pre(img), label


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 2))


def epoch(n: int) -> tuple[float, int, int]:
    """(seconds, images seen, peak RSS bytes) of one streamed training epoch over n images."""
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    loader = DataLoader(StreamingSynthetic(n), batch_size=BATCH, num_workers=0)
    seen = 0
    with peak_rss() as mem:
        t0 = time.perf_counter()
        for x, y in loader:
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(y)
        seconds = time.perf_counter() - t0
    if not torch.isfinite(loss):
        raise RuntimeError("scaling epoch: loss is not finite")
    return seconds, seen, mem["peak"]


def run(reduced: bool) -> dict:
    sizes = [1_000, 10_000] if reduced else [1_000, 10_000, 100_000]
    epoch(BATCH)  # warm-up: first-call costs stay out of the 1k figure
    figures, base_t, base_mem = [], None, None
    for n in sizes:
        # The 1k epoch is short enough to be shaken by other processes: take its best of 3.
        seconds, seen, peak = min(epoch(n) for _ in range(3 if n == sizes[0] else 1))
        if seen != n:
            raise RuntimeError(f"scaling epoch saw {seen} images, expected {n}")
        mb = peak / 2**20
        if base_t is None:
            base_t, base_mem, base_n = seconds, mb, n
            figures.append(fig(f"scaling epoch {n} images", seconds, "s", None, None, us_per_image=1e6 * seconds / n))
            figures.append(fig(f"scaling peak RSS {n} images", mb, "MiB", None, None))
        else:
            figures.append(fig(f"scaling epoch {n} images", seconds, "s", base_t * n / base_n,
                               f"linear from {base_n} images", us_per_image=1e6 * seconds / n, goal="ratio ~ 1 (linear)"))
            figures.append(fig(f"scaling peak RSS {n} images", mb, "MiB", base_mem, f"peak RSS at {base_n} images",
                               goal="ratio ~ 1 (flat)"))
    return {"figures": figures}


if __name__ == "__main__":
    import json
    import sys

    torch.set_num_threads(1)
    print(json.dumps(run(reduced="--reduced" in sys.argv), indent=1))
