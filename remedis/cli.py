"""The `remedis` command line: it only dispatches. Every command lives in `remedis/commands/<name>.py`
as a `register(subparsers)` function and a thin face over the stage functions of `remedis.stages`.

    remedis run configs/quickstart.yaml --output runs/quickstart      (remedis.commands.run)
    remedis pretrain supervised|simclr ...                            (remedis.commands.pretrain)
    remedis select --backbone B --manifest site.csv --budget 50 ...   (remedis.commands.select)
    remedis adapt --backbone B --manifest site.csv --budget sweep ... (remedis.commands.adapt)
    remedis evaluate / report ...                                     (remedis.commands.evaluate)
    remedis export --model runs/x/adapted/remedis@1 --name site-x     (remedis.commands.export)
    remedis data synth|index|inspect|split|shard|merge ...            (remedis.commands.data)
    remedis monitor label labels.csv --store sqlite:///predictions.db (remedis.commands.monitor)
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from remedis.config import ConfigError

# modules of remedis.commands, in --help order
COMMANDS = ("run", "pretrain", "select", "adapt", "evaluate", "export", "data", "monitor")


def build_parser() -> argparse.ArgumentParser:
    """The `remedis` parser with every command of `COMMANDS` registered."""
    p = argparse.ArgumentParser(prog="remedis", description="REMEDIS-style medical-imaging adaptation: pretrain a "
                                "backbone, adapt it to a hospital with few labels, evaluate, serve.")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"remedis.commands.{name}").register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse, run the command; bad input prints one line (`remedis: error: ...`) and returns 2."""
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
