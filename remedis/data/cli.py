"""`remedis data ...` sub-commands: synth, index, inspect."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def cmd_synth(args) -> int:
    from remedis.data.synthetic import SyntheticSpec, generate_synthetic

    path = generate_synthetic(args.output, SyntheticSpec(patients_per_site=args.patients, image_size=args.image_size), seed=args.seed)
    print(f"manifest: {path}")
    return 0


def _label_map(text: str | None) -> dict[str, str] | None:
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
    from remedis.data.inspect import format_summary, inspect_manifest

    summary = inspect_manifest(args.manifest, decode=not args.headers_only)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def register(sub) -> None:
    d = sub.add_parser("data", help="data utilities")
    dsub = d.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("synth", help="write the synthetic multi-site dataset and its manifest")
    s.add_argument("--output", "-o", required=True)
    s.add_argument("--patients", type=int, default=150, help="patients per site")
    s.add_argument("--image-size", type=int, default=96)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_synth)

    i = dsub.add_parser("index", help="build a manifest from a folder of DICOMs or class sub-folders of images")
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

    n = dsub.add_parser("inspect", help="counts, sizes, modalities, unreadable files and split leakage of a manifest")
    n.add_argument("manifest")
    n.add_argument("--json", action="store_true", help="print the summary as JSON")
    n.add_argument("--headers-only", action="store_true", help="read headers only (skip decoding every image)")
    n.set_defaults(func=cmd_inspect)
