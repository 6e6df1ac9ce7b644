"""The `remedis` command line.

    remedis run configs/quickstart.yaml --output runs/quickstart
    remedis data synth --output data/synthetic
Each stage adds its own sub-commands in `remedis/<stage>/cli.py` (a `register(subparsers)` function).
    remedis export --model runs/quickstart/adapted/remedis@1 --name site-x --build
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from remedis.config import ConfigError, RunConfig


def _summary(result) -> str:
    report = json.loads(Path(result.report_json).read_text())
    sites = list(report["sites"])
    width = max(len(m["name"]) for m in report["models"]) + 2
    header = "".join(f"{s} ({report['sites'][s]['role']})".rjust(22) for s in sites)
    lines = ["test AUROC per site:", "model".ljust(width) + "labels  " + header]
    for m in report["models"]:
        cells = []
        for s in sites:
            a = m["sites"][s]["auroc"]
            cells.append(("n/a" if a is None else f"{a:.3f}").rjust(22))
        lines.append(m["name"].ljust(width) + str(m["train_images"]).rjust(6) + "  " + "".join(cells))
    return "\n".join(lines)


def cmd_run(args) -> int:
    cfg = RunConfig.from_yaml(args.config, args.set)
    if args.seed is not None:
        cfg.seed = args.seed
    from remedis.pipeline import run_pipeline

    result = run_pipeline(cfg, args.output, progress=not args.quiet, build=False if args.no_build else None)
    from remedis.distributed import is_primary

    if not is_primary():
        return 0  # a training-only rank: the primary process evaluates and reports
    print(_summary(result))
    print(f"report:  {result.report_html}")
    print(f"         {result.report_json}")
    if result.bento_tag:
        print(f"model:   {result.model_tag} (BentoML store)")
        print(f"bento:   {result.bento_tag}   serve it: bentoml serve {result.bento_tag}")
    print(f"wall time: {result.seconds:.0f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="remedis", description="REMEDIS-style medical-imaging adaptation")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run every stage from a config file")
    r.add_argument("config")
    r.add_argument("--output", "-o", required=True, help="run folder")
    r.add_argument("--seed", type=int, default=None, help="override the config's seed")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data.image_size=128 (repeatable)")
    r.add_argument("--no-build", action="store_true", help="skip export to BentoML and `bentoml build`")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=cmd_run)

    from remedis.commands.adapt import register as register_adapt

    register_adapt(sub)
    from remedis.export import register as register_export

    register_export(sub)
    from remedis.data.cli import register as register_data

    data_commands = register_data(sub)
    from remedis.commands.split import register as register_split

    register_split(data_commands)
    from remedis.commands.evaluate import register as register_evaluate

    register_evaluate(sub)
    from remedis.commands.pretrain import register as register_pretrain

    register_pretrain(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        # Bad input: one clear line, no traceback.
        print(f"remedis: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
