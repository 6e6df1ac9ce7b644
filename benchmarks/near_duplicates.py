"""Near-duplicate images across splits in every kit under ../shared/data (issue 29): each kit's manifest split
as `remedis run` splits it (its config, seed 0; `remedis data split`), then `remedis data inspect`'s
perceptual-hash check. The CT kit has no config: its manifest is split with the default data section.

    python benchmarks/near_duplicates.py --out benchmarks/results/near-duplicates.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

KITS = {"breast-ultrasound": "configs/breast_ultrasound.yaml", "chest-xray": "configs/chest_xray.yaml",
        "dermoscopy": "configs/dermoscopy.yaml", "ct-dicom": None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--also", action="append", default=[], metavar="NAME=MANIFEST",
                    help="also inspect a manifest with its own splits as it is (e.g. a frozen target split)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    from remedis.config import RunConfig
    from remedis.data.inspect import inspect_manifest
    from remedis.data.manifest import read_manifest, write_manifest
    from remedis.stages import prepare_records

    result = {"benchmark": "near_duplicates", "max_distance": args.bits, "kits": {}}
    for kit, config in KITS.items():
        source = args.data / kit / "manifest.csv"
        if not source.is_file():
            continue
        cfg = RunConfig.from_yaml(config)
        manifest = read_manifest(source)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "manifest.csv"
            write_manifest(prepare_records(manifest, cfg.data, 0).records, path)
            t0 = time.time()
            summary = inspect_manifest(path, duplicate_bits=args.bits)
        nd = summary["near_duplicates"]
        result["kits"][kit] = {"config": config, "images": summary["images"], "patients": summary["patients"],
                               "sites": summary["sites"], "unreadable": summary["unreadable_count"],
                               "near_duplicates": nd, "seconds": round(time.time() - t0, 1)}
        print(kit, {k: nd[k] for k in ("hashed", "pairs", "identical_pairs", "different_patients", "across_splits",
                                        "across_splits_by_split")}, flush=True)
    for item in args.also:
        name, path = item.split("=", 1)
        summary = inspect_manifest(path, duplicate_bits=args.bits)
        nd = summary["near_duplicates"]
        result.setdefault("manifests", {})[name] = {"manifest": path, "images": summary["images"],
                                                    "patients": summary["patients"], "near_duplicates": nd}
        print(name, {k: nd[k] for k in ("pairs", "across_splits", "eval_images_with_train_twin", "different_labels")},
              flush=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
