"""Far-OOD detection by the input contract alone, per modality (docs/evidence.md, "The OOD gate").

Fits an `InputContract` on (a) the synthetic ultrasound train images and (b) BUS-BRA's train patients
(80/10/10, seed 0), then reports the share of each other set it flags, with the kind of reason:
CT slices, dermoscopy photographs, chest X-rays (NIH adults, PneumoniaMNIST), pydicom's nuclear-medicine
JPEG 2000 file, BUSI (same modality, another site) and each contract's own held-out test images.

    .venv/bin/python benchmarks/contract_far_ood.py [--size 64] [--output runs/contract.json]

Needs `../shared/data` (skips with the reason without it); about 2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64, help="network image size (Preprocessing.image_size)")
    ap.add_argument("--output", default=None, help="also write the figures as JSON here")
    args = ap.parse_args(argv)
    if not DATA.is_dir():
        print(f"skipped: {DATA} not found (the real-data kits)")
        return 0
    import torch
    from pydicom.data import get_testdata_file

    from remedis.data.contract import InputContract, describe_file
    from remedis.data.dataset import load_images
    from remedis.data.manifest import read_manifest
    from remedis.data.preprocess import Preprocessing
    from remedis.data.readers import read_image
    from remedis.data.splits import assign_splits
    from remedis.data.synthetic import SyntheticSpec, generate_synthetic

    torch.set_num_threads(1)
    pre = Preprocessing(args.size)

    def load(records):
        cache = load_images(records, pre)
        return [describe_file(r.image, r.meta.get("modality") or None) for r in cache.records], cache.pixels

    def flagged(contract, sources, pixels) -> dict:
        kinds: collections.Counter = collections.Counter()
        n = 0
        for source, x in zip(sources, pixels):
            reasons = contract.check(source, x.float())
            n += bool(reasons)
            kinds.update({r.split(" ")[0] if not r.startswith("intensity") else ("profile" if "profile" in r else "intensity")
                          for r in reasons})
        return {"n_images": len(sources), "flagged": n / max(len(sources), 1), "reasons": dict(kinds)}

    bus = read_manifest(DATA / "breast-ultrasound" / "manifest.csv")
    cxr = read_manifest(DATA / "chest-xray" / "manifest.csv")
    nm = get_testdata_file("JPEG2000.dcm")
    sets = {
        "CT (ct-dicom)": load(read_manifest(DATA / "ct-dicom" / "manifest.csv").records),
        "dermoscopy": load(read_manifest(DATA / "dermoscopy" / "manifest.csv").records),
        "chest X-ray NIH": load(cxr.select(site="NIH")),
        "chest X-ray PneumoniaMNIST": load(cxr.select(site="GUANGZHOU-28px")),
        "NM (pydicom JPEG2000.dcm)": ([describe_file(nm)], pre.resize(read_image(nm))[None]),
        "BUSI": load(bus.select(site="BUSI")),
    }
    busbra = assign_splits(bus.select(site="BUS-BRA"), (0.8, 0.1, 0.1), seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        synthetic = read_manifest(generate_synthetic(tmp, SyntheticSpec(patients_per_site=150), seed=0))
        contracts = {"synthetic US": (load(synthetic.select(split="train")), load(synthetic.select(split="test"))),
                     "BUS-BRA": (load([r for r in busbra if r.split == "train"]), load([r for r in busbra if r.split == "test"]))}
        out: dict = {"image_size": args.size, "contracts": {}}
        for name, ((sources, pixels), held_out) in contracts.items():
            t0 = time.perf_counter()
            contract = InputContract.fit(sources, pixels)
            fit_s = time.perf_counter() - t0
            rows = {**sets, f"{name} (held-out test)": held_out}
            result = {"train_images": contract.n_images, "fit_seconds": fit_s, "sets": {}}
            print(f"contract of {name}: {contract.n_images} images, {args.size} px, modalities {contract.modalities}, "
                  f"channels {contract.channels}, rows {contract.rows}, columns {contract.columns} (fit {fit_s:.1f} s)")
            for set_name, (src, px) in rows.items():
                t0 = time.perf_counter()
                r = flagged(contract, src, px)
                r["ms_per_image"] = 1000 * (time.perf_counter() - t0) / max(len(src), 1)
                result["sets"][set_name] = r
                print(f"  {set_name:32s} n={r['n_images']:5d} flagged {100 * r['flagged']:5.1f}%  {r['reasons']}")
            out["contracts"][name] = result
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
