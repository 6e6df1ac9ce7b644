"""`remedis select`: which of a site's unlabeled images to label next, as a worklist for its annotators.

A thin face over `remedis.stages.select_images`: the site's images are embedded with the backbone it will
adapt, a strategy chooses (patient-aware, deterministic by seed) and the worklist CSV (image, patient_id,
rank, strategy, cluster) is written with a picture of the embedding beside it. Label the rows, put the
labels in the manifest, and `remedis adapt` trains on them.
"""

from __future__ import annotations

from pathlib import Path

from remedis.commands import command_parser

EXAMPLES = """examples:
  remedis select --backbone runs/central/backbones/remedis --manifest site.csv --budget 50 -o worklist.csv
  remedis select --backbone B --manifest site.csv --budget 5% --strategy probcover --labeled done.csv -o next.csv

Recommended: typiclust for the first labels of a site (tens to a few hundred: it labels the typical image
of each dense region); kcenter or probcover once a few hundred are labeled; random only as the baseline.
The pool is the site's rows without a label outside the val and test splits."""


def cmd_select(args) -> int:
    """`remedis select`: write the worklist and say what it was chosen from."""
    from remedis import stages
    from remedis.commands.adapt import parse_budget
    from remedis.config import ConfigError
    from remedis.data.manifest import read_manifest

    budget = parse_budget(args.budget)  # fail before any work
    manifest = read_manifest(args.manifest)
    site = args.site or (manifest.sites()[0] if len(manifest.sites()) == 1 else None)
    if site is None:
        raise ConfigError(f"{args.manifest}: several sites ({', '.join(manifest.sites())}); choose one with --site")
    labeled = read_manifest(args.labeled) if args.labeled else None
    work = stages.select_images(Path(args.backbone), manifest, site, budget, args.strategy, args.seed, labeled)
    path = work.write(Path(args.output))
    print(f"worklist: {path} ({len(work.chosen)} of {work.pool} unlabeled images of {site}, {work.strategy}, "
          f"{len({r.patient_id for r in work.chosen})} patients; {work.labeled} labeled already)")
    if work.skipped:
        print(f"skipped {len(work.skipped)} unreadable image(s); first: {work.skipped[0][0]}: {work.skipped[0][1]}")
    print(f"picture: {path.with_suffix('.png')}")
    return 0


def register(sub) -> None:
    """Add `remedis select` to the command line."""
    from remedis.adapt.selection import strategy_names

    s = command_parser(sub, "select", "choose which of a site's unlabeled images to label next",
                       "Choose which of a site's unlabeled images to label next: embed them with the backbone the "
                       "site will adapt, choose with a strategy (typical, diverse images; one per patient first) and "
                       "write a worklist CSV with a picture of the embedding.", EXAMPLES)
    s.add_argument("--backbone", required=True, help="the backbone folder the site will adapt (embeddings, preprocessing)")
    s.add_argument("--manifest", required=True, help="the site's manifest; rows without a label are the pool")
    s.add_argument("--budget", required=True, help="how many to choose: 50 (images) or 5%% (of the pool)")
    s.add_argument("--output", "-o", required=True, help="worklist CSV (a picture goes beside it as .png)")
    s.add_argument("--site", default=None, help="the site (when the manifest holds several)")
    s.add_argument("--strategy", default="typiclust", choices=strategy_names(), help="how to choose (default: typiclust)")
    s.add_argument("--labeled", default=None, metavar="CSV",
                   help="a manifest of images labeled already: they guide the choice and are never chosen")
    s.add_argument("--seed", type=int, default=0, help="fixes the choice (clustering, order)")
    s.set_defaults(func=cmd_select)
