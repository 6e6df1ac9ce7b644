"""Write preprocessed images once as litdata shards, for pretraining that streams instead of caching.

`write_shards` decodes every record once (in `num_workers` processes, through `litdata.optimize`),
resizes it with the run's `Preprocessing` and stores it quantised: uint8 (`round(x * 255)`) for 8-bit
sources (PNG/JPEG/8-bit DICOM, RGB), uint16 (`round(x * 65535)`) for deeper ones (DICOM with
BitsStored > 8, 16-bit PNG/TIFF, NIfTI), decided per file from its header. A uint16 CT slice comes back
within one grey level of the float32 resize; an 8-bit image within 0.5/255.

A sample is one group of images of one (site, patient): `group_size` 1 makes every image its own sample
(supervised pretraining, SimCLR); `group_size` G > 1 (MICLe) splits a patient's images into as few
groups of at most G as possible, of near-equal sizes. Groups are shuffled with `seed` before writing,
so a chunk (and a batch) mixes sites and patients: litdata itself only shuffles the chunk order and
windows inside a chunk. Each sample holds (litdata pays per field, so the small ones share one JSON
string; `sample_meta` unpacks it):

    pixels       (G, C, S, S) uint8 or uint16 numpy array
    group        stable integer id (the group's position in the shuffled order; augmentation key)
    meta         JSON: labels (the G images' label strings), label (the first), label_index (of `label`
                 in the sidecar's `classes`; -1: unlabeled or multi-label), site, patient (salted
                 pseudonym HMAC-SHA256(salt, site + patient_id)[:16], never the clear id), hashes
                 (SHA-256 of each image file's bytes), images (G)

Unreadable files are skipped and counted with their reason; a group whose images all fail is no
sample. `remedis-shards.json` (written last, atomically) records the format, preprocessing, read
options, group size, seed, the keys of the inputs and the counts. Writing the same records (same
file contents) with the same settings again reuses the folder (a stat check, else a content check);
a folder holding other shards is refused unless `overwrite=True` (nothing is silently replaced).
Shards are written to a hidden sibling folder and moved into place when complete, so a killed write
never leaves a half folder that looks finished.

Example:
    >>> shards = write_shards(manifest.select(split="train"), Preprocessing(224), "runs/x/shards", num_workers=8)
    >>> len(shards), shards.images, shards.failures[:1]     # samples, images, [(file, reason)]
    >>> shards = write_shards(records, Preprocessing(224), "runs/x/micle", group_size=4, salt=load_salt())
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import multiprocessing
import os
import secrets
import shutil
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from remedis.data.formats import format_of
from remedis.data.manifest import Record
from remedis.data.preprocess import Preprocessing
from remedis.data.readers import ImageReadError, read_image_bytes
from remedis.files import atomic_write_text, file_sha256

log = logging.getLogger("remedis")

FORMAT = 1
SIDECAR = "remedis-shards.json"
CHUNK_BYTES = 64 * 2**20  # litdata chunk size: ~64 MB (a small set is one chunk per worker)
SCALES = {"uint8": 255.0, "uint16": 65535.0}


class ShardError(ValueError):
    """A shard folder is missing, foreign or holds other shards; the message names the folder."""


@dataclass
class ShardSet:
    """A written shard folder: `meta` is its `remedis-shards.json`.

    Args:
        folder: the folder holding litdata's index.json + chunk-*.bin and the sidecar.
        meta: the sidecar (format, preprocessing, counts, keys).
        failures: (file name, reason) of the records skipped as unreadable (empty when opened by folder).
        reused: True when `write_shards` found the folder already written for the same inputs.
    """

    folder: Path
    meta: dict[str, Any]
    failures: list[tuple[str, str]] = field(default_factory=list)
    reused: bool = False

    def __len__(self) -> int:
        return int(self.meta["samples"])

    @property
    def images(self) -> int:
        """Images in the shards (samples times their group sizes)."""
        return int(self.meta["images"])

    @property
    def preprocessing(self) -> Preprocessing:
        """The preprocessing the shards were written with."""
        return Preprocessing.from_dict(self.meta["preprocessing"])

    @property
    def sites(self) -> list[str]:
        """The sites of the shards' images."""
        return sorted(self.meta.get("sites", {}))

    @property
    def group_size(self) -> int:
        """Images of one patient per sample (MICLe groups; 1: one image)."""
        return int(self.meta["group_size"])


def sample_meta(sample: dict[str, Any]) -> dict[str, Any]:
    """A raw shard sample's fields (group, labels, label, label_index, site, patient, hashes, images)."""
    return {"group": int(sample["group"]), **json.loads(sample["meta"])}


def open_shards(folder: str | Path | ShardSet) -> ShardSet:
    """The `ShardSet` of a folder written by `write_shards` (a `ShardSet` is returned as is).

    Raises:
        ShardError: no sidecar, an unreadable one, or another format version; the message names the folder.
    """
    if isinstance(folder, ShardSet):
        return folder
    folder = Path(folder).expanduser().absolute()
    meta = _read_meta(folder)
    if meta is None:
        raise ShardError(f"{folder}: no readable {SIDECAR}; not a remedis shard folder "
                         "(write one with `remedis data shard MANIFEST --output DIR`)")
    if meta.get("format") != FORMAT:
        raise ShardError(f"{folder}: shard format {meta.get('format')!r}, this remedis reads format {FORMAT}; "
                         "write the shards again (`remedis data shard ... --overwrite`)")
    if not (folder / "index.json").is_file():
        raise ShardError(f"{folder}: {SIDECAR} present but litdata's index.json is missing")
    return ShardSet(folder, meta)


def write_shards(  # long: half docstring (eleven options); steps are helpers
        records: Iterable[Record], preprocessing: Preprocessing, output: str | Path, *,
        read_options: dict[str, Any] | None = None, group_size: int = 1, seed: int = 0,
        num_workers: int = 1, salt: bytes | str | None = None,
        progress: Callable[[int, int], None] | None = None, overwrite: bool = False) -> ShardSet:
    """Decode, resize, quantise and write `records` as litdata shards in `output` (see the module doc).

    Args:
        records: manifest records (a `Manifest` works too); labels may be "" (SimCLR).
        preprocessing: the run's `Preprocessing` (size, channels, aspect); stored in the sidecar.
        output: the shard folder (created; must be empty, hold these shards already, or `overwrite`).
        read_options: `read_image` keywords beyond the preprocessing's own (e.g. {"window": [40, 400]}).
        group_size: images per sample: 1, or G > 1 to group each patient's images for MICLe.
        seed: shuffles the sample order before writing (so chunks mix sites) and numbers the groups.
        num_workers: decoding processes.
        salt: secret for the patient pseudonyms (e.g. `remedis.data.index.load_salt()`): the same salt
            gives the same pseudonyms across writes. None: a random one per write (pseudonyms then only
            tell patients apart within this shard set).
        progress: called as progress(groups done, groups) about twice a second while writing.
        overwrite: replace shards of other inputs or settings found in `output` (else ShardError).

    Returns:
        The `ShardSet` (`reused` True when the folder already held these shards: nothing was decoded).

    Raises:
        ShardError: `output` holds other shards or files (without `overwrite`), or no record could be read.
    """
    t0 = time.perf_counter()
    records = list(getattr(records, "records", records))
    if not records:
        raise ShardError(f"{output}: no records to write")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    output = Path(output).expanduser().absolute()
    own = getattr(preprocessing, "read_options", None)
    options = {**(own() if callable(own) else {"channels": getattr(preprocessing, "channels", 1)}), **(read_options or {})}
    salt_bytes = salt.encode() if isinstance(salt, str) else salt
    config = {"format": FORMAT, "preprocessing": preprocessing.to_dict(), "read_options": _jsonable(options),
              "group_size": int(group_size), "seed": int(seed),
              "salt": hashlib.sha256(b"remedis-shards\0" + salt_bytes).hexdigest()[:16] if salt_bytes else None}
    config_key = _digest(config)
    rows = [[r.label, r.site, r.patient_id] for r in records]
    stat_key = _digest([config_key, [[*_stat(r.image), *row] for r, row in zip(records, rows)]])
    old = _read_meta(output)
    reused = _reuse(output, old, records, rows, config_key, stat_key)
    if reused is not None:
        return reused
    _check_output(output, old, config, overwrite)

    classes = sorted({lab for r in records for lab in r.labels})
    secret = salt_bytes or secrets.token_bytes(32)
    groups = _groups(records, group_size, seed, secret)
    tmp = output.parent / f".{output.name}.writing-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    _remove_stale(output)
    logs = tmp / ".logs"
    logs.mkdir(parents=True)
    try:
        encoder = _Encoder(preprocessing, options, str(logs), groups, [(Path(r.image), r.label) for r in records], classes)
        _optimize(encoder, len(groups), tmp, num_workers, progress, logs)
        result = _collect(logs, len(records))
        if not result["groups"]:
            first = next(iter(result["failures"].items()), (0, "no image"))
            raise ShardError(f"{output}: none of the {len(records)} image(s) could be read "
                             f"(first: {records[first[0]].image.name}: {first[1]})")
        shutil.rmtree(logs)
        meta = _meta(config, config_key, stat_key, records, rows, result, tmp, classes, time.perf_counter() - t0)
        _write_json(tmp / SIDECAR, meta)
        _move_into_place(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shards = ShardSet(output, meta, _failures(records, meta))
    if shards.failures:
        log.warning("skipped %d unreadable image(s) of %d; first: %s: %s", len(shards.failures), len(records), *shards.failures[0])
    log.info("wrote %d shard samples (%d images) to %s in %.1f s", len(shards), shards.images, output, meta["seconds"])
    return shards


# ---------------------------------------------------------------------------------------------- writing


class _Encoder:
    """Group id -> one shard sample (a generator: nothing when every image of the group fails); runs in
    litdata's forked worker processes, which inherit the groups. Tasks are plain ints, so litdata finds
    no file paths in them (it would otherwise try to "download" them). Each task appends its outcome
    to a per-process log."""

    def __init__(self, preprocessing: Preprocessing, read_options: dict[str, Any], log_dir: str, groups: list[tuple],
                 records: list[tuple[Path, str]], classes: list[str]):
        self.preprocessing, self.read_options, self.log_dir = preprocessing, read_options, log_dir
        self.groups, self.records = groups, records  # groups[g] = (site, pseudonym, [record index]); records[i] = (path, label)
        self.classes = {c: i for i, c in enumerate(classes)}
        self._threads_set = False
        self._log_fd: int | None = None  # this process's log, opened on first use (O_APPEND: one write per task)

    def __call__(self, group: int):
        if not self._threads_set:
            import torch

            torch.set_num_threads(1)  # one image at a time per process; threads would oversubscribe
            self._threads_set = True
        site, patient, indices = self.groups[group]
        arrays, labels, hashes, lines, deep = [], [], [], [], False
        for index in indices:
            path, label = self.records[index]
            x, bits_or_reason, digest = self._one(path)
            lines.append(f"I {index} {digest or '-'} {'ok' if x is not None else bits_or_reason}")
            if x is not None:
                arrays.append(x)
                labels.append(label)
                hashes.append(digest)
                deep = deep or bits_or_reason > 8
        dtype, name = (np.uint16, "uint16") if deep else (np.uint8, "uint8")
        lines.insert(0, f"G {group} {len(arrays)} {name}")
        if self._log_fd is None:
            self._log_fd = os.open(os.path.join(self.log_dir, f"{os.getpid()}.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(self._log_fd, ("\n".join(lines) + "\n").encode())
        if not arrays:
            return
        pixels = np.empty((len(arrays), *arrays[0].shape), dtype=dtype)
        scale = SCALES[name]
        for k, x in enumerate(arrays):  # in place on the decoded float32 tensor: no extra copy
            np.rint(np.multiply(x, scale, out=x), out=x)
            pixels[k] = x
        meta = {"labels": labels, "label": labels[0], "label_index": self.classes.get(labels[0], -1), "site": site,
                "patient": patient, "hashes": hashes, "images": len(arrays)}
        yield {"pixels": pixels, "group": int(group), "meta": json.dumps(meta, separators=(",", ":"))}

    def _one(self, path: Path):
        """(float32 (C, S, S) array | None, bits | reason, sha256 | None) for one file."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            return None, f"cannot read file ({exc.strerror or exc})", None
        digest = hashlib.sha256(data).hexdigest()
        try:
            bits = source_bits(data, path.name)
            arr = read_image_bytes(data, name=str(path), **self.read_options)
            x = self.preprocessing.resize(arr).numpy()  # float32: the float16 `decode` loses 16-bit depth
        except ImageReadError as exc:
            return None, _reason(exc, path), digest
        except Exception as exc:  # noqa: BLE001 - one bad file must not end the job
            return None, _reason(f"{type(exc).__name__}: {exc}", path), digest
        return x, bits, digest


def source_bits(data: bytes, name: str) -> int:
    """8 or 16: the bit depth a file's pixels are stored with (its format's `bits`; 8 when the header cannot tell).

    DICOM: BitsStored (else BitsAllocated) > 8 -> 16; PNG/TIFF in PIL mode I;16 / I / F -> 16;
    NIfTI -> 16; everything else (JPEG, 8-bit PNG, RGB) -> 8.

    Example:
        >>> source_bits(open("ct.dcm", "rb").read(), "ct.dcm")
        16
    """
    try:
        return format_of(name, data[:132]).bits(data, name)
    except Exception:  # noqa: BLE001 - an unreadable header: the decoder will say why
        return 8


def _reuse(output: Path, old: dict | None, records: list[Record], rows: list[list[str]], config_key: str,
           stat_key: str) -> ShardSet | None:
    """The shards already in `output` when they were written from these records with this config: by the
    files' sizes and times, else (touched or moved files) by their contents; None otherwise."""
    if old is None or old.get("config_key") != config_key or not (output / "index.json").is_file():
        return None
    if old.get("stat_key") == stat_key:
        log.info("reusing shards %s (%d samples, %d images)", output, old["samples"], old["images"])
        return ShardSet(output, old, _failures(records, old), reused=True)
    hashes = [_file_sha256(r.image) for r in records]
    if old.get("content_key") != _content_key(config_key, hashes, rows):
        return None
    old["stat_key"] = stat_key
    _write_json(output / SIDECAR, old)
    log.info("reusing shards %s (same file contents; %d samples)", output, old["samples"])
    return ShardSet(output, old, _failures(records, old), reused=True)


def _groups(records: list[Record], group_size: int, seed: int, secret: bytes) -> list[tuple[str, str, list[int]]]:
    """(site, pseudonym, record indices) per group: one (site, patient), near-equal sizes <= group_size,
    shuffled; a group's id is its position in this list."""
    patients: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        patients[(r.site, r.patient_id)].append(i)
    groups = []
    for (site, patient), idx in patients.items():
        pseudo = hmac.new(secret, f"{site}\0{patient}".encode(), hashlib.sha256).hexdigest()[:16]
        n_groups = -(-len(idx) // group_size)
        for part in np.array_split(np.array(idx), n_groups):
            groups.append((site, pseudo, [int(i) for i in part]))
    order = np.random.default_rng(seed).permutation(len(groups))
    return [groups[k] for k in order.tolist()]


def _optimize(encoder: _Encoder, n_groups: int, folder: Path, num_workers: int, progress, logs: Path) -> None:
    import litdata

    logging.getLogger("litdata").setLevel(logging.WARNING)
    try:  # litdata's serializer check imports nibabel in every worker (0.3 s each): import it once, before the fork
        import nibabel  # noqa: F401
    except ImportError:
        pass
    tasks = list(range(n_groups))

    previous = multiprocessing.get_start_method(allow_none=True)
    stop = threading.Event()
    watcher = None
    if progress is not None:
        watcher = threading.Thread(target=_watch, args=(logs, len(tasks), progress, stop), daemon=True)
        watcher.start()
    try:
        # fork: workers inherit the imported modules (spawn would re-import torch in each, seconds);
        # ordered: each worker writes a fixed slice of the shuffled tasks, so the same inputs give the same chunks
        litdata.optimize(encoder, tasks, output_dir=str(folder), chunk_bytes=CHUNK_BYTES, num_workers=max(1, num_workers),
                         start_method="fork", reorder_files=False, keep_data_ordered=True, verbose=False)
    finally:
        stop.set()
        if watcher is not None:
            watcher.join()
        multiprocessing.set_start_method(previous, force=True)  # litdata sets it globally
    if progress is not None:
        progress(len(tasks), len(tasks))


def _watch(logs: Path, total: int, progress, stop: threading.Event) -> None:
    offsets: dict[str, int] = {}
    done = 0
    while not stop.wait(0.5):
        for name in os.listdir(logs):
            try:
                with open(logs / name, "rb") as fh:
                    fh.seek(offsets.get(name, 0))
                    chunk = fh.read()
            except OSError:
                continue
            end = chunk.rfind(b"\n") + 1
            offsets[name] = offsets.get(name, 0) + end
            done += chunk[:end].count(b"\nG ") + chunk[:end].startswith(b"G ")
        if done:
            progress(min(done, total), total)


def _collect(logs: Path, n_records: int) -> dict[str, Any]:
    groups: dict[int, tuple[int, str]] = {}  # group -> (images kept, dtype)
    hashes: list[str] = [""] * n_records
    failures: dict[int, str] = {}
    for name in sorted(os.listdir(logs)):
        for line in (logs / name).read_text().splitlines():
            parts = line.split(" ", 3)
            if parts[0] == "G" and len(parts) == 4 and int(parts[2]) > 0:
                groups[int(parts[1])] = (int(parts[2]), parts[3])
            elif parts[0] == "I" and len(parts) == 4:
                i = int(parts[1])
                hashes[i] = "" if parts[2] == "-" else parts[2]
                if parts[3] != "ok":
                    failures[i] = parts[3]
    return {"groups": groups, "hashes": hashes, "failures": dict(sorted(failures.items()))}


def _meta(config, config_key, stat_key, records, rows, result, folder: Path, classes, seconds) -> dict[str, Any]:
    import litdata

    index = json.loads((folder / "index.json").read_text())
    samples = sum(int(c["chunk_size"]) for c in index["chunks"])
    kept = [i for i in range(len(records)) if i not in result["failures"]]
    if samples != len(result["groups"]):
        raise ShardError(f"{folder}: litdata wrote {samples} samples, the workers reported {len(result['groups'])}")
    return {
        **config,
        "kind": "remedis-shards",
        "config_key": config_key,
        "stat_key": stat_key,
        "content_key": _content_key(config_key, result["hashes"], rows),
        "sources_sha256": hashlib.sha256("\n".join(result["hashes"]).encode()).hexdigest(),
        "records": len(records),
        "samples": samples,
        "images": len(kept),
        "multi_image_samples": sum(1 for n, _ in result["groups"].values() if n > 1),
        "patients": len({(records[i].site, records[i].patient_id) for i in kept}),
        "skipped": {"count": len(result["failures"]), "reasons": dict(Counter(result["failures"].values()).most_common())},
        "failures": [[i, reason] for i, reason in result["failures"].items()],
        "dtypes": dict(Counter(d for _, d in result["groups"].values())),
        "sites": dict(sorted(Counter(records[i].site for i in kept).items())),
        "labels": dict(sorted(Counter(records[i].label for i in kept).items())),
        "classes": classes,
        "image_size": int(config["preprocessing"]["image_size"]),
        "channels": int(config["preprocessing"].get("channels", 1)),
        "chunks": len(index["chunks"]),
        "seconds": round(seconds, 2),
        "litdata": litdata.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# ------------------------------------------------------------------------------------------- the folder


def _check_output(output: Path, old: dict | None, config: dict, overwrite: bool) -> None:
    if not output.exists():
        return
    if not output.is_dir():
        raise ShardError(f"{output}: exists and is not a folder")
    entries = [p.name for p in output.iterdir()]
    if not entries:
        return
    if old is not None:
        what = [k for k in ("preprocessing", "read_options", "group_size", "seed", "salt") if old.get(k) != config.get(k)]
        why = (f"shards with other {', '.join(what)}" if what
               else "shards of other source images (files, labels, sites or patients changed)")
    else:
        why = "files that are not remedis shards" if not {"index.json", SIDECAR} & set(entries) else "incomplete shards"
    if not overwrite:
        raise ShardError(f"{output}: holds {why}; choose another folder or overwrite (overwrite=True, "
                         "`remedis data shard --overwrite`)")
    if old is None and not {"index.json", SIDECAR} & set(entries) and not any(n.startswith("chunk-") for n in entries):
        raise ShardError(f"{output}: not empty and holds no shards ({len(entries)} entries); refusing to overwrite it")
    log.warning("overwriting shards in %s (%s)", output, why)


def _move_into_place(tmp: Path, output: Path) -> None:
    if not output.exists() or not any(output.iterdir()):
        if output.exists():
            output.rmdir()
        os.replace(tmp, output)
        return
    for p in output.iterdir():  # overwrite: remove the old shards (the sidecar first: never a stale "complete")
        if p.name == SIDECAR:
            p.unlink()
    for p in output.iterdir():
        if p.name == "index.json" or (p.name.startswith("chunk-") and p.name.endswith(".bin")):
            p.unlink()
    for p in sorted(tmp.iterdir(), key=lambda p: p.name == SIDECAR):  # the sidecar last
        os.replace(p, output / p.name)


def _remove_stale(output: Path) -> None:
    """Delete temp folders of killed writes to this output (their pid is gone)."""
    for p in output.parent.glob(f".{output.name}.writing-*"):
        try:
            pid = int(p.name.rsplit("-", 2)[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, IndexError, PermissionError, OSError):
            continue


def _read_meta(folder: Path) -> dict | None:
    try:
        meta = json.loads((folder / SIDECAR).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("kind") == "remedis-shards" else None


def _failures(records: list[Record], meta: dict) -> list[tuple[str, str]]:
    return [(records[i].image.name if i < len(records) else f"record {i}", reason) for i, reason in meta.get("failures", [])]


# ------------------------------------------------------------------------------------------------ small


def _stat(path: Path) -> list:
    try:
        st = os.stat(path)
        return [str(Path(path).absolute()), st.st_size, st.st_mtime_ns]
    except OSError:
        return [str(path), -1, -1]


def _file_sha256(path: Path) -> str:
    """The file's hash, or "" when it cannot be read (a file that vanished counts as changed)."""
    try:
        return file_sha256(path)
    except OSError:
        return ""


def _content_key(config_key: str, hashes: list[str], rows: list[list[str]]) -> str:
    return _digest([config_key, [[h, *row] for h, row in zip(hashes, rows)]])


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _reason(exc: Any, path: Path) -> str:
    """One line, without the file's name or path (names may carry patient identifiers)."""
    text = str(exc).split(": ", 1)[-1] if isinstance(exc, ImageReadError) else str(exc)
    text = text.replace(str(path), "<file>").replace(path.name, "<file>")
    return " ".join(text.split())[:300] or "unreadable"


def _write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True))
