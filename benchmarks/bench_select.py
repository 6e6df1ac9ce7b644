"""Selection strategies of `remedis select`: time and memory of the choice itself on a large pool, and how
well each choice labels a clustered pool.

    .venv/bin/python benchmarks/bench_select.py --out benchmarks/results/select-cpu.json

1. Time and peak RSS of each strategy choosing `--budget` of `--images` embeddings (512-D, L2-normalised,
   50 Gaussian clusters of unequal size: what a backbone gives a site), against the time to compute the
   pool's pairwise distances once (numpy, the same process) as the reference.
2. Label quality on the unit test's clustered pool (10 clusters, 925 images, sizes 400 to 10): the accuracy
   of a 1-nearest-neighbour classifier on the chosen images' labels, over the whole pool, mean of 5 seeds,
   at budgets 10, 20 and 40, for every strategy (random is the baseline).
3. The embedding pass `remedis select` runs before choosing: the backbone (ResNet-18, the kits' network) over
   `--images` decoded 64 px grey images held in memory (`remedis.models.inference.embed_cache`, the same call),
   its time and peak RSS. File decoding is not included (it depends on the format; see bench_data.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import environment, fig, peak_rss  # noqa: E402
from remedis.adapt.selection import SelectionPool, get_strategy, strategy_names  # noqa: E402


def large_pool(n: int, dim: int, seed: int) -> np.ndarray:
    """`n` normalised embeddings in 50 clusters of sizes falling as 1/rank."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, 51)
    sizes = np.maximum(1, np.round(n * weights / weights.sum())).astype(int)
    sizes[0] += n - sizes.sum()
    centres = rng.normal(size=(50, dim)) * 0.5
    x = np.concatenate([c + rng.normal(size=(s, dim)) * 0.3 for c, s in zip(centres, sizes)]).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered_accuracy(strategy: str, budget: int, seeds=range(5)) -> float:
    """Mean 1-NN accuracy over the unit test's clustered pool (tests/test_select.py `blobs`)."""
    from sklearn.neighbors import KNeighborsClassifier

    sizes = [400, 200, 100, 60, 50, 40, 30, 20, 15, 10]
    scores = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        centres = rng.normal(size=(len(sizes), 16)) * 3
        x = np.concatenate([c + rng.normal(size=(n, 16)) for c, n in zip(centres, sizes)])
        y = np.concatenate([[k] * n for k, n in enumerate(sizes)])
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        idx = get_strategy(strategy).select(SelectionPool(x, [f"p{i}" for i in range(len(x))]), budget, seed).indices
        scores.append(KNeighborsClassifier(1).fit(x[idx], y[idx]).score(x, y))
    return float(np.mean(scores))


def embedding_pass(n: int, size: int = 64) -> dict:
    """Seconds and peak RSS to embed `n` in-memory images with a ResNet-18 at `size` px (what select does)."""
    import torch

    from remedis.data.dataset import ImageCache
    from remedis.data.manifest import Record
    from remedis.data.preprocess import Preprocessing
    from remedis.models.backbones import create_backbone
    from remedis.models.inference import embed_cache

    torch.manual_seed(0)
    pixels = torch.rand(n, 1, size, size).half()
    cache = ImageCache([Record(Path(f"/x/{i}.png"), "", "s", f"p{i}") for i in range(n)], pixels, Preprocessing(size))
    net = create_backbone("resnet18", 1).eval()
    with peak_rss() as mem:
        t0 = time.perf_counter()
        emb = embed_cache(net, cache)
        seconds = time.perf_counter() - t0
    assert emb.shape[0] == n
    return fig(f"embed {n} images ({size} px, resnet18, in memory)", seconds, "s",
               peak_rss_mb=(mem["peak"] - mem["start"]) / 2**20, images_per_s=n / seconds)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--budget", type=int, default=200)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "select-cpu.json"))
    args = p.parse_args(argv)
    x = large_pool(args.images, args.dim, 0)
    patients = [f"p{i // 2}" for i in range(len(x))]  # two images per patient
    t0 = time.perf_counter()
    for start in range(0, len(x), 2048):  # the reference: every pairwise distance once, in blocks
        np.einsum("id,jd->ij", x[start:start + 2048], x)
    reference = time.perf_counter() - t0
    figures = []
    for name in strategy_names():
        with peak_rss() as mem:
            t0 = time.perf_counter()
            chosen = get_strategy(name).select(SelectionPool(x, patients), args.budget, 0)
            seconds = time.perf_counter() - t0
        assert len(chosen.indices) == args.budget
        figures.append(fig(f"{name}: choose {args.budget} of {args.images}", seconds, "s", reference=reference,
                           reference_name="all pairwise dot products once", peak_rss_mb=(mem["peak"] - mem["start"]) / 2**20,
                           patients=len({patients[i] for i in chosen.indices})))
    figures.append(embedding_pass(args.images))
    quality = {name: {str(b): clustered_accuracy(name, b) for b in (10, 20, 40)} for name in strategy_names()}
    result = {"benchmark": "select", "environment": environment(), "images": args.images, "dim": args.dim,
              "budget": args.budget, "figures": figures, "clustered_pool_1nn_accuracy": quality}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"figures": figures, "quality": quality}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
