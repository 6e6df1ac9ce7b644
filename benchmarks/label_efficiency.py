"""Issue 29's study: which of a new site's images to label (selection) and what its unlabeled images add
(distillation), at 1/5/10/25% of its train labels, against every backbone at 100%; the claim per target by
the one rule in `remedis.evaluate.claims`.

    python benchmarks/label_efficiency.py --runs runs/ev29 --seeds 0,1,2 --jobs 2 \\
        --out benchmarks/results/label-efficiency-64px-cpu-bf16.json

`--runs` holds what `benchmarks/foundation_backbones.sh`'s chain B writes for the three kits (bus, cxr, derm:
each kit's supervised upstream, then 2 SimCLR + MICLe epochs on its sites' train images) and the frozen
splits under `targets/` (`remedis data split`, seed 0), so every seed has the same test patients and none of
them reached SimCLR. Seeds are adaptation seeds (the selection, the head, the batch order).

Arms, all on the kit's REMEDIS backbone (the frozen split's train images are the site's pool; a budget
keeps the labels of the chosen images only):
  random             label-blind random images, one per patient first (`remedis select --strategy random`)
  typiclust          TypiClust's typical images of new clusters (`--strategy typiclust`)
  kcenter            k-center greedy coverage (`--strategy kcenter`)
  random+distill     random's teacher distilled into a student of its own architecture, started from the
  typiclust+distill  backbone, on every train image of the site (teacher's soft labels; the chosen images'
                     own labels): `adapt.unlabeled: distill`
The unlabeled pool's other use, continued SimCLR + MICLe on the site's images, is already in these
backbones (their SimCLR stage ran on the target's train images), so distillation is the use measured.
Baselines at 100% of the labels: the REMEDIS backbone, the supervised-only backbone and random
initialisation (the kit's network). Every cell is one fine-tuning run (no learning-rate sweep), the same
recipe for every arm (RECIPE).

The budget's size is ceil(fraction x train images) for every arm. A selection whose images all carry one
class cannot train a classifier: the cell records it and scores a constant (AUROC 0.5), as the site would
get nothing better from those labels.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import environment  # noqa: E402


@dataclass(frozen=True)
class Target:
    """A held-out target: its frozen split under --runs/targets, its site, the kit config and the kit's folder."""

    manifest: str
    site: str
    config: str
    kit: str


TARGETS = {
    "BUSI": Target("busi.csv", "BUSI", "configs/breast_ultrasound.yaml", "bus"),
    "rosendahl": Target("rosendahl.csv", "rosendahl", "configs/dermoscopy.yaml", "derm"),
    "NIH": Target("nih.csv", "NIH", "configs/chest_xray.yaml", "cxr"),
}
FRACTIONS = (0.01, 0.05, 0.1, 0.25)
ARMS = {"random": ("random", False), "typiclust": ("typiclust", False), "kcenter": ("kcenter", False),
        "random+distill": ("random", True), "typiclust+distill": ("typiclust", True)}
BASELINES = ("remedis@100%", "supervised@100%", "random-init@100%")
RECIPE = ["adapt.epochs=10", "adapt.min_steps=100", "adapt.sweep_lrs=[]", "adapt.soup=best", "adapt.distill_epochs=10",
          "evaluate.subgroups=[]"]


def backbone_folder(runs: Path, target: str, which: str) -> Path:
    """remedis / supervised: the kit's backbones; random-init: the kit's network at seed-0 random weights."""
    kit = runs / TARGETS[target].kit
    return kit / "backbones" / ("random" if which == "random-init" else which)


def write_random_backbone(runs: Path, target: str) -> Path:
    """The kit's network (architecture, channels, preprocessing) at seed-0 random initialisation."""
    import torch

    from remedis.models.backbones import create_backbone
    from remedis.models.checkpoint import read_meta, save_checkpoint

    folder = backbone_folder(runs, target, "random-init")
    if (folder / "model.safetensors").is_file():
        return folder
    meta = read_meta(backbone_folder(runs, target, "supervised"))
    torch.manual_seed(0)
    net = create_backbone(meta["architecture"], int(meta["in_chans"]))
    keep = ("architecture", "in_chans", "preprocessing", "feature_dim", "num_features", "config")
    save_checkpoint(folder, net.state_dict(), {"kind": "backbone", "stage": "random", "stage_history": [],
                                               **{k: meta[k] for k in keep if k in meta}})
    return folder


def choose(strategy: str, backbone: Path, train, count: int, seed: int):
    """`count` of the site's train images chosen by `strategy` on the backbone's embeddings (labels unseen)."""
    from remedis.adapt.selection import SelectionPool, get_strategy
    from remedis.models.backbones import create_backbone
    from remedis.models.checkpoint import load_checkpoint, load_matching
    from remedis.models.inference import embed_cache

    state, meta = load_checkpoint(backbone)
    net = create_backbone(meta["architecture"], int(meta["in_chans"]))
    load_matching(net, state, str(backbone))
    emb = embed_cache(net.eval(), train).float().numpy()
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    picked = get_strategy(strategy).select(SelectionPool(emb, [r.patient_id for r in train.records]), count, seed)
    chosen = {train.records[i].image for i in picked.indices}
    return train.subset(lambda r: r.image in chosen)


def positive_probs(model, cache) -> list[float]:
    """The adapted model's calibrated probability of the positive class for every image of `cache`."""
    import torch

    logits, _ = model.infer(cache.pixels)
    return model.probs_from_logits(torch.from_numpy(logits)).numpy()[:, model.positive_index].round(5).tolist()


def run_job(runs: Path, target: str, seed: int, arm: str, out: Path) -> None:  # long: one flow, budget by budget
    """One (target, seed, arm): every budget (or, for a baseline, 100%) adapted, then each model's validation
    and test probabilities, written to `out` (JSON)."""
    from remedis import stages
    from remedis.config import RunConfig
    from remedis.data.manifest import read_manifest
    from remedis.data.preprocess import Preprocessing
    from remedis.metrics import auroc
    from remedis.models.checkpoint import read_meta
    from remedis.stages.adapt import AdaptSettings, SiteImages, adapt_budget, distill_budget

    t = TARGETS[target]
    which = arm.split("@")[0] if arm in BASELINES else "remedis"
    backbone = backbone_folder(runs, target, which)
    meta = read_meta(backbone)
    sets = RECIPE + [f"seed={seed}", f"model.backbone={meta['architecture']}"]
    sets += ["adapt.wise_ft=false"] if which == "random-init" else []
    cfg = RunConfig.from_yaml(t.config, sets)
    settings = AdaptSettings.from_config(cfg)
    pre = Preprocessing.from_dict(meta["preprocessing"])
    prepared = stages.prepare_records(read_manifest(runs / "targets" / t.manifest), cfg.data, 0, sites=[t.site])
    site = SiteImages.of(stages.load_prepared(prepared, pre), t.site)
    task = prepared.task
    names = task.class_names
    y_val = [int(names.index(r.label) == task.positive_index) for r in site.val.records]  # 1: the positive class
    y_test = [int(names.index(r.label) == task.positive_index) for r in site.test.records]
    patients = {p: i for i, p in enumerate(sorted({r.patient_id for r in site.test.records}))}
    result = {"target": target, "seed": seed, "arm": arm, "backbone": which, "train_images": len(site.train),
              "test_targets": y_test, "test_groups": [patients[r.patient_id] for r in site.test.records],
              "positive_class": task.positive_class, "budgets": {}}
    strategy, distil = ARMS.get(arm, ("all", False))
    for fraction in ([1.0] if arm in BASELINES else FRACTIONS):
        t0 = time.time()
        count = math.ceil(fraction * len(site.train) - 1e-9)
        train = site.train if fraction == 1.0 else choose(strategy, backbone, site.train, count, seed)
        classes = sorted({r.label for r in train.records})
        cell = {"images": len(train), "classes": {c: sum(r.label == c for r in train.records) for c in classes}}
        folder = runs / "adapt" / target / f"{arm.replace('@', '-').replace('%', 'pct')}-s{seed}" / f"{fraction:g}"
        if len(classes) < 2:
            cell.update(one_class=True, val=[0.5] * len(y_val), test=[0.5] * len(y_test))
        else:
            model = adapt_budget(settings, backbone, train, site.val, task, folder, progress=False)
            if distil:
                model = distill_budget(settings, folder, meta["architecture"], site.pool, site.val, train,
                                       folder.with_name(folder.name + "-student"), progress=False, init=backbone)
            cell.update(val=positive_probs(model, site.val), test=positive_probs(model, site.test))
        two = lambda p: np.stack([1 - np.asarray(p), np.asarray(p)], 1)  # noqa: E731
        cell["val_auroc"] = float(auroc(np.asarray(y_val), two(cell["val"]), 1))
        cell["test_auroc"] = float(auroc(np.asarray(y_test), two(cell["test"]), 1))
        cell["seconds"] = round(time.time() - t0, 1)
        result["budgets"][f"{fraction:g}"] = cell
        print(f"{target} seed {seed} {arm} {fraction:g}: {len(train)} images, val {cell['val_auroc']:.3f} "
              f"test {cell['test_auroc']:.3f} ({cell['seconds']:.0f} s)", flush=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(out)


def job(runs: Path, target: str, seed: int, arm: str, collect: bool = False) -> dict:
    """Run one job in its own process (one thread), or reuse its finished JSON (`collect`: only reuse)."""
    out = runs / "label-efficiency" / f"{target}-s{seed}-{arm.replace('@', '-').replace('%', 'pct')}.json"
    if collect and not out.is_file():
        return {"target": target, "seed": seed, "arm": arm, "exit": None, "note": "not run"}
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, __file__, "--runs", str(runs), "--job", f"{target},{seed},{arm}", "--out", str(out)]
        with open(out.with_suffix(".log"), "a") as log:
            code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        print(f"{target} seed {seed} {arm}: exit {code}", flush=True)
        if code:
            return {"target": target, "seed": seed, "arm": arm, "exit": code}
    return json.loads(out.read_text())


def summarise(rows: list[dict], n_boot: int) -> dict:
    """Per target: the table (mean and sd over seeds of test AUROC, with validation AUROC beside), and per arm
    the claim by the one rule on the seed-averaged paired difference."""
    from remedis.evaluate.claims import data_efficiency_claim

    out = {}
    for target in sorted({r["target"] for r in rows}):
        mine = [r for r in rows if r["target"] == target and "budgets" in r]
        if not mine:
            continue
        seeds = sorted({r["seed"] for r in mine})
        ref = mine[0]
        by = {(r["arm"], r["seed"]): r for r in mine}
        table = {}
        for arm in [*ARMS, *BASELINES]:
            for fraction in sorted({f for r in mine if r["arm"] == arm for f in r["budgets"]}, key=float):
                cells = [by[(arm, s)]["budgets"][fraction] for s in seeds if (arm, s) in by]
                test = [c["test_auroc"] for c in cells]
                table.setdefault(arm, {})[fraction] = {
                    "seeds": len(cells), "images": int(np.mean([c["images"] for c in cells])),
                    "test_mean": float(np.mean(test)), "test_sd": float(np.std(test, ddof=1)) if len(test) > 1 else None,
                    "test": test, "val_mean": float(np.mean([c["val_auroc"] for c in cells])),
                    "one_class_seeds": sum(bool(c.get("one_class")) for c in cells)}
        complete = [s for s in seeds if all((b, s) in by for b in BASELINES)]
        claims = {}
        for arm in ARMS:
            arm_seeds = [s for s in complete if (arm, s) in by]
            if not arm_seeds:
                continue
            two = lambda p: np.stack([1 - np.asarray(p), np.asarray(p)], 1)  # noqa: E731
            candidates = {float(f): [two(by[(arm, s)]["budgets"][f]["test"]) for s in arm_seeds]
                          for f in by[(arm, arm_seeds[0])]["budgets"]}
            baselines = {b: [two(by[(b, s)]["budgets"]["1"]["test"]) for s in arm_seeds] for b in BASELINES}
            claims[arm] = data_efficiency_claim(candidates, baselines, ref["test_targets"], ref["test_groups"],
                                                n_boot=n_boot, seed=0) | {"seeds": arm_seeds}
        out[target] = {"train_images": ref["train_images"], "test_images": len(ref["test_targets"]),
                       "test_groups": len(set(ref["test_groups"])), "seeds": seeds, "table": table, "claims": claims}
    return out


def markdown(result: dict) -> str:
    """The study's tables for docs/evidence.md, printed from the JSON (so the text quotes only recorded figures)."""
    lines = []
    for target, entry in result["summary"].items():
        table, arms = entry["table"], [a for a in ARMS if a in entry["table"]]
        lines += [f"**{target}** ({entry['train_images']} train images, {entry['test_images']} test images of "
                  f"{entry['test_groups']} patients; seeds {', '.join(map(str, entry['seeds']))}). Test AUROC, mean ± sd "
                  "over seeds (validation AUROC in brackets):", "",
                  "| labels | " + " | ".join(arms) + " |", "| --- |" + " --- |" * len(arms)]
        for fraction in map(str, (*FRACTIONS,)):
            fraction = f"{float(fraction):g}"
            cells = []
            for arm in arms:
                c = table[arm].get(fraction)
                cells.append("" if c is None else f"{c['test_mean']:.3f} ± {c['test_sd'] or 0:.3f} [{c['val_mean']:.3f}]"
                             + (f" ({c['one_class_seeds']} one-class)" if c["one_class_seeds"] else ""))
            images = next((table[a][fraction]["images"] for a in arms if fraction in table[a]), "")
            lines.append(f"| {float(fraction):.0%} ({images}) | " + " | ".join(cells) + " |")
        base = " / ".join(f"{b.split('@')[0]} {table[b]['1']['test_mean']:.3f} ± {table[b]['1']['test_sd'] or 0:.3f}"
                          for b in BASELINES if b in table)
        lines += ["", f"100% baselines: {base}.", ""]
        lines += ["| arm | margin 0.02 | margin 0.05 | lower bounds at 1 / 5 / 10 / 25% |", "| --- | --- | --- | --- |"]
        for arm, claim in entry["claims"].items():
            def cell(m):
                v = claim["margins"][m]
                return "not reached" if v["budget"] is None else f"{v['budget']:.0%} ({v['auroc']:.3f})"
            bounds = " / ".join("-" if r["lower"] is None else f"{r['lower']:+.3f}" for r in claim["budgets"])
            lines.append(f"| {arm} | {cell('0.02')} | {cell('0.05')} | {bounds} |")
        lines += ["", f"Best 100% baseline: {entry['claims'][next(iter(entry['claims']))]['best_baseline']} "
                  f"({entry['claims'][next(iter(entry['claims']))]['baseline_auroc']:.3f}).", ""] if entry["claims"] else [""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, default=Path("runs/ev29"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--arms", default=",".join([*BASELINES, *ARMS]))
    ap.add_argument("--jobs", type=int, default=2, help="processes at once (one thread each)")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--markdown", action="store_true", help="print the tables of an existing --out JSON and stop")
    ap.add_argument("--collect", action="store_true", help="summarise the finished jobs only; start none")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.out.read_text())))
        return
    if args.job:
        target, seed, arm = args.job.split(",")
        run_job(args.runs, target, int(seed), arm, args.out)
        return
    targets, arms = args.targets.split(","), args.arms.split(",")
    for t in targets:
        if not (args.runs / "targets" / TARGETS[t].manifest).is_file():
            sys.exit(f"{args.runs / 'targets' / TARGETS[t].manifest}: write it with `remedis data split`")
        write_random_backbone(args.runs, t)
    # seed by seed, so that an interrupted study has whole seeds; random + distillation (the least needed arm) last
    rounds = [[a for a in arms if a != "random+distill"], ["random+distill"]]
    jobs = [(t, int(s), a) for chosen in rounds for s in args.seeds.split(",") for t in targets for a in chosen if a in arms]
    start = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda j: job(args.runs, *j, collect=args.collect), jobs))
    from remedis.models.checkpoint import read_meta

    sizes = {t: read_meta(backbone_folder(args.runs, t, "remedis"))["preprocessing"]["image_size"] for t in targets}
    result = {"benchmark": "label_efficiency", "environment": environment(), "image_size": sizes,
              "simclr_epochs": 2, "fractions": FRACTIONS, "recipe": RECIPE, "arms": list(ARMS),
              "baselines": list(BASELINES), "wall_seconds": round(time.time() - start), "rows": rows,
              "summary": summarise(rows, args.bootstrap)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, separators=(",", ":")))  # per-image predictions: compact
    tmp.replace(args.out)
    for target, s in result["summary"].items():
        for arm, c in s["claims"].items():
            print(target, arm, {m: v["budget"] for m, v in c["margins"].items()}, flush=True)


if __name__ == "__main__":
    main()
