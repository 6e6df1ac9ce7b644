"""`remedis-gateway`: run the DICOM gateway, or read its counters.

    remedis-gateway serve --config serving/gateway.yaml [--set port=11112 --set destination.kind=dimse]
    remedis-gateway status --config serving/gateway.yaml      # counters from the spool, no server needed
    remedis-gateway audit --config serving/gateway.yaml --since 1d   # the audit trail's lines (JSON)

A separate command from `remedis` because the gateway sits on top of `serving` (DESIGN.md: `remedis`
never imports `serving`); it runs the same service code (`serving.answer`, `serving.runtime`).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

import yaml

from remedis.config import ConfigError
from serving.gateway.settings import load_gateway_settings


def _overrides(pairs: list[str]) -> dict:
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE")
        key, value = pair.split("=", 1)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out


def _settings(args):
    import yaml as _yaml

    raw = {}
    if args.config:
        from pathlib import Path

        raw = _yaml.safe_load(Path(args.config).read_text()) or {}
    over = _overrides(args.set)
    for k, v in over.items():  # nested keys merge one level deep (destination.kind, stow.port, ...)
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) and isinstance(raw.get(k), dict) else v
    return load_gateway_settings(args.config, raw)


def main(argv: list[str] | None = None) -> int:
    """`remedis-gateway serve|status`: run the gateway, or print a running spool's counters."""
    parser = argparse.ArgumentParser(prog="remedis-gateway", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("serve", "run the gateway until stopped (SIGTERM / Ctrl-C)"),
                        ("status", "print the counters (received, processed, sent, failed, queued) as JSON"),
                        ("audit", "print the audit trail's events (one JSON line each), e.g. --since 1d")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", help="gateway YAML (default serving/gateway.yaml)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
        if name == "audit":
            p.add_argument("--since", default="1d", help="a duration (30m, 12h, 1d, 2w) or an ISO date (default 1d)")
            p.add_argument("--event", action="append", default=[], help="only these events (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"remedis-gateway: {exc}", file=sys.stderr)
        return 2
    if args.command == "audit":
        from pathlib import Path

        from serving.gateway.audit import parse_since, read_trail

        try:
            since = parse_since(args.since)
        except ValueError as exc:
            print(f"remedis-gateway: {exc}", file=sys.stderr)
            return 2
        for line in read_trail(settings.audit or Path(settings.spool) / "audit.jsonl", since):
            if not args.event or line["event"] in args.event:
                print(json.dumps(line))
        return 0
    if args.command == "status":
        from serving.gateway.spool import Spool

        print(json.dumps(Spool(settings.spool).status(), indent=2))
        return 0
    from serving.gateway.app import Gateway

    try:
        gateway = Gateway(settings, model_wait_s=60.0).start()
    except (OSError, FileNotFoundError, RuntimeError) as exc:
        print(f"remedis-gateway: cannot start: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):  # a signal, or a dead worker: then exit non-zero so that a supervisor restarts us
        if gateway.died.is_set():
            print(f"remedis-gateway: {gateway.dead_worker}; exiting", file=sys.stderr)
            gateway.stop()
            return 70  # EX_SOFTWARE
    gateway.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
