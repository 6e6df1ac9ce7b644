"""`remedis data ...`: the data stage's commands, thin faces over `remedis.data` and `remedis.stages`.

    synth    the built-in synthetic multi-site dataset and its manifest
    index    a folder of DICOMs (or class sub-folders of PNG/JPEG/NIfTI) -> a manifest, PatientID pseudonymised
    inspect  counts, sizes, modalities, unreadable files and split leakage of a manifest
    split    a manifest's patient-level splits (as `remedis run` / `remedis adapt` draw them) written into a copy
    shard    a manifest's images once as litdata shards, for streaming pretraining
    merge    several manifests as one (e.g. every kit's images as one SimCLR corpus)

`split` freezes the splits a config draws, so later jobs share them: a foundation SimCLR corpus may hold a
target site's train images only if the later adaptation holds out exactly the same test patients.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from remedis.commands import command_parser


def cmd_synth(args) -> int:
    """`remedis data synth`: write the synthetic dataset and print its manifest."""
    from remedis.data.synthetic import SyntheticSpec, generate_synthetic

    path = generate_synthetic(args.output, SyntheticSpec(patients_per_site=args.patients, image_size=args.image_size), seed=args.seed)
    print(f"manifest: {path}")
    return 0


def _label_map(text: str | None) -> dict[str, str] | None:
    """`--label-map 1=contrast,0=no_contrast` -> {'1': 'contrast', '0': 'no_contrast'}."""
    if not text:
        return None
    out = {}
    for item in text.split(","):
        if "=" not in item:
            raise ValueError(f"--label-map: {item!r} is not FROM=TO (e.g. 1=contrast,0=no_contrast)")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def cmd_index(args) -> int:
    """`remedis data index`: index a folder into a manifest; print what was found and skipped."""
    from remedis.data.index import DEFAULT_SALT_FILE, index_folder, load_salt
    from remedis.data.manifest import write_manifest

    salt_file = Path(args.salt_file) if args.salt_file else DEFAULT_SALT_FILE
    created = not salt_file.expanduser().is_file()
    salt = load_salt(salt_file)
    result = index_folder(
        args.folder, salt, site_tag=args.site_tag, site=args.site, label_tag=args.label_tag,
        label_regex=args.label_regex, label_map=_label_map(args.label_map),
        label_from_folder=True if args.label_from_folder else None, patient_regex=args.patient_regex,
    )
    if not result.records:
        raise ValueError(f"{args.folder}: no readable images found ({len(result.skipped)} file(s) skipped)")
    out = write_manifest(result.records, args.output)
    sites = sorted({r.site for r in result.records})
    labels = sorted({r.label for r in result.records})
    print(f"manifest: {out}  ({len(result.records)} images, {len({(r.site, r.patient_id) for r in result.records})} patients, "
          f"sites: {', '.join(sites)}; labels: {', '.join(lab or '(none)' for lab in labels)})")
    if created:
        print(f"patient salt: created {salt_file} (keep it private; reuse it so re-indexing keeps the same pseudonyms)")
    if result.skipped:
        print(f"skipped {len(result.skipped)} file(s):")
        for name, reason in result.skipped[:10]:
            print(f"  {name}: {reason}")
        if len(result.skipped) > 10:
            print(f"  ... and {len(result.skipped) - 10} more")
    for note in result.warnings:
        print(f"warning: {note}", file=sys.stderr)
    return 0


def cmd_inspect(args) -> int:
    """`remedis data inspect`: print a manifest's summary (text or JSON)."""
    from remedis.data.inspect import format_summary, inspect_manifest

    summary = inspect_manifest(args.manifest, decode=not args.headers_only, duplicate_bits=args.duplicate_bits)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def cmd_split(args) -> int:
    """`remedis data split`: write the prepared splits into a copy of the manifest (original labels kept)."""
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


def cmd_shard(args) -> int:
    """`remedis data shard`: write (or reuse) the shards of a manifest's records."""
    from remedis.data.contract import detect_channels
    from remedis.data.index import load_salt
    from remedis.data.manifest import read_manifest
    from remedis.data.preprocess import Preprocessing
    from remedis.data.shards import write_shards

    manifest = read_manifest(args.manifest)
    records = manifest.select(site=args.site, split=args.split)
    if not records:
        raise ValueError(f"{args.manifest}: no records with split={args.split!r} site={args.site!r}")
    channels = detect_channels(records) if args.channels == "auto" else int(args.channels)
    pre = Preprocessing(image_size=args.image_size, in_chans=channels, channels=channels, aspect=args.aspect)
    salt = load_salt(args.salt_file, create=False) if args.salt_file else None
    shards = write_shards(records, pre, args.output, group_size=args.group_size, seed=args.seed, num_workers=args.workers,
                          salt=salt, overwrite=args.overwrite)
    print(f"shards: {len(shards)} samples, {shards.images} images, {len(shards.failures)} skipped, "
          f"{shards.meta['seconds'] if not shards.reused else 0.0:.1f} s{' (reused)' if shards.reused else ''}  -> {shards.folder}")
    return 0


def cmd_merge(args) -> int:
    """`remedis data merge`: write several manifests as one."""
    from remedis.data.manifest import merge_manifests

    merged = merge_manifests(args.manifests, args.output)
    splits = {s: len(merged.select(split=s)) for s in ("train", "val", "test")}
    print(f"manifest: {args.output} ({len(merged)} images, sites {', '.join(merged.sites())}; "
          f"train {splits['train']}, val {splits['val']}, test {splits['test']}, "
          f"no split {len(merged) - sum(splits.values())})")
    return 0


EXAMPLES = {
    "synth": "remedis data synth --output data/synthetic --patients 150",
    "index": "remedis data index ../shared/data/ct-dicom --output ct.csv --label-regex 'CONTRAST_(\\d)' "
             "--label-map 1=contrast,0=no_contrast\n  remedis data index images/ --output site.csv --site HOSP-2   "
             "# images/<label>/*.png",
    "inspect": "remedis data inspect site.csv\n  remedis data inspect site.csv --headers-only --json",
    "split": "remedis data split all.csv --config configs/breast_ultrasound.yaml --site BUSI -o targets/busi.csv",
    "shard": "remedis data shard all.csv --output shards/simclr --image-size 224 --group-size 4 --split train --workers 8",
    "merge": "remedis data merge busbra.csv busi.csv nih.csv --output foundation.csv",
}


def _parser(dsub, name: str, text: str):
    """A `remedis data NAME` parser whose --help says what it does and shows a runnable example."""
    return command_parser(dsub, name, text, text[0].upper() + text[1:] + ".", f"example:\n  {EXAMPLES[name]}")


def register(sub):  # long: six sub-commands declared option by option
    """Add `remedis data synth|index|inspect|split|shard|merge` to the command line."""
    d = sub.add_parser("data", help="data utilities: synth, index, inspect, split, shard, merge",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dsub = d.add_subparsers(dest="data_command", required=True)
    s = _parser(dsub, "synth", "write the synthetic multi-site dataset and its manifest")
    s.add_argument("--output", "-o", required=True, help="folder for the images and manifest.csv")
    s.add_argument("--patients", type=int, default=150, help="patients per site")
    s.add_argument("--image-size", type=int, default=96, help="side of the generated images, pixels")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_synth)

    i = _parser(dsub, "index", "build a manifest from a folder of DICOMs or class sub-folders of images")
    i.add_argument("folder")
    i.add_argument("--output", "-o", required=True, help="manifest CSV to write")
    i.add_argument("--site", help="site name for every image (default: DICOM --site-tag, else the folder name)")
    i.add_argument("--site-tag", help="DICOM tag naming the site (default: Manufacturer, then InstitutionName)")
    i.add_argument("--label-tag", help="DICOM tag holding the label")
    i.add_argument("--label-regex", help="regular expression on the relative path; group 1 is the label")
    i.add_argument("--label-map", help="rename labels: FROM=TO[,FROM=TO...]")
    i.add_argument("--label-from-folder", action="store_true", help="label = first sub-folder (default for PNG/JPEG)")
    i.add_argument("--patient-regex", help="regular expression on the file name; group 1 is the patient (non-DICOM)")
    i.add_argument("--salt-file", help="secret used to pseudonymise PatientID (default: $REMEDIS_SALT_FILE or "
                                       "~/.config/remedis/patient-salt, created on first use)")
    i.set_defaults(func=cmd_index)

    n = _parser(dsub, "inspect", "counts, sizes, modalities, unreadable files, split leakage and near-duplicates of a manifest")
    n.add_argument("manifest")
    n.add_argument("--json", action="store_true", help="print the summary as JSON")
    n.add_argument("--headers-only", action="store_true",
                   help="read headers only (skip decoding every image, and the near-duplicate check)")
    n.add_argument("--duplicate-bits", type=int, default=4, metavar="BITS",
                   help="perceptual-hash bits (of 64) in which two near-duplicate images may differ (default 4: "
                        "resized, recompressed or lightly edited copies; 0: identical pictures only)")
    n.set_defaults(func=cmd_inspect)

    sp = _parser(dsub, "split", "write a manifest's patient-level splits (as run/adapt draw them) into a copy")
    sp.add_argument("manifest")
    sp.add_argument("--output", "-o", required=True, help="manifest CSV to write (original labels, split column filled)")
    sp.add_argument("--config", default=None, help="the run config whose data section draws the splits")
    sp.add_argument("--site", action="append", default=[], metavar="SITE", help="only these sites (default: all)")
    sp.add_argument("--seed", type=int, default=None, help="the split seed (default: the config's)")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    sp.set_defaults(func=cmd_split)

    h = _parser(dsub, "shard", "write a manifest's images once as litdata shards, for streaming pretraining")
    h.add_argument("manifest")
    h.add_argument("--output", "-o", required=True, help="shard folder (reused when it holds these shards already)")
    h.add_argument("--image-size", type=int, default=64, help="Preprocessing.image_size (the run's data.image_size)")
    h.add_argument("--channels", choices=["auto", "1", "3"], default="auto", help="1 grey, 3 colour, auto: 3 when any image is colour")
    h.add_argument("--aspect", choices=["pad", "crop", "stretch"], default="pad", help="non-square images (the run's data.aspect)")
    h.add_argument("--group-size", type=int, default=1, help="images of one patient per sample (MICLe: e.g. 4)")
    h.add_argument("--workers", type=int, default=1, help="decoding processes")
    h.add_argument("--split", default=None, help="only this split (train, val, test)")
    h.add_argument("--site", default=None, help="only this site")
    h.add_argument("--seed", type=int, default=0, help="shuffles the samples before writing")
    h.add_argument("--salt-file", help="patient pseudonym secret (as for `data index`); default: a random one per write")
    h.add_argument("--overwrite", action="store_true", help="replace other shards found in --output")
    h.set_defaults(func=cmd_shard)

    g = _parser(dsub, "merge", "several manifests as one (e.g. every kit's images as one SimCLR corpus)")
    g.add_argument("manifests", nargs="+")
    g.add_argument("--output", "-o", required=True, help="merged manifest CSV")
    g.set_defaults(func=cmd_merge)
    return dsub
