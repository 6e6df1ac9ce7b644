"""Run every benchmark (`benchmarks/bench_*.py` exposing `run(reduced: bool) -> dict`); write one JSON.

    python benchmarks/run.py [--reduced] [--output FILE] [--only compute,train] [--threads N] [--history FILE]

Each module's `run` returns `{"figures": [...]}` (see `_common.fig`: value, unit, reference measured in
the same run, ratio) or any dict of numbers. A module that has no `run`, fails to import or raises is
recorded as an error entry and the others still run. The JSON holds the environment (device, torch
version, threads, date), each module's result and wall time; a short table is printed. `--history`
appends the run (mode, environment, figures) to a history file such as `benchmarks/history.json`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def discover(only: list[str] | None = None, folder: Path = HERE) -> list[Path]:
    paths = sorted(folder.glob("bench_*.py"))
    if only:
        paths = [p for p in paths if p.stem.removeprefix("bench_") in only or p.stem in only]
    return paths


def run_module(path: Path, reduced: bool) -> dict:
    t0 = time.perf_counter()
    where = f"{path.parent.name}/{path.name}"
    try:
        spec = importlib.util.spec_from_file_location(f"benchmarks.{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        fn = getattr(module, "run", None)
        if not callable(fn):
            raise AttributeError(f"{where} has no run(reduced: bool) -> dict")
        result = fn(reduced=reduced)
        if not isinstance(result, dict):
            raise TypeError(f"{where}: run() returned {type(result).__name__}, expected dict")
        entry = {"status": "ok", "result": result}
    except Exception as exc:  # noqa: BLE001 - one failing benchmark must not hide the others
        entry = {"status": "error", "error": f"{type(exc).__name__}: {exc}",
                 "traceback": traceback.format_exc(limit=6)}
    entry["seconds"] = round(time.perf_counter() - t0, 2)
    return entry


def figures_of(result: dict) -> list[dict]:
    """The figures of a module's result: its `figures` list, else every number in it (flattened)."""
    if isinstance(result.get("figures"), list):
        return [f for f in result["figures"] if isinstance(f, dict) and "name" in f]
    out = []

    def walk(prefix: str, obj) -> None:
        if isinstance(obj, bool):
            return
        if isinstance(obj, (int, float)):
            out.append({"name": prefix, "value": float(obj), "unit": "", "ratio": None})
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)

    walk("", result)
    return out


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, (int, float)) and math.isfinite(x):
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return str(x)


def table(report: dict) -> str:
    lines = [f"{'figure':<56} {'value':>9} {'unit':<9} {'reference':>9} {'ratio':>6}  reference is"]
    for name, entry in report["benchmarks"].items():
        if entry["status"] != "ok":
            lines.append(f"{name}: ERROR {entry['error']}")
            continue
        for f in figures_of(entry["result"]):
            lines.append(f"{f['name'][:56]:<56} {_fmt(f.get('value')):>9} {f.get('unit', ''):<9} "
                         f"{_fmt(f.get('reference')):>9} {_fmt(f.get('ratio')):>6}  {f.get('reference_name') or ''}"
                         + (f"  [goal {f['goal']}]" if f.get("goal") else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the remedis benchmarks and write one JSON.")
    ap.add_argument("--reduced", action="store_true", help="small sizes (CI): < 3 minutes on 2 CPU cores")
    ap.add_argument("--output", type=Path, default=ROOT / "runs" / "benchmarks.json")
    ap.add_argument("--only", help="comma-separated benchmark names (compute,train,scaling,data,service)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: shared machines)")
    ap.add_argument("--history", type=Path, help="append this run to a history JSON (a list of runs)")
    ap.add_argument("--label", default="", help="a note stored with the run in --history")
    ap.add_argument("--folder", type=Path, default=HERE, help=argparse.SUPPRESS)  # tests: a folder of bench_*.py
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    import torch

    from benchmarks._common import append_history, environment

    torch.set_num_threads(args.threads)
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    report = {"mode": "reduced" if args.reduced else "full", "environment": environment("cpu"), "benchmarks": {}}
    t0 = time.perf_counter()
    for path in discover(only, args.folder):
        print(f"running {path.stem} ...", file=sys.stderr, flush=True)
        report["benchmarks"][path.stem.removeprefix("bench_")] = run_module(path, args.reduced)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1))
    if args.history:
        append_history(args.history, args.label, report["mode"], report["environment"],
                       [f for e in report["benchmarks"].values() if e["status"] == "ok" for f in figures_of(e["result"])])
    print(table(report))
    print(f"wrote {args.output} ({report['seconds']:.0f} s)")
    return 1 if any(e["status"] != "ok" for e in report["benchmarks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
