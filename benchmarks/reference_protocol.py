"""The REFERENCE.md recipe as a plain PyTorch script, run on remedis's own patient splits.

../shared/REFERENCE.md reports a ~150-line script's BUSI AUROCs on *its* random splits. The test split
is ~156 images, so split-to-split spread (~0.05) is as large as the effects; comparing remedis to those
fixed numbers mixes the recipe with the split. This script re-implements that recipe independently
(torchvision ResNet-18 with BatchNorm, no remedis training code) and runs it on exactly the patients,
splits and nested label budgets remedis uses for a seed, so the two recipes are compared on the same
test images:
  1. supervised upstream on BUS-BRA train patients: 8 epochs AdamW 1e-3 one-cycle, class-weighted CE,
     flips + random 64 crops of 72;
  2. SimCLR from those weights on unlabeled BUS-BRA + BUSI train images: 8 epochs, batch 128, NT-Xent
     t=0.1, 2-layer projection to 128-d, AdamW 5e-4; views: random resized crop (50-100% side), flip,
     gamma, contrast/brightness;
  3. BUSI budgets: 15 epochs full fine-tuning (AdamW 3e-4 pretrained, 1e-3 random), best epoch by
     validation AUROC, test AUROC.

    python benchmarks/reference_protocol.py --manifest ../shared/data/breast-ultrasound/manifest.csv --seed 0
Prints one JSON object (test AUROC per backbone and budget). Uses CUDA when present.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from sklearn.metrics import roc_auc_score
from torchvision.ops import roi_align

from remedis.data.manifest import read_manifest  # the manifest and splits only: the same patients
from remedis.data.splits import assign_splits, budget_subset

LABEL_MAP = {"benign": "not_malignant", "normal": "not_malignant"}


def load(records, device):
    x = np.stack([np.asarray(Image.open(r.image).convert("L").resize((72, 72), Image.BILINEAR), np.float32) / 255
                  for r in records])
    y = [int(r.label == "malignant") for r in records]
    return torch.tensor(x)[:, None].to(device), torch.tensor(y).to(device)


def resnet18() -> nn.Module:
    net = torchvision.models.resnet18(num_classes=2)
    net.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    return net


def norm(x):
    return (x - 0.5) / 0.25


def crop_flip(x, gen):
    """Random 64 crop of 72 and horizontal flip (per image)."""
    n = len(x)
    ox, oy = torch.randint(0, 9, (2, n), generator=gen).tolist()
    out = torch.stack([x[i, :, oy[i]:oy[i] + 64, ox[i]:ox[i] + 64] for i in range(n)])
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def simclr_view(x, gen):
    """Random resized crop (50-100% side) to 64, flip, gamma, contrast and brightness (per image)."""
    n, dev = len(x), x.device
    side = (0.5 + 0.5 * torch.rand(n, generator=gen)) * 72
    x0 = torch.rand(n, generator=gen) * (72 - side)
    y0 = torch.rand(n, generator=gen) * (72 - side)
    boxes = torch.stack([torch.arange(n).float(), x0, y0, x0 + side, y0 + side], 1).to(dev)
    v = roi_align(x, boxes, output_size=64, aligned=True)
    flip = (torch.rand(n, generator=gen) < 0.5).to(dev)
    v = torch.where(flip[:, None, None, None], v.flip(-1), v)

    def r(lo, hi):
        return (lo + (hi - lo) * torch.rand(n, generator=gen)).to(dev)[:, None, None, None]

    v = v.clamp(1e-4, 1) ** r(0.6, 1.6)
    mean = v.mean((2, 3), keepdim=True)
    return ((v - mean) * r(0.6, 1.4) + mean + r(-0.15, 0.15)).clamp(0, 1)


def auroc(net, x, y):
    net.eval()
    with torch.no_grad():
        p = torch.cat([net(norm(x[i:i + 256, :, 4:68, 4:68])).float().softmax(1)[:, 1] for i in range(0, len(x), 256)])
    return float(roc_auc_score(y.cpu().numpy(), p.cpu().numpy()))


def train_classifier(net, x, y, val, epochs, lr, gen, weighted, onecycle, batch=32):
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps) if onecycle else None
    weight = None
    if weighted:
        counts = torch.bincount(y, minlength=2).float().clamp(min=1)
        weight = counts.sum() / (2 * counts)
    best, best_state = -1.0, None
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(x), generator=gen).to(x.device)
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            if len(idx) < 2:
                continue
            loss = F.cross_entropy(net(norm(crop_flip(x[idx], gen))), y[idx], weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched:
                sched.step()
        score = auroc(net, *val)
        if score > best:
            best, best_state = score, {k: v.detach().clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    return best


def nt_xent(z1, z2, t=0.1):
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / t
    sim.fill_diagonal_(float("-inf"))
    n = len(z1)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def simclr(net, x, epochs, gen, batch=128):
    net.fc = nn.Identity()
    proj = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128)).to(x.device)
    opt = torch.optim.AdamW([*net.parameters(), *proj.parameters()], 5e-4)
    losses = []
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(x), generator=gen).to(x.device)
        total = []
        for i in range(0, len(x) - batch + 1, batch):
            xb = x[perm[i:i + batch]]
            loss = nt_xent(proj(net(norm(simclr_view(xb, gen)))), proj(net(norm(simclr_view(xb, gen)))))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total.append(loss.item())
        losses.append(float(np.mean(total)))
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", default="../shared/data/breast-ultrasound/manifest.csv")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budgets", default="0.1,0.25,1.0")
    ap.add_argument("--source-split", default="0.8,0.1,0.1", help="BUS-BRA train/val/test patient fractions")
    ap.add_argument("--epochs-scale", type=float, default=1.0, help="scale every stage's epochs (smoke tests)")
    args = ap.parse_args()

    def ep(n):
        return max(1, round(n * args.epochs_scale))

    start = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    records = [replace(r, label=LABEL_MAP.get(r.label, r.label)) for r in read_manifest(args.manifest).records]
    src_split = tuple(float(v) for v in args.source_split.split(","))
    records = (assign_splits([r for r in records if r.site == "BUS-BRA"], src_split, seed=args.seed)
               + assign_splits([r for r in records if r.site == "BUSI"], (0.6, 0.2, 0.2), seed=args.seed))

    def part(site, split):
        return [r for r in records if r.site == site and r.split == split]

    src_train, src_val = load(part("BUS-BRA", "train"), device), load(part("BUS-BRA", "val"), device)
    upstream = resnet18().to(device)
    up_val = train_classifier(upstream, *src_train, src_val, ep(8), 1e-3, gen, weighted=True, onecycle=True, batch=64)
    sup_state = {k: v.clone() for k, v in upstream.state_dict().items()}
    unlabeled = torch.cat([src_train[0], load(part("BUSI", "train"), device)[0]])
    losses = simclr(upstream, unlabeled, ep(8), gen)
    ssl_state = {k: v.clone() for k, v in upstream.state_dict().items() if not k.startswith("fc.")}

    busi_train = part("BUSI", "train")
    val, test = load(part("BUSI", "val"), device), load(part("BUSI", "test"), device)
    results = {}
    for budget in [float(b) for b in args.budgets.split(",")]:
        chosen = budget_subset(busi_train, budget, seed=args.seed)
        x, y = load(chosen, device)
        for name, state in (("random", None), ("supervised", sup_state), ("remedis", ssl_state)):
            torch.manual_seed(args.seed)
            net = resnet18().to(device)
            if state is not None:
                net.load_state_dict(state, strict=False)
                net.fc.reset_parameters()
            train_classifier(net, x, y, val, ep(15), 1e-3 if state is None else 3e-4, gen, weighted=False, onecycle=False)
            results[f"{name}@{budget:g}"] = round(auroc(net, *test), 4)
    print(json.dumps({"seed": args.seed, "device": device, "upstream_val_auroc": round(up_val, 4),
                      "simclr_loss": [round(losses[0], 3), round(losses[-1], 3)], "busi_test_auroc": results,
                      "busi_test_images": len(test[1]), "seconds": round(time.time() - start, 1)}))


if __name__ == "__main__":
    main()
