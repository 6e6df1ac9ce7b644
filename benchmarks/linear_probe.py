"""Linear-probe AUROC of a run's backbones (random init, supervised-only, REMEDIS) per site.

    python benchmarks/linear_probe.py runs/bus-seed0            # a finished `remedis run` folder
Fits on each site's train split, scores its test split, with the run's own manifest splits and
preprocessing; prints one JSON object. Evidence for issue 4 ("does SSL improve the features?").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from remedis.data.dataset import load_images
from remedis.data.manifest import read_manifest
from remedis.data.preprocess import Preprocessing
from remedis.evaluate.probe import linear_probe_auroc
from remedis.models.backbones import create_backbone
from remedis.models.checkpoint import load_checkpoint


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--positive", default=None, help="positive class (default: the run's)")
    args = ap.parse_args(argv)
    report = json.loads((args.run / "report.json").read_text())
    class_names, positive = report["task"]["class_names"], args.positive or report["task"]["positive_class"]
    manifest = read_manifest(args.run / "manifest.csv")
    _, meta = load_checkpoint(args.run / "backbones" / "supervised")
    pre = Preprocessing.from_dict(meta["preprocessing"])
    cache = load_images([r for r in manifest.records if r.label in class_names], pre)
    torch.manual_seed(0)
    backbones = {"random": create_backbone(meta["architecture"], meta["in_chans"])}
    for name in ("supervised", "remedis"):
        state, _ = load_checkpoint(args.run / "backbones" / name)
        net = create_backbone(meta["architecture"], meta["in_chans"])
        net.load_state_dict(state)
        backbones[name] = net
    result = {"run": str(args.run), "image_size": pre.image_size, "architecture": meta["architecture"], "sites": {}}
    for site in manifest.sites():
        train = cache.subset(lambda r, s=site: r.site == s and r.split == "train")
        test = cache.subset(lambda r, s=site: r.site == s and r.split == "test")
        result["sites"][site] = {name: round(linear_probe_auroc(net, train, test, class_names, class_names.index(positive)), 4)
                                 for name, net in backbones.items()}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
