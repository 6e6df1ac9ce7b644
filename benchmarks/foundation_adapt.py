"""Issue 20's data-efficiency table: `remedis adapt` from each backbone to each held-out target site at
label budgets, then the REMEDIS claim per target.

Every cell is the product's own command (`remedis adapt --budget 1%,5%,...`), one process per
(target, backbone, seed), a few in parallel on one thread each; a rerun reuses every finished budget
(the command's stage keys). The table collects each report's test AUROC and its 95% patient-bootstrap CI.

    python benchmarks/foundation_adapt.py --runs runs/ev20 --seeds 0 --jobs 2 \\
        --out benchmarks/results/foundation-adapt-64px-cpu.json

Backbones (folders under --runs, as `docs/cluster.md`'s foundation recipe and the kit configs write them):
  foundation-remedis     foundation/backbones/remedis       multi-task upstream + SimCLR/MICLe on all kits
  foundation-supervised  foundation/backbones/supervised    the same upstream without SimCLR
  kit-remedis            <kit>/backbones/remedis            the target's own kit: its source site's upstream + SimCLR
  kit-supervised         <kit>/backbones/supervised         the same kit upstream without SimCLR
  random                 random/backbones/random            the foundation network at random init (written here;
                                                            random-grey/ for a grey target, from the kit's network)

`rosendahl-grey` is issue 18's grey twin of rosendahl: the same frozen split and budgets, every backbone
trained and adapted on luminance (`data.channels: 1`; its kit is derm-grey). Issue 18's colour-against-grey
table is the kit study on the pair:

    python benchmarks/foundation_adapt.py --runs runs/ev20 --seeds 0,1,2 --targets rosendahl,rosendahl-grey \
        --backbones kit-remedis,kit-supervised,random --ours kit-remedis --out benchmarks/results/F.json

Seeds are adaptation seeds (the budget draw, the head's initialisation, the batch order) on the seed-0
backbones and the seed-0 split of each target; the CIs are patient bootstraps of the fixed test set.

The claim: the smallest budget at which --ours (foundation-remedis) reaches the best of the other backbones'
100%-budget test AUROC, by point estimate and within that baseline's 95% CI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Target:
    """A held-out target: its frozen split under --runs/targets (written by `remedis data split` with the kit
    config at seed 0, so every adaptation seed has the same test patients and none of them reached SimCLR),
    its site, the kit config, the kit's backbone folder, and the decoding (None: the backbone's own)."""

    manifest: str
    site: str
    config: str
    kit: str
    channels: int | None = None

    @property
    def sets(self) -> list[str]:
        return [] if self.channels is None else [f"data.channels={self.channels}"]


TARGETS = {
    "BUSI": Target("busi.csv", "BUSI", "configs/breast_ultrasound.yaml", "bus"),
    "NIH": Target("nih.csv", "NIH", "configs/chest_xray.yaml", "cxr"),
    "rosendahl": Target("rosendahl.csv", "rosendahl", "configs/dermoscopy.yaml", "derm"),
    "rosendahl-grey": Target("rosendahl.csv", "rosendahl", "configs/dermoscopy.yaml", "derm-grey", channels=1),
}
BACKBONES = ("foundation-remedis", "foundation-supervised", "kit-remedis", "kit-supervised", "random")
OURS = "foundation-remedis"
BASELINES = ("foundation-supervised", "kit-remedis", "random")
BUDGETS = "1%,5%,10%,25%,100%"
# One recipe for every backbone and target: the kit config's data split and learning rate, one fine-tuning
# run per budget (no learning-rate sweep, so no soup), at least 100 optimizer steps per budget.
RECIPE = ["adapt.epochs=10", "adapt.min_steps=100", "adapt.sweep_lrs=[]", "adapt.soup=best",
          "evaluate.subgroups=[]", "evaluate.bootstrap=500"]


def backbone_folder(runs: Path, backbone: str, target: str) -> Path:
    where, _, stage = backbone.partition("-")
    if where == "kit":
        return runs / TARGETS[target].kit / "backbones" / stage
    if where == "random":
        return runs / ("random" if TARGETS[target].channels is None else "random-grey") / "backbones" / "random"
    return runs / "foundation" / "backbones" / stage


def write_random_backbone(runs: Path, target: str) -> Path:
    """The foundation's network (architecture, channels, preprocessing) at seed-0 random initialisation; for a
    target with its own decoding (rosendahl-grey), the kit's grey network."""
    import torch

    from remedis.models.backbones import create_backbone
    from remedis.models.checkpoint import read_meta, save_checkpoint

    folder = backbone_folder(runs, "random", target)
    if (folder / "model.safetensors").is_file():
        return folder
    source = "foundation-supervised" if TARGETS[target].channels is None else "kit-supervised"
    meta = read_meta(backbone_folder(runs, source, target))
    torch.manual_seed(0)
    net = create_backbone(meta["architecture"], int(meta["in_chans"]))
    keep = ("architecture", "in_chans", "preprocessing", "feature_dim", "num_features", "config")
    save_checkpoint(folder, net.state_dict(), {"kind": "backbone", "stage": "random", "stage_history": [],
                                               **{k: meta[k] for k in keep if k in meta}})
    return folder


def adapt_job(runs: Path, target: str, backbone: str, seed: int, threads: int) -> dict:
    t = TARGETS[target]
    out = runs / "adapt" / target / f"{backbone}-s{seed}"
    sets = [*RECIPE, f"runtime.threads={threads}"] + (["adapt.wise_ft=false"] if backbone == "random" else []) + t.sets
    cmd = [sys.executable, "-m", "remedis.cli", "adapt", "--backbone", str(backbone_folder(runs, backbone, target)),
           "--manifest", str(runs / "targets" / t.manifest), "--site", t.site, "--config", t.config, "--budget", BUDGETS,
           "--output", str(out), "--quiet", "--set", f"seed={seed}"] + [a for s in sets for a in ("--set", s)]
    out.mkdir(parents=True, exist_ok=True)
    done = out / "row.json"  # written when this job finished: the same command is not run again
    previous = json.loads(done.read_text()) if done.is_file() else {}
    if previous.get("command") == cmd[1:]:
        row = {k: previous[k] for k in ("target", "backbone", "seed", "seconds", "exit")}
    else:
        start = time.time()
        with open(out / "adapt.log", "a") as log:
            code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        row = {"target": target, "backbone": backbone, "seed": seed, "seconds": round(time.time() - start, 1), "exit": code}
        print(f"{target} {backbone} seed {seed}: exit {code}, {row['seconds']:.0f} s", flush=True)
        if code == 0:
            done.write_text(json.dumps({**row, "command": cmd[1:]}))
    if row["exit"] == 0:
        row["budgets"] = [budget_row(m, t.site) for m in json.loads((out / "report.json").read_text())["models"]]
    return row


def budget_row(model: dict, site: str) -> dict:
    """One budget's figures from the adaptation report: test AUROC with its CI, and how far fine-tuning moved
    the backbone (linear CKA between the backbone before and after adaptation, per layer, on the test images)."""
    cka = model.get("representation", {}).get("cka") or {}
    layers, matrix = cka.get("layers", []), cka.get("matrix", [])
    return {"name": model["name"].split("@")[1], "fraction": model["fraction"], "images": model["train_images"],
            "auroc": model["sites"][site]["auroc"], "auroc_ci": model["sites"][site]["auroc_ci"],
            "cka_before_after": {layer: matrix[i][i] for i, layer in enumerate(layers) if i < len(matrix)}}


PAIRS = [("foundation-supervised", "foundation-remedis"), ("foundation-supervised", "kit-remedis"),
         ("foundation-remedis", "kit-remedis"), ("foundation-supervised", "random"), ("kit-supervised", "kit-remedis")]


def backbone_cka(runs: Path, target: str, backbones: list[str]) -> dict:
    """Linear CKA per layer between the backbones (as pretrained, before adaptation) on the target's test
    images, each backbone seeing them through its own preprocessing: how much SimCLR moved the foundation
    upstream, and how alike the foundation and the single-domain backbones are."""
    from remedis import stages
    from remedis.config import RunConfig
    from remedis.data.manifest import read_manifest
    from remedis.data.preprocess import Preprocessing
    from remedis.evaluate.cka import cka_matrix, layer_features
    from remedis.evaluate.evaluation import load_backbone_before
    from remedis.models.checkpoint import read_meta

    t = TARGETS[target]
    cfg = RunConfig.from_yaml(t.config)
    prepared = stages.prepare_records(read_manifest(runs / "targets" / t.manifest), cfg.data, 0, sites=[t.site])
    feats = {}
    for name in backbones:
        folder = backbone_folder(runs, name, target)
        meta = read_meta(folder)
        pre = Preprocessing.from_dict(meta["preprocessing"])
        test = stages.part(stages.load_prepared(prepared, pre), t.site, "test")
        net = load_backbone_before(folder, meta["architecture"], int(meta["in_chans"]))
        feats[name] = layer_features(net, pre.normalize(test.pixels.float()))
    out = {}
    for a, b in [(a, b) for a, b in PAIRS if a in feats and b in feats]:
        matrix = cka_matrix(feats[a], feats[b])
        out[f"{a} vs {b}"] = {layer: matrix[i][i] for i, layer in enumerate(feats[a])}
    return out


def claim(rows: list[dict], target: str, seed: int, ours: str = OURS, baselines: tuple = BASELINES) -> dict:
    """Smallest budget at which `ours` reaches the best baseline's 100% AUROC (point / within CI)."""
    by = {r["backbone"]: r["budgets"] for r in rows if r["target"] == target and r["seed"] == seed and "budgets" in r}
    if ours not in by or not any(b in by for b in baselines):
        return {}
    full = {b: max(by[b], key=lambda x: x["fraction"]) for b in baselines if b in by}
    best = max(full, key=lambda b: full[b]["auroc"])
    ref = full[best]
    mine = sorted(by[ours], key=lambda x: x["fraction"])
    point = next((x for x in mine if x["auroc"] >= ref["auroc"]), None)
    within = next((x for x in mine if x["auroc"] >= ref["auroc_ci"][0]), None)
    return {"best_baseline": best, "baseline_auroc": ref["auroc"], "baseline_ci": ref["auroc_ci"],
            "baseline_images": ref["images"],
            "reached_point": point and {"budget": point["name"], "images": point["images"], "auroc": point["auroc"]},
            "reached_within_ci": within and {"budget": within["name"], "images": within["images"], "auroc": within["auroc"]}}


def summary(rows: list[dict], ours: str = OURS, baselines: tuple = BASELINES) -> dict:
    """Mean and sd over seeds per target, backbone and budget, and the claim on the means (a budget reaches
    the best baseline's 100% mean, by point or within the mean of that baseline's per-seed CIs)."""
    import numpy as np

    cells: dict = {}
    for r in rows:
        for b in r.get("budgets", []):
            per_backbone = cells.setdefault(r["target"], {}).setdefault(r["backbone"], {})
            cell = per_backbone.setdefault(b["name"], {"images": [], "auroc": [], "lo": [], "hi": []})
            cell["images"].append(b["images"])
            cell["auroc"].append(b["auroc"])
            cell["lo"].append(b["auroc_ci"][0])
            cell["hi"].append(b["auroc_ci"][1])
    out = {}
    for target, per_backbone in cells.items():
        table = {bb: {name: {"seeds": len(c["auroc"]), "images": int(np.mean(c["images"])), "mean": float(np.mean(c["auroc"])),
                             "sd": float(np.std(c["auroc"], ddof=1)) if len(c["auroc"]) > 1 else None,
                             "ci_mean": [float(np.mean(c["lo"])), float(np.mean(c["hi"]))]}
                      for name, c in budgets.items()} for bb, budgets in per_backbone.items()}
        entry: dict = {"table": table}
        full = {b: table[b]["100%"] for b in baselines if b in table and "100%" in table[b]}
        if full and ours in table:
            best = max(full, key=lambda b: full[b]["mean"])
            mine = [(n, table[ours][n]) for n in BUDGETS.split(",") if n in table[ours]]
            entry["claim"] = {"ours": ours, "best_baseline": best, "baseline_mean": full[best]["mean"],
                              "baseline_ci_mean": full[best]["ci_mean"],
                              "reached_point": next((n for n, c in mine if c["mean"] >= full[best]["mean"]), None),
                              "reached_within_ci": next((n for n, c in mine if c["mean"] >= full[best]["ci_mean"][0]), None)}
        if "foundation-remedis" in table and "kit-remedis" in table:
            entry["foundation_minus_kit"] = {n: table["foundation-remedis"][n]["mean"] - table["kit-remedis"][n]["mean"]
                                             for n in table["foundation-remedis"] if n in table["kit-remedis"]}
        out[target] = entry
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, default=Path("runs/ev20"))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--backbones", default=",".join(BACKBONES))
    ap.add_argument("--ours", default=OURS, choices=BACKBONES,
                    help="the backbone the claim is about; every other backbone run is a baseline")
    ap.add_argument("--jobs", type=int, default=2, help="adapt processes at once (one thread each)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cka", action="store_true", help="also CKA between the backbones on each target's test images")
    args = ap.parse_args()
    targets, backbones = args.targets.split(","), args.backbones.split(",")
    baselines = tuple(b for b in backbones if b != args.ours)
    for t in targets:
        if not (args.runs / "targets" / TARGETS[t].manifest).is_file():
            sys.exit(f"{args.runs / 'targets' / TARGETS[t].manifest}: write it with `remedis data split` (docs/cluster.md)")
        if "random" in backbones:
            write_random_backbone(args.runs, t)
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(t, b, s) for s in seeds for t in targets for b in backbones]
    missing = sorted({str(backbone_folder(args.runs, b, t)) for t, b, _ in jobs
                      if not (backbone_folder(args.runs, b, t) / "model.safetensors").is_file()})
    if missing:
        sys.exit("backbones not found: " + ", ".join(missing))
    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda j: adapt_job(args.runs, *j, threads), jobs))
    result = {"benchmark": "foundation_adapt", "budgets": BUDGETS, "recipe": RECIPE, "ours": args.ours,
              "baselines": baselines, "rows": rows,
              "claims": {f"{t}/seed{s}": claim(rows, t, s, args.ours, baselines) for s in seeds for t in targets},
              "summary": summary(rows, args.ours, baselines)}
    if args.cka:
        result["backbone_cka"] = {t: backbone_cka(args.runs, t, backbones) for t in targets}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(args.out)
    for key, c in result["claims"].items():
        print(key, json.dumps(c))


if __name__ == "__main__":
    main()
