"""On-disk cache of decoded, resized images, so a second run (or epoch) never decodes again.

An entry is keyed by the SHA-256 of the file's bytes and by the preprocessing + reader options
(and a format version), so an edited file or a new image size is a miss, never a stale hit.
Hashing every file on every run would cost as much as reading it, so the content hash of a path
is memoised under (path, size, mtime_ns, inode), as git's index does, in an append-only log read
once per process; `verify=True` re-hashes. Unreadable files are cached too, with their reason, so a
bad file is not re-decoded each epoch.

New entries are stored in batches: one pack file (an (N, C, S, S) float16 .npy, written to a
temporary name then renamed) per `store` call, then one log line per entry appended with a single
O_APPEND write, so workers and concurrent runs may share a folder and a reader never sees a line
whose pack is missing. Creating a file per image would cost more than decoding it on some disks.

Layout: ROOT/v1-<config key>/pack-*.npy + entries.log ("<hash> <pack> <index>" or "<hash> ! <reason>");
ROOT/paths.log ("<path key> <hash>").

Example:
    >>> cache = DiskCache("~/.cache/remedis", Preprocessing(64))
    >>> x, reason = cache.load(Path("scan.dcm"))    # (C, 64, 64) float16 tensor, or None + reason
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from remedis.data.preprocess import Preprocessing
from remedis.data.readers import ImageReadError, read_image, read_image_bytes
from remedis.files import atomic_replace

CACHE_FORMAT = 2

Result = tuple[torch.Tensor | None, str | None]  # (pixels, None) or (None, why the file is unreadable)


def decode(path: Path, preprocessing: Preprocessing, data: bytes | None = None, **read_options: Any) -> torch.Tensor:
    """Read + resize one image to (C, S, S) float16 (the uncached path, shared with `load_images`);
    C is `preprocessing.channels`."""
    read_options = {**preprocessing.read_options(), **read_options}
    if data is None:
        arr = read_image(path, **read_options)
    else:
        arr = read_image_bytes(data, name=str(path), **read_options)
    return preprocessing.resize(arr).to(torch.float16)


class DiskCache:
    """Decoded, resized images on disk, keyed by file content and preprocessing: a second run decodes nothing, a
    changed file is decoded again."""

    def __init__(self, root: str | Path, preprocessing: Preprocessing, read_options: dict[str, Any] | None = None,
                 verify: bool = False):
        self.root = Path(root).expanduser()
        self.preprocessing = preprocessing
        self.read_options = dict(read_options or {})
        self.verify = verify
        config = json.dumps({"format": CACHE_FORMAT, "preprocessing": preprocessing.to_dict(),
                             "read": self.read_options}, sort_keys=True, default=str)
        self.folder = self.root / f"v{CACHE_FORMAT}-{hashlib.sha256(config.encode()).hexdigest()[:16]}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.paths_log = self.root / "paths.log"
        self.entries_log = self.folder / "entries.log"
        self.known: dict[str, str] = {}  # path key -> content hash
        for parts in _lines(self.paths_log, 2):
            if len(parts[1]) == 64:
                self.known[parts[0]] = parts[1]
        self.index: dict[str, tuple[str, int] | str] = {}  # content -> (pack, row) or failure reason
        for parts in _lines(self.entries_log, 3):
            if len(parts[0]) == 64:
                self.index[parts[0]] = parts[2] if parts[1] == "!" else (parts[1], int(parts[2]))
        self._packs: dict[str, np.ndarray | None] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def path_key(path: Path, st: os.stat_result) -> str:
        """A key for a path's current version (size, mtime, inode): finds its content hash without reading the file."""
        key = f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}".encode()
        return hashlib.sha256(key).hexdigest()[:32]

    def _entry(self, content: str | None) -> Result | None:
        where = self.index.get(content) if content else None
        if where is None:
            return None
        if isinstance(where, str):
            return None, where
        name, row = where
        if name not in self._packs:
            try:
                pack = np.load(self.folder / name, mmap_mode="r", allow_pickle=False)
                size = self.preprocessing.image_size
                ok = pack.dtype == np.float16 and pack.ndim == 4 and pack.shape[1:] == (self.preprocessing.channels, size, size)
                self._packs[name] = pack if ok else None
            except (OSError, ValueError, EOFError):
                self._packs[name] = None  # damaged or foreign pack: its entries are misses
        pack = self._packs[name]
        if pack is None or row >= len(pack):
            return None
        return torch.from_numpy(np.array(pack[row])), None

    def lookup(self, path: Path) -> Result | None:
        """The cached result for an unchanged file, or None (a miss). Never reads the file itself."""
        if self.verify:
            return None
        path = Path(path).absolute()
        try:
            st = path.stat()
        except OSError:
            return None
        hit = self._entry(self.known.get(self.path_key(path, st)))
        if hit is not None:
            self.hits += 1
        return hit

    def compute(self, path: Path) -> tuple[str | None, str | None, Result]:
        """(path key, content hash, result) for a miss: hash the bytes, reuse an entry with the same
        content (a copied or renamed file), else decode. Writes nothing: safe in worker processes."""
        path = Path(path).absolute()
        try:
            st = path.stat()
            data = path.read_bytes()
        except OSError as exc:
            return None, None, (None, f"cannot read file ({exc.strerror or exc})")
        key, content = self.path_key(path, st), hashlib.sha256(data).hexdigest()
        hit = self._entry(content)
        if hit is not None:
            self.hits += 1
            return key, content, hit
        self.misses += 1
        try:
            return key, content, (decode(path, self.preprocessing, data, **self.read_options), None)
        except ImageReadError as exc:
            return key, content, (None, str(exc).split(": ", 1)[-1])

    def store(self, computed: list[tuple[str | None, str | None, Result]]) -> None:
        """Persist results of `compute`: one pack for the new images, then the log lines."""
        new_images, entry_lines, path_lines = [], [], []
        name = f"pack-{uuid.uuid4().hex}.npy"
        for key, content, (x, reason) in computed:
            if content is None:
                continue  # unreadable path (missing file): nothing to key it by
            if content not in self.index:
                if x is not None:
                    self.index[content] = (name, len(new_images))
                    new_images.append(x.numpy())
                    entry_lines.append(f"{content} {name} {len(new_images) - 1}")
                else:
                    self.index[content] = " ".join(reason.split())
                    entry_lines.append(f"{content} ! {self.index[content]}")
            if key is not None and self.known.get(key) != content:
                self.known[key] = content
                path_lines.append(f"{key} {content}")
        if new_images:
            tmp = self.folder / f".tmp-{name}"
            with open(tmp, "wb") as fh:
                np.save(fh, np.stack(new_images), allow_pickle=False)
            atomic_replace(tmp, self.folder / name, durable=False)
        _append(self.entries_log, entry_lines)
        _append(self.paths_log, path_lines)

    def load(self, path: Path) -> Result:
        """(tensor, None) or (None, reason); decodes and stores on a miss."""
        hit = self.lookup(path)
        if hit is not None:
            return hit
        computed = self.compute(path)
        self.store([computed])
        return computed[2]


def _lines(path: Path, fields: int) -> list[list[str]]:
    try:
        text = path.read_text()
    except OSError:
        return []
    # A torn last line (a writer killed mid-append) has too few fields and is ignored.
    return [parts for parts in (line.split(" ", fields - 1) for line in text.splitlines()) if len(parts) == fields]


def _append(path: Path, lines: list[str]) -> None:
    if not lines:
        return
    # One write with O_APPEND: lines from concurrent writers do not interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, ("\n".join(lines) + "\n").encode())
    finally:
        os.close(fd)
