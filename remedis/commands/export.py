"""`remedis export`: an adapted model folder into the BentoML store (with its model card), and its bento.

A thin face over `remedis.export`. It refuses a folder without an OOD detector or an input contract, naming
what is missing; `--allow-no-ood` exports it anyway, and the service then answers `"ood": null`.
"""

from __future__ import annotations

from pathlib import Path

from remedis.commands import command_parser

EXAMPLES = """examples:
  remedis export --model runs/site-b/adapted/remedis@100pct --name site-b --report runs/site-b/report.json --build
  bentoml serve serving.service:RemedisService --arg model=site-b:latest

Recommended: --report with the adaptation's report.json, so the model card carries the site's test
metrics with CIs and the operating point the service applies."""


def cmd_export(args) -> int:
    """`remedis export`: store the model (and build the bento with --build); print the tags."""
    from remedis.export import build_bento, export_model

    tag = export_model(args.model, args.name, args.report, Path(args.model).name, allow_no_ood=args.allow_no_ood)
    print(f"model: {tag}")
    if args.build:
        print(f"bento: {build_bento(tag)}")
    return 0


def register(sub) -> None:
    """Add `remedis export` to the command line."""
    e = command_parser(sub, "export", "put an adapted model folder in the BentoML store",
                       "Put an adapted model folder in the BentoML store with a model card (task, operating point, OOD "
                       "detector, the report's summary, provenance hashes); --build also builds the bento (service + "
                       "pinned dependencies).", EXAMPLES)
    e.add_argument("--model", required=True, help="adapted model folder")
    e.add_argument("--name", required=True, help="BentoML model name")
    e.add_argument("--report", default=None, help="report.json whose summary goes into the model card")
    e.add_argument("--build", action="store_true", help="also `bentoml build` the service around it")
    e.add_argument("--allow-no-ood", action="store_true",
                   help="export a folder without an OOD detector or input contract (the service then answers ood: null)")
    e.set_defaults(func=cmd_export)
