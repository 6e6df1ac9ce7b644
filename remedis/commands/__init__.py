"""The command-line faces: each parses its arguments and calls the stage functions of `remedis.stages`."""

from __future__ import annotations

import argparse
import textwrap


def command_parser(sub, name: str, summary: str, description: str, examples: str) -> argparse.ArgumentParser:
    """A sub-command whose `--help` starts with what it does (`description`) and ends with runnable `examples`
    (kept as written); `summary` is its line in the parent's `--help`."""
    text = description if "\n" in description else textwrap.fill(description, 100)
    return sub.add_parser(name, help=summary, description=text, epilog=examples,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def add_config_options(parser: argparse.ArgumentParser, sections: str, example: str) -> None:
    """--config FILE and repeatable --set KEY=VALUE, as every command that reads the run config takes them."""
    parser.add_argument("--config", default=None, help=f"YAML config ({sections} sections)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config key, e.g. --set {example} (repeatable)")
