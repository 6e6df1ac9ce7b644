"""Frozen-feature check of pretrained backbones on the held-out target sites (issue 20).

For each target (BUSI breast ultrasound, NIH chest X-ray, rosendahl dermoscopy: sites the foundation
upstream never sees labeled), the target's own splits are prepared with its kit's config (label map,
patient-level splits, seed), and a linear probe (`remedis.evaluate.probe`: standardised embeddings,
balanced logistic regression) is fitted on the target's train split and scored on its test split, for
every backbone given. A cheap yardstick before any fine-tuning: how much of the new site's task the
frozen embedding already carries, with a 95% patient-bootstrap CI (500 resamples).

    .venv/bin/python benchmarks/foundation_probe.py --backbone foundation=runs/foundation/backbones/supervised \\
        --backbone random=random:resnet18 --out benchmarks/results/foundation-probe-64px-cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

try:
    from benchmarks._common import environment
except ImportError:  # run as a script from benchmarks/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks._common import environment

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
TARGETS = {  # target site -> the kit config that defines its task and splits
    "BUSI": "breast_ultrasound.yaml",
    "NIH": "chest_xray.yaml",
    "rosendahl": "dermoscopy.yaml",
}


def load_backbone(spec: str):
    """'random:<arch>' (seeded random init, 3 channels) or a backbone folder -> (module, in_chans)."""
    from remedis.models.backbones import create_backbone
    from remedis.models.checkpoint import load_checkpoint, load_matching

    if spec.startswith("random:"):
        torch.manual_seed(0)
        return create_backbone(spec.split(":", 1)[1], 3), 3
    state, meta = load_checkpoint(spec)
    net = create_backbone(meta["architecture"], int(meta["in_chans"]))
    load_matching(net, state, spec)
    return net, int(meta["in_chans"])


def target_sets(target: str, size: int, in_chans: int, seed: int):
    from remedis import stages
    from remedis.config import RunConfig
    from remedis.data.manifest import read_manifest

    cfg = RunConfig.from_yaml(ROOT / "configs" / TARGETS[target])
    cfg.data.manifest = str(SHARED / Path(cfg.data.manifest).relative_to("../shared/data"))
    cfg.data.image_size, cfg.seed = size, seed
    prepared = stages.prepare_records(read_manifest(cfg.data.manifest), cfg.data, seed, sites=[target])
    # a grey (1-channel) backbone sees a colour target as luminance, as `remedis adapt` would feed it
    data = replace(cfg.data, channels=1) if in_chans == 1 else cfg.data
    cfg = stages.resolve_channels(replace(cfg, data=data, model=replace(cfg.model, in_chans=in_chans)), prepared.records)
    cache = stages.load_prepared(prepared, stages.preprocessing_for(cfg))
    return stages.part(cache, split="train"), stages.part(cache, split="test"), prepared.task


def main(argv: list[str] | None = None) -> int:
    from remedis.evaluate.probe import linear_probe_scores
    from remedis.metrics import auroc, patient_bootstrap_ci

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", action="append", required=True, metavar="NAME=FOLDER|random:ARCH")
    p.add_argument("--target", action="append", default=None, choices=sorted(TARGETS))
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    start = time.time()
    backbones = dict(b.split("=", 1) for b in args.backbone)
    results: dict = {}
    for target in args.target or list(TARGETS):
        results[target] = {}
        sets: dict = {}
        for name, spec in backbones.items():
            net, in_chans = load_backbone(spec)
            if in_chans not in sets:
                sets[in_chans] = target_sets(target, args.size, in_chans, args.seed)
            train, test, task = sets[in_chans]
            y, probs = linear_probe_scores(net.eval(), train, test, task.class_names)
            metric = lambda t, p, k=task.positive_index: auroc(t, p, k)  # noqa: E731
            score = metric(y, probs)
            ci = patient_bootstrap_ci(y, probs, [r.patient_id for r in test.records], metric, n_boot=500, seed=args.seed)
            results[target][name] = {"linear_probe_auroc": round(score, 4), "ci95": [round(v, 4) for v in ci if v is not None],
                                     "train_images": len(train), "test_images": len(test),
                                     "positive_class": task.positive_class, "in_chans": in_chans}
            print(f"{target:10s} {name:22s} linear-probe AUROC {score:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] "
                  f"({len(train)} train / {len(test)} test)", flush=True)
    out = {"config": {"size": args.size, "seed": args.seed, "backbones": backbones}, "results": results,
           "environment": environment(), "seconds": round(time.time() - start, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
