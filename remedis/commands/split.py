"""`remedis data split`: a manifest with its patient-level splits written in, so later jobs share them.

    remedis data split ../shared/data/breast-ultrasound/manifest.csv --config configs/breast_ultrasound.yaml \\
        --site BUSI -o runs/foundation/targets/busi.csv

The splits are the ones `remedis run` and `remedis adapt` would draw with that config and seed (its
label map, split fractions, validation carve: `remedis.stages.prepare_records`); rows keep their
original labels, so the same config still applies to the written manifest. Freezing them matters when
one site's images feed several jobs: a foundation SimCLR corpus may hold a target site's train images
only if the later adaptation holds out exactly the same test patients.
"""

from __future__ import annotations

from dataclasses import replace


def cmd_split(args) -> int:
    from remedis.commands.pretrain import parse_sites
    from remedis.config import RunConfig
    from remedis.data.manifest import read_manifest, write_manifest
    from remedis.stages import prepare_records

    cfg = RunConfig.from_yaml(args.config, args.set)
    seed = cfg.seed if args.seed is None else args.seed
    manifest = read_manifest(args.manifest)
    prepared = prepare_records(manifest, cfg.data, seed, sites=parse_sites(args.site))
    split = {r.image: r.split for r in prepared.records}
    rows = [replace(r, split=split[r.image]) for r in manifest.records if r.image in split]
    write_manifest(rows, args.output)
    counts = {s: sum(r.split == s for r in rows) for s in ("train", "val", "test")}
    print(f"manifest: {args.output} ({len(rows)} images of {', '.join(prepared.manifest.sites())}; "
          f"train {counts['train']}, val {counts['val']}, test {counts['test']}; seed {seed})")
    return 0


def register(dsub) -> None:
    s = dsub.add_parser("split", help="write a manifest's patient-level splits (as run/adapt draw them) into a copy")
    s.add_argument("manifest")
    s.add_argument("--output", "-o", required=True, help="manifest CSV to write (original labels, split column filled)")
    s.add_argument("--config", default=None, help="the run config whose data section draws the splits")
    s.add_argument("--site", action="append", default=[], metavar="SITE", help="only these sites (default: all)")
    s.add_argument("--seed", type=int, default=None, help="the split seed (default: the config's)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    s.set_defaults(func=cmd_split)

