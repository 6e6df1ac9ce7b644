"""Files written so that a reader never sees half of them, and the content hash every artifact records.

One implementation for every stage and for `serving/`: checkpoints, OOD detectors, shard sidecars, the
decode cache, distributed markers, the gateway's spool. A write goes to a temporary sibling (named after
the process and thread, so concurrent writers never share one), is flushed to disk when `durable`, and is
renamed into place: a killed process leaves the old file or the new one, never a mix.

Example:
    >>> atomic_write(Path("runs/x/ood.json"), b'{"method": "knn"}', mode=0o644)
    >>> atomic_write_text(Path("runs/x/prepared.json"), "{}\\n")
    >>> file_sha256(Path("runs/x/model.safetensors"))[:12]
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

CHUNK = 1 << 20


def temporary_sibling(path: Path) -> Path:
    """A hidden name next to `path`, unique to this process and thread (`.name.<pid>.<thread>.tmp`)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes, durable: bool = True, mode: int | None = None) -> Path:
    """Write `data` to `path` so a reader sees either the old file or the whole new one.

    Args:
        path: the file to (re)place; its folder is created.
        data: the bytes.
        durable: fsync the file and its folder, so the write also survives a power cut.
        mode: permission bits for the new file (default: the process umask's).

    Returns:
        `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str, durable: bool = True, mode: int | None = None) -> Path:
    """`atomic_write` of UTF-8 text."""
    return atomic_write(path, text.encode("utf-8"), durable=durable, mode=mode)


def atomic_replace(tmp: str | Path, path: str | Path, durable: bool = True) -> Path:
    """Move a finished temporary file (written by a library that wants a path of its own) into place."""
    tmp, path = Path(tmp), Path(path)
    if durable:
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)
    return path


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks (hex digest)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)
    return h.hexdigest()
