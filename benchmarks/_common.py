"""Shared helpers for the benchmarks: timing, the machine's matmul limit, FLOP counting, figures.

A *figure* is one measured number with the reference it is judged against, measured in the same
process so the ratio is meaningful on any machine:

    >>> fig("matmul bf16", 812.0, "GFLOP/s", reference=410.0, reference_name="matmul fp32")
    {'name': 'matmul bf16', 'value': 812.0, 'unit': 'GFLOP/s', 'reference': 410.0, ...}
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import threading
import time
from typing import Any, Callable

import torch


def fig(name: str, value: float, unit: str, reference: float | None = None, reference_name: str | None = None,
        goal: str | None = None, **extra: Any) -> dict[str, Any]:
    """One figure; `ratio` = value / reference when a reference is given."""
    ratio = (value / reference) if reference not in (None, 0) else None
    out = {"name": name, "value": float(value), "unit": unit, "reference": None if reference is None else float(reference),
           "reference_name": reference_name, "ratio": None if ratio is None else float(ratio)}
    if goal:
        out["goal"] = goal
    out.update(extra)
    return out


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_per_call(fn: Callable[[], Any], device: str | torch.device = "cpu", warmup: int = 1, iters: int = 3,
                  min_time: float = 0.0, stat: str = "min") -> float:
    """Seconds per call after `warmup` calls; repeats until `iters` calls and `min_time` seconds.

    `stat="min"` (default): the least disturbed call, the right estimate on a machine shared with other
    jobs (what the hardware can do); `"median"` for a typical call.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < iters or (time.perf_counter() - start) < min_time:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[0] if stat == "min" else times[len(times) // 2]


def matmul_gflops(dtype: torch.dtype, n: int, device: str = "cpu", iters: int = 3) -> float:
    """Achieved GFLOP/s of an n x n x n matrix product (2 n^3 FLOPs) on random data."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    with torch.inference_mode():
        t = time_per_call(lambda: a @ b, device, warmup=2, iters=iters)
    return 2 * n**3 / t / 1e9


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call, counted by torch's FlopCounterMode (matmuls and convolutions, fwd + bwd)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def environment(device: str = "cpu") -> dict[str, Any]:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if torch.device(device).type == "cuda":
        env["device"] = torch.cuda.get_device_name()
    else:
        env["device"] = f"cpu ({env['cpu']}, {env['threads']} thread(s))"
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


@contextlib.contextmanager
def peak_rss(interval: float = 0.005):
    """Samples RSS in a thread; yields a dict whose 'peak' and 'start' (bytes) are filled on exit.

    ru_maxrss is a whole-process high-water mark, so it cannot show each phase's own peak.
    """
    out = {"start": rss_bytes(), "peak": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            out["peak"] = max(out["peak"], rss_bytes())
            stop.wait(interval)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield out
    finally:
        stop.set()
        t.join()
        out["peak"] = max(out["peak"], rss_bytes())


def append_history(path, label: str, mode: str, env: dict[str, Any], figures: list[dict]) -> None:
    """Append one run to a history JSON file (a list of {label, mode, environment, figures})."""
    import json
    from pathlib import Path

    path = Path(path)
    history = json.loads(path.read_text()) if path.exists() else []
    history.append({"label": label, "mode": mode, "environment": env, "figures": figures})
    path.write_text(json.dumps(history, indent=1) + "\n")


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
