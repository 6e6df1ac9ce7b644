"""`remedis data ...` sub-commands."""

from __future__ import annotations


def cmd_synth(args) -> int:
    from remedis.data.synthetic import SyntheticSpec, generate_synthetic

    path = generate_synthetic(args.output, SyntheticSpec(patients_per_site=args.patients, image_size=args.image_size), seed=args.seed)
    print(f"manifest: {path}")
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
