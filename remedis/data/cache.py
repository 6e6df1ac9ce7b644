"""On-disk cache of decoded, resized images, so a second run (or epoch) never decodes again.

An entry is keyed by the SHA-256 of the file's bytes and by the preprocessing + reader options
(and a format version), so an edited file or a new image size is a miss, never a stale hit.
Hashing every file on every run would cost as much as reading it, so the content hash of a path
is memoised under (path, size, mtime_ns, inode), as git's index does, in an append-only log read
once per process; `verify=True` re-hashes.
Unreadable files are cached too, with their reason, so a bad file is not re-decoded each epoch.
Entries are written atomically (temporary file, then rename): workers and concurrent runs may share
a cache folder.

Layout: ROOT/v1-<config key>/<hash>.npy (or .err); ROOT/paths.log: "<path key> <hash>" lines.

Example:
    >>> cache = DiskCache("~/.cache/remedis", Preprocessing(64))
    >>> x, reason = cache.load(Path("scan.dcm"))    # (1, 64, 64) float16 tensor, or None + reason
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from remedis.data.preprocess import Preprocessing
from remedis.data.readers import NIFTI_SUFFIXES, ImageReadError, read_image, read_image_bytes

CACHE_FORMAT = 1


def decode(path: Path, preprocessing: Preprocessing, data: bytes | None = None, **read_options: Any) -> torch.Tensor:
    """Read + resize one image to (1, S, S) float16 (the uncached path, shared with `load_images`)."""
    if path.name.lower().endswith(NIFTI_SUFFIXES) or data is None:
        arr = read_image(path, **read_options)
    else:
        arr = read_image_bytes(data, name=str(path), **read_options)
    return preprocessing.resize(arr).to(torch.float16)


class DiskCache:
    def __init__(self, root: str | Path, preprocessing: Preprocessing, read_options: dict[str, Any] | None = None,
                 verify: bool = False):
        self.root = Path(root).expanduser()
        self.preprocessing = preprocessing
        self.read_options = dict(read_options or {})
        self.verify = verify
        config = json.dumps({"format": CACHE_FORMAT, "preprocessing": preprocessing.to_dict(),
                             "read": self.read_options}, sort_keys=True, default=str)
        self.entries = self.root / f"v{CACHE_FORMAT}-{hashlib.sha256(config.encode()).hexdigest()[:16]}"
        self.entries.mkdir(parents=True, exist_ok=True)
        self.log = self.root / "paths.log"
        self.known: dict[str, str] = {}
        try:
            for line in self.log.read_text().splitlines():
                parts = line.split(" ")
                if len(parts) == 2 and len(parts[1]) == 64:  # a torn last line is ignored
                    self.known[parts[0]] = parts[1]
        except OSError:
            pass
        self._made: set[Path] = set()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _path_key(path: Path, st: os.stat_result) -> str:
        key = f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}".encode()
        return hashlib.sha256(key).hexdigest()[:32]

    def _remember(self, key: str, content: str) -> None:
        self.known[key] = content
        # One short O_APPEND write per line: concurrent writers (workers, runs) do not interleave.
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{key} {content}\n".encode())
        finally:
            os.close(fd)

    def _entry(self, content: str) -> Path:
        return self.entries / content  # flat: one folder creation per cache, not per entry

    def lookup(self, path: Path) -> tuple[torch.Tensor | None, str | None] | None:
        """The cached result for an unchanged file, or None (a miss: call `load`). Never decodes."""
        if self.verify:
            return None
        path = Path(path).absolute()
        try:
            st = path.stat()
        except OSError:
            return None
        content = self.known.get(self._path_key(path, st))
        hit = self._read_entry(self._entry(content)) if content else None
        if hit is not None:
            self.hits += 1
        return hit

    def load(self, path: Path) -> tuple[torch.Tensor | None, str | None]:
        """(tensor, None) or (None, reason); decodes and stores on a miss."""
        hit = self.lookup(path)
        if hit is not None:
            return hit
        path = Path(path).absolute()
        try:
            st = path.stat()
        except OSError as exc:
            return None, f"cannot read file ({exc.strerror or exc})"
        key = self._path_key(path, st)
        try:
            data = path.read_bytes()
        except OSError as exc:
            return None, f"cannot read file ({exc.strerror or exc})"
        content = hashlib.sha256(data).hexdigest()
        entry = self._entry(content)
        hit = self._read_entry(entry)
        if hit is None:
            self.misses += 1
            try:
                x = decode(path, self.preprocessing, data, **self.read_options)
                self._write(entry.with_suffix(".npy"), lambda fh: np.save(fh, x.numpy(), allow_pickle=False))
                hit = (x, None)
            except ImageReadError as exc:
                reason = str(exc).split(": ", 1)[-1]
                self._write(entry.with_suffix(".err"), lambda fh: fh.write(reason.encode()))
                hit = (None, reason)
        else:
            self.hits += 1
        if self.known.get(key) != content:
            self._remember(key, content)
        return hit

    def _write(self, target: Path, write) -> None:
        if target.parent not in self._made:
            target.parent.mkdir(parents=True, exist_ok=True)
            self._made.add(target.parent)
        _atomic_write(target, write)

    def _read_entry(self, entry: Path) -> tuple[torch.Tensor | None, str | None] | None:
        """The cached result, or None on a miss (absent, damaged or foreign entry: decode again)."""
        try:
            arr = np.load(entry.with_suffix(".npy"), allow_pickle=False)
        except FileNotFoundError:
            try:
                return None, entry.with_suffix(".err").read_text()
            except OSError:
                return None
        except (OSError, ValueError, EOFError):
            return None
        size = self.preprocessing.image_size
        if arr.shape != (1, size, size) or arr.dtype != np.float16:
            return None
        return torch.from_numpy(arr), None


def _atomic_write(target: Path, write) -> None:
    tmp = target.parent / f".tmp-{os.getpid()}-{target.name}"  # unique per process and entry
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
