"""Which process am I? Only training is distributed; everything else runs once, on the primary.

A multi-GPU or multi-node job starts one process per device, each running the whole command:
torchrun starts them all at once (RANK, LOCAL_RANK, WORLD_SIZE set), Lightning's own launcher
(`runtime.devices` > 1 without torchrun) re-runs the command in child processes when training starts
(LOCAL_RANK, NODE_RANK, WORLD_SIZE set), SLURM's srun sets SLURM_PROCID / SLURM_NTASKS. The data
preparation (splits, prepared manifests, shards) is done by the primary (global rank 0) while the
others wait for its marker file (`primary_first`); after training only the primary writes
(`is_primary`).

Example:
    >>> with primary_first("runs/x/prepared/.simclr-1a2b.done") as mine:
    ...     if mine:
    ...         write_prepared_manifest(...)
    >>> records = read_prepared_manifest(...)   # every rank, once the primary is done
    >>> if is_primary():
    ...     print("summary")
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from remedis.files import atomic_write_text

TIMEOUT_ENV = "REMEDIS_PRIMARY_TIMEOUT"
DEFAULT_TIMEOUT = 4 * 3600.0  # seconds the other ranks wait for the primary's data preparation


class PrimaryWaitError(RuntimeError):
    """A non-primary rank gave up waiting for the primary's marker (it failed, or it is too slow)."""


def _env_int(*names: str) -> int | None:
    for name in names:
        text = os.environ.get(name, "").strip()
        if text:
            try:
                return int(text)
            except ValueError:
                raise ValueError(f"environment variable {name}: expected an integer, got {text!r}") from None
    return None


def _dist():
    try:
        import torch.distributed as dist
    except ImportError:  # torch built without distributed support
        return None
    return dist if dist.is_available() and dist.is_initialized() else None


def _slurm_tasks() -> int | None:
    tasks = _env_int("SLURM_NTASKS")
    return tasks if tasks is not None and tasks > 1 else None


def local_rank() -> int:
    """This process's rank on its node (LOCAL_RANK, SLURM_LOCALID; 0 when not launched as a group).

    Example:
        >>> local_rank()
        0
    """
    value = _env_int("LOCAL_RANK")
    if value is None and _slurm_tasks():
        value = _env_int("SLURM_LOCALID")
    return value or 0


def node_rank() -> int:
    """This node's rank (NODE_RANK or GROUP_RANK as Lightning and torchrun set them, SLURM_NODEID; else 0)."""
    value = _env_int("NODE_RANK", "GROUP_RANK")
    if value is None and _slurm_tasks():
        value = _env_int("SLURM_NODEID")
    return value or 0


def rank() -> int:
    """The global rank: torch.distributed's when initialised, else RANK (torchrun), else SLURM_PROCID
    (srun with several tasks), else NODE_RANK x LOCAL_WORLD_SIZE + LOCAL_RANK (Lightning's launcher;
    any rank on a node other than 0 counts as non-primary even when the node's size is unknown).

    Example:
        >>> rank()
        0
    """
    dist = _dist()
    if dist is not None:
        return dist.get_rank()
    value = _env_int("RANK")
    if value is not None:
        return value
    if _slurm_tasks():
        value = _env_int("SLURM_PROCID")
        if value is not None:
            return value
    node, local = node_rank(), local_rank()
    return node * (_env_int("LOCAL_WORLD_SIZE") or 1) + local if node else local


def world_size() -> int:
    """Processes in the job: torch.distributed's, else WORLD_SIZE, else SLURM_NTASKS, else 1. Under
    Lightning's launcher the first process sees 1 until training starts its children.

    Example:
        >>> world_size()
        1
    """
    dist = _dist()
    if dist is not None:
        return dist.get_world_size()
    return _env_int("WORLD_SIZE") or _slurm_tasks() or 1


def is_primary() -> bool:
    """True on global rank 0: the process that prepares data and writes summaries, reports and exports."""
    return rank() == 0


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def wait_for(marker: str | Path, timeout: float | None = None, poll: float = 1.0,
             clock: Callable[[], float] = time.monotonic) -> None:
    """Wait until `marker` exists (what the non-primary ranks do in `primary_first`).

    Args:
        marker: the marker file.
        timeout: seconds to wait (default $REMEDIS_PRIMARY_TIMEOUT, else 4 h).
        poll: seconds between looks.
        clock: seconds, monotonic.

    Raises:
        PrimaryWaitError: the primary wrote `<marker>.failed` while this rank waited, or the time ran out.

    Example:
        >>> wait_for("runs/x/prepared/simclr-1a2b/.done", timeout=600)
    """
    marker = Path(marker)
    failed = marker.with_name(marker.name + ".failed")
    stale = _mtime(failed)  # left by an earlier launch: not this one's failure
    if timeout is None:
        timeout = float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT)
    start = clock()
    while not marker.is_file():
        seen = _mtime(failed)
        if seen is not None and seen != stale:
            reason = failed.read_text(errors="replace").strip()
            raise PrimaryWaitError(f"rank {rank()}: rank 0 failed while preparing {marker.parent} ({reason})")
        if clock() - start > timeout:
            raise PrimaryWaitError(
                f"rank {rank()}: waited {timeout:.0f} s for {marker}, which rank 0 writes once it has prepared "
                f"the data; is rank 0 still running, and is {marker.parent} on a file system every node shares? "
                f"(set {TIMEOUT_ENV} to wait longer)")
        time.sleep(poll)


@contextmanager
def primary_first(marker: str | Path, timeout: float | None = None, poll: float = 1.0) -> Iterator[bool]:
    """Let the primary do some work first: it enters with True (do the work), and on success the marker
    file is written atomically; the other ranks wait for the marker and enter with False. A marker that
    already exists means the work is done: every rank enters with False.

    Name the marker after what the work depends on (e.g. a hash of the inputs), in a folder every rank
    sees: a marker an earlier run left for other inputs is then never taken for this one's. When the
    primary fails, `<marker>.failed` carries its error and the waiting ranks stop with it.

    Args:
        marker: the marker file's path.
        timeout: seconds the other ranks wait (default $REMEDIS_PRIMARY_TIMEOUT, else 4 h).
        poll: seconds between looks for the marker.

    Raises:
        PrimaryWaitError: on a non-primary rank, when the primary failed or the wait timed out.

    Example:
        >>> with primary_first(out / ".prepared-3f2a.done") as mine:
        ...     if mine:
        ...         prepare(out)
    """
    marker = Path(marker)
    if marker.is_file():
        yield False
        return
    if not is_primary():
        wait_for(marker, timeout, poll)
        yield False
        return
    failed = marker.with_name(marker.name + ".failed")
    failed.unlink(missing_ok=True)
    try:
        yield True
    except BaseException as exc:
        atomic_write_text(failed, f"{type(exc).__name__}: {exc}")
        raise
    atomic_write_text(marker, json.dumps({"rank": rank(), "host": socket.gethostname(), "pid": os.getpid(),
                                      "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
