"""Progress a person can see: a bar on a terminal, a plain line every 30 s in a log file.

Decoding, shard writing and training run for hours on a cluster whose stderr is a file, where a tqdm
bar is one endless line of carriage returns. `Progress` (any loop) and `ProgressLog` (a Lightning
training stage) therefore draw a tqdm bar when stderr is a terminal and otherwise write a line like

    remedis: simclr epoch 3/20 step 120/400 (12%) 85 img/s nt_xent 4.21 eta 6m

every `interval` seconds (default 30; the environment variable REMEDIS_PROGRESS_SECONDS sets another).
The percentage and the ETA are of the whole stage. Lines go to the `remedis` logger when logging is
configured (the command line does: they get its timestamp), else straight to stderr. They name the
stage and carry counts, rates and metrics only: never a file path or a patient identifier.

Example:
    >>> for item in track(range(3), "decode", total=3, interval=0, bar=False, write=print):
    ...     pass
    decode 1/3 (33%) ...
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

log = logging.getLogger("remedis")

INTERVAL_ENV = "REMEDIS_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 30.0
T = TypeVar("T")


def progress_interval(interval: float | None = None) -> float:
    """Seconds between log lines: `interval`, else $REMEDIS_PROGRESS_SECONDS, else 30.

    Example:
        >>> progress_interval(5)
        5.0
    """
    if interval is not None:
        return float(interval)
    text = os.environ.get(INTERVAL_ENV, "")
    try:
        value = float(text) if text else DEFAULT_INTERVAL
    except ValueError:
        raise ValueError(f"{INTERVAL_ENV}: expected seconds (e.g. 30), got {text!r}") from None
    if value < 0:
        raise ValueError(f"{INTERVAL_ENV}: must be >= 0 seconds, got {text!r}")
    return value


def interactive() -> bool:
    """True when stderr is a terminal (a person watches: bars); False for a file or a cluster log."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def emit(line: str) -> None:
    """Write one progress line: to the `remedis` logger when logging shows its INFO lines, else stderr."""
    if log.isEnabledFor(logging.INFO) and log.hasHandlers():
        log.info(line)
    else:
        print(f"remedis: {line}", file=sys.stderr, flush=True)


def format_duration(seconds: float) -> str:
    """45 -> '45s', 372 -> '6m', 3900 -> '1h05m'.

    Example:
        >>> format_duration(3900)
        '1h05m'
    """
    if not math.isfinite(seconds):
        return "?"
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{round(s / 60)}m"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def format_line(stage: str, done: int, total: float | None, rate: float | None = None, unit: str = "img",
                epoch: int | None = None, epochs: int | None = None, fraction: float | None = None,
                metrics: dict[str, float] | None = None, eta: float | None = None) -> str:
    """One progress line (without the 'remedis: ' prefix).

    Args:
        stage: the stage name (decode, shards, supervised, simclr, ...).
        done: items (loops) or steps of the epoch (training) done.
        total: items or steps per epoch; None or inf when unknown (streams).
        rate: items per second.
        unit: what the rate counts.
        epoch, epochs: 1-based epoch and number of epochs (training only).
        fraction: share of the whole job done (default done / total).
        metrics: name -> value (loss, ...).
        eta: seconds left.

    Example:
        >>> format_line("simclr", 120, 400, 85.2, epoch=3, epochs=20, fraction=0.115, metrics={"nt_xent": 4.2134}, eta=372)
        'simclr epoch 3/20 step 120/400 (12%) 85 img/s nt_xent 4.21 eta 6m'
    """
    parts = [stage]
    known = total is not None and math.isfinite(total) and total > 0
    if epoch is not None:
        parts.append(f"epoch {epoch}/{epochs}" if epochs and epochs > 0 else f"epoch {epoch}")
        parts.append(f"step {done}/{int(total)}" if known else f"step {done}")
    else:
        parts.append(f"{done}/{int(total)}" if known else f"{done}")
    if fraction is None and known:
        fraction = done / total
    if fraction is not None:
        parts.append(f"({100 * min(1.0, fraction):.0f}%)")
    if rate is not None and math.isfinite(rate):
        parts.append(f"{rate:.0f} {unit}/s" if rate >= 10 else f"{rate:.2g} {unit}/s")
    for name, value in (metrics or {}).items():
        parts.append(f"{name} {value:.3g}")
    if eta is not None and math.isfinite(eta):
        parts.append(f"eta {format_duration(eta)}")
    return " ".join(parts)


class Progress:
    """Progress of a loop (decoding, shard writing): a tqdm bar on a terminal, else a line every `interval` s.

    Off a terminal a loop shorter than `interval` writes nothing; a longer one also writes a last line
    when it closes. In a distributed job only rank 0 shows progress (every rank decodes the same images).

    Args:
        stage: what the loop does, shown first on every line ("decode", "shards").
        total: how many items (None: unknown).
        unit: what an item is ("img").
        interval: seconds between lines (default `progress_interval()`).
        bar: draw a tqdm bar (default: when stderr is a terminal); False: lines only.
        write: where lines go (default `emit`).
        clock: seconds, monotonic (tests pass a fake one).
        all_ranks: show progress on every rank of a distributed job, not only on rank 0.

    Example:
        >>> with Progress("shards", total=2, unit="img", interval=0, bar=False, write=print) as p:
        ...     p.update(2)
        shards 2/2 (100%) ...
    """

    def __init__(self, stage: str, total: int | None = None, unit: str = "img", interval: float | None = None,
                 bar: bool | None = None, write: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, all_ranks: bool = False):
        from remedis.distributed import is_primary

        self.stage, self.total, self.unit = stage, total, unit
        self.silent = not all_ranks and not is_primary()
        self.interval = progress_interval(interval)
        self.write = write or emit
        self.clock = clock
        self.done = 0
        self.lines = 0
        self.start = self.last = clock()
        self._done_at_last = 0
        self.bar = None
        if not self.silent and (bar if bar is not None else interactive()):
            from tqdm.auto import tqdm

            # delay: loops shorter than a second draw nothing
            self.bar = tqdm(total=total, desc=f"remedis {stage}", unit=unit, file=sys.stderr, leave=False,
                            delay=1.0, dynamic_ncols=True)

    def update(self, n: int = 1, **metrics: float) -> None:
        """Count `n` more items done; `metrics` (name=value) go on the next line or the bar's postfix."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if metrics:
                self.bar.set_postfix(metrics, refresh=False)
            return
        if self.silent:
            return
        now = self.clock()
        if now - self.last >= self.interval:
            self._line(now, metrics)

    def _line(self, now: float, metrics: dict[str, float], final: bool = False) -> None:
        rate = (self.done - self._done_at_last) / max(now - self.last, 1e-9)
        if final:
            rate = self.done / max(now - self.start, 1e-9)
        eta = None
        if self.total and not final and self.done:
            eta = (self.total - self.done) * (now - self.start) / self.done
        line = format_line(self.stage, self.done, self.total, rate, self.unit, metrics=metrics, eta=eta)
        self.write(line + (f" done in {format_duration(now - self.start)}" if final else ""))
        self.lines += 1
        self.last, self._done_at_last = now, self.done

    def close(self) -> None:
        """Close the bar; off a terminal, a last line when the loop already wrote one."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.lines:
            self._line(self.clock(), {}, final=True)
            self.lines = 0

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def track(items: Iterable[T], stage: str, total: int | None = None, unit: str = "img", **options: Any) -> Iterator[T]:
    """Yield `items`, showing their progress (`Progress` with `options`); `total` defaults to len(items).

    Example:
        >>> for x in track(range(10), "decode"):
        ...     pass
    """
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(stage, total, unit, **options) as p:
        for item in items:
            yield item
            p.update()


def reporter(stage: str, unit: str = "img", **options: Any) -> Callable[[int, int], None]:
    """A `progress(done, total)` callback for code that reports absolute counts (e.g.
    `remedis.data.shards.write_shards`): a `Progress` made at the first call, closed when done == total.

    Example:
        >>> write_shards(records, pre, "shards/", progress=reporter("shards", "group"))
    """
    state: dict[str, Progress] = {}

    def report(done: int, total: int) -> None:
        shown = state.get("progress")
        if shown is None:
            shown = state["progress"] = Progress(stage, total, unit, **options)
        if done > shown.done:
            shown.update(done - shown.done)
        if total and done >= total:
            shown.close()

    return report


def batch_images(batch: Any) -> int:
    """Images in a training batch: the length of its first tensor ((x, y) pairs, SimCLR's two views)."""
    while isinstance(batch, (list, tuple)) and batch:
        batch = batch[0]
    if isinstance(batch, dict) and batch:
        return batch_images(next(iter(batch.values())))
    shape = getattr(batch, "shape", None)
    return int(shape[0]) if shape else 0


def stage_name(module: Any) -> str:
    """A default stage name from the LightningModule's class: SimCLRModule -> 'simclr'."""
    name = type(module).__name__
    return (name[: -len("Module")] if name.endswith("Module") and name != "Module" else name).lower()


def __getattr__(name: str) -> Any:
    # ProgressLog subclasses Lightning's Callback: defined on first use, so decoding (which imports this
    # module) does not pay Lightning's import time.
    if name == "ProgressLog":
        cls = _define_progress_log()
        globals()["ProgressLog"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _define_progress_log() -> type:  # long: a class defined inside (Lightning imported lazily)
    from lightning.pytorch.callbacks import Callback

    class ProgressLog(Callback):
        """Lightning callback: a progress line every `interval` seconds of training, on rank 0 only.

        `remedis.training.make_trainer` adds it when Lightning's bar is off (no terminal, or `progress=False`).
        Images per second count every rank (batch size x world size); metrics are the ones Lightning's bar
        shows (`trainer.progress_bar_metrics`, e.g. loss, nt_xent, val_auroc).

        Args:
            stage: the stage name on every line (default: from the module's class, SimCLRModule -> simclr).
            interval: seconds between lines (default `progress_interval()`).
            write: where lines go (default `emit`).
            clock: seconds, monotonic (tests pass a fake one).

        Example:
            >>> trainer = L.Trainer(max_epochs=20, enable_progress_bar=False, callbacks=[ProgressLog("simclr")])
        """

        def __init__(self, stage: str | None = None, interval: float | None = None,
                     write: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic):
            self.stage = stage
            self.interval = progress_interval(interval)
            self.write = write or emit
            self.clock = clock
            self.lines = 0
            self._reset(clock())

        def _reset(self, now: float) -> None:
            self.start = self.last = now
            self.images = self.images_at_last = self.batches = 0

        def on_train_start(self, trainer, pl_module) -> None:
            self.stage = self.stage or stage_name(pl_module)
            self.lines = 0
            self._reset(self.clock())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
            if not trainer.is_global_zero:
                return
            self.images += batch_images(batch) * max(1, trainer.world_size)
            self.batches += 1
            now = self.clock()
            if now - self.last < self.interval:
                return
            steps = trainer.num_training_batches
            epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
            fraction = eta = None
            if math.isfinite(steps) and steps > 0 and epochs:
                position = trainer.current_epoch * steps + batch_idx + 1
                fraction = position / (epochs * steps)
                eta = (epochs * steps - position) * (now - self.start) / self.batches
            rate = (self.images - self.images_at_last) / max(now - self.last, 1e-9)
            metrics = {k: float(v) for k, v in trainer.progress_bar_metrics.items() if k != "v_num" and _is_number(v)}
            self.write(format_line(self.stage, batch_idx + 1, steps, rate, "img", epoch=trainer.current_epoch + 1,
                                   epochs=epochs, fraction=fraction, metrics=metrics, eta=eta))
            self.lines += 1
            self.last, self.images_at_last = now, self.images

        def on_train_end(self, trainer, pl_module) -> None:
            if trainer.is_global_zero and self.lines:  # a stage long enough to log also says when it ended
                took = self.clock() - self.start
                self.write(f"{self.stage} done: {self.batches} steps in {format_duration(took)} "
                           f"({self.images / max(took, 1e-9):.0f} img/s)")

    ProgressLog.__module__, ProgressLog.__qualname__ = __name__, "ProgressLog"  # picklable, a stable state_key
    return ProgressLog


def _is_number(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
