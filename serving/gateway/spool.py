"""The gateway's spool: every received instance and every result lives on disk until its next step is done.

Layout under the spool folder (one file system, so every move is an atomic rename):

    incoming/<series>/<sop>.dcm   received, success answered only after the file is in place
    work/<batch>/<sop>.dcm        a quiet series claimed for processing (a batch: one SR)
    outbox/<batch>/*.dcm          results written, waiting for the destination's acknowledgement
    results/<batch>/*.dcm         results acknowledged (or kept here when there is no destination)
    failed/<batch>/               instances the model refused, with reasons.tsv
    counters.json                 received / processed / sent / failed / ignored / refused, kept across restarts

Folder names are hashes of UIDs, never patient data. A crash at any point leaves each instance in
exactly one of these places; `recover` puts claimed-but-unfinished batches back in line, and result
UIDs are derived from the batch's instances, so a batch processed twice yields the same SR (the PACS
stores it once).

Example:
    >>> spool = Spool("spool")
    >>> spool.receive(dataset_bytes, series_uid, sop_uid)
    >>> spool.quiet_series(5.0)
    ['4f1c...']
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

from remedis.files import atomic_write, fsync_dir

STAGES = ("incoming", "work", "outbox", "results", "failed", "unprocessed", "series")
FILE_MODE = 0o600  # every file the spool writes (instances, results, histories, reasons)
COUNTERS = ("received", "processed", "sent", "failed", "ignored", "refused", "send_errors", "failed_batches",
            "sanitised_values", "not_processed")


def uid_key(uid: str) -> str:
    """A short, stable, file-system-safe name for a UID (UIDs are public, but keep paths uniform)."""
    return hashlib.sha256(uid.encode()).hexdigest()[:24]


class Spool:
    """The gateway's spool on disk: incoming series, claimed batches, results waiting in the outbox, delivered
    results, failures; every move atomic, so a killed gateway loses nothing."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)  # patient data at rest: only the gateway's user reads the spool
        for s in STAGES:
            (self.root / s).mkdir(parents=True, exist_ok=True, mode=0o700)
        self.lock = threading.Lock()  # receive vs claim of the same series
        self._counter_lock = threading.Lock()
        self.counters = {k: 0 for k in COUNTERS}
        saved = self.root / "counters.json"
        if saved.is_file():
            try:
                self.counters.update({k: int(v) for k, v in json.loads(saved.read_text()).items() if k in COUNTERS})
            except (ValueError, OSError):
                pass

    def dir(self, stage: str) -> Path:
        """The folder of one stage (incoming, work, outbox, results, failed)."""
        return self.root / stage

    # ---- counters -------------------------------------------------------------------------------

    def count(self, name: str, n: int = 1) -> None:
        """Add to a counter and persist it (renamed into place, not fsync'd: a killed process loses
        nothing; a power cut may lose the last counts, never an instance)."""
        with self._counter_lock:
            self.counters[name] += n
            atomic_write(self.root / "counters.json", json.dumps(self.counters).encode(), durable=False, mode=FILE_MODE)

    def status(self) -> dict:
        """Counters plus what is waiting in each stage (instances incoming/claimed, results unsent)."""
        with self._counter_lock:
            counters = dict(self.counters)
        return {**counters, "queued": self._files("incoming", ".dcm") + self._files("work", ".dcm"),
                "results_unsent": self._files("outbox")}

    def _files(self, stage: str, suffix: str = "") -> int:
        """Files in the stage's batch folders (half-written temporaries left out). Folders move while the
        workers run (claimed, finished, delivered): one that vanished mid-count counts nothing."""
        n = 0
        for d in self.dir(stage).iterdir():
            if d.name.startswith("."):
                continue
            try:
                n += sum(1 for p in d.iterdir() if p.name.endswith(suffix) and not p.name.startswith("."))
            except (FileNotFoundError, NotADirectoryError):
                continue
        return n

    # ---- receive and claim ------------------------------------------------------------------------

    def receive(self, data: bytes, series_uid: str, sop_uid: str) -> Path:
        """Store one instance durably (fsync'd, atomically renamed) before its C-STORE is answered, in the folder
        of its group: `series_uid` is its series, or its study with the gateway's `trigger: study`."""
        with self.lock:
            path = self.dir("incoming") / uid_key(series_uid) / f"{uid_key(sop_uid)}.dcm"
            atomic_write(path, data, mode=FILE_MODE)
            os.utime(path.parent)  # the series' quiet period starts again
        self.count("received")
        return path

    def series_history(self, route: int, series_uid: str) -> dict:
        """What earlier batches of a series gave (`record_series`): {"instances": [{header, answer}], "srs": [UIDs]}."""
        path = self.dir("series") / f"{route}-{uid_key(series_uid)}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {"instances": [], "srs": []}

    def record_series(self, route: int, series_uid: str, history: dict) -> None:
        """Keep a series' answered instances (headers without pixels, answers) and its SRs' UIDs, so that a
        series that grows gets one SR covering all of it, superseding the earlier ones. Purged with results."""
        atomic_write(self.dir("series") / f"{route}-{uid_key(series_uid)}.json", json.dumps(history).encode(), mode=FILE_MODE)

    def keep_unprocessed(self, data: bytes, series_uid: str, sop_uid: str, reason: str) -> Path:
        """Store an instance the gateway acknowledges but cannot process (video), durably, with the reason beside
        it in unprocessed/<series>/; purged like failures after the retention period."""
        folder = self.dir("unprocessed") / uid_key(series_uid)
        path = folder / f"{uid_key(sop_uid)}.dcm"
        atomic_write(path, data, mode=FILE_MODE)
        atomic_write(folder / f"{uid_key(sop_uid)}.reason.txt", (reason + "\n").encode(), mode=FILE_MODE)
        self.count("not_processed")
        return path

    def quiet_series(self, quiet_s: float) -> list[Path]:
        """Incoming series folders with nothing new for `quiet_s` seconds, oldest first."""
        now = time.time()
        out = []
        for d in self.dir("incoming").iterdir():
            if d.is_dir():
                try:
                    newest = max([d.stat().st_mtime] + [p.stat().st_mtime for p in d.glob("*.dcm")])
                except FileNotFoundError:
                    continue
                if now - newest >= quiet_s:
                    out.append((newest, d))
        return [d for _, d in sorted(out)]

    def claim(self, series_dir: Path) -> Path | None:
        """Move a quiet series to work/ as one batch (named after its instances); None if empty."""
        with self.lock:
            files = sorted(series_dir.glob("*.dcm"))
            if not files:
                shutil.rmtree(series_dir, ignore_errors=True)
                return None
            batch = hashlib.sha256("".join(p.stem for p in files).encode()).hexdigest()[:24]
            target = self.dir("work") / batch
            if target.exists():  # the same instances again (a resend): merge, keep one copy each
                for p in files:
                    os.replace(p, target / p.name)
                shutil.rmtree(series_dir, ignore_errors=True)
            else:
                os.replace(series_dir, target)
            fsync_dir(self.dir("work"))
            return target

    def pending_batches(self) -> list[Path]:
        """Claimed batches not yet finished (after a crash: the ones to process again)."""
        return sorted((d for d in self.dir("work").iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime)

    # ---- results ----------------------------------------------------------------------------------

    def finish(self, batch: Path, results: dict[str, bytes]) -> Path:
        """Put a batch's results in the outbox, then drop its instances (the PACS has them).

        The outbox folder appears complete or not at all (written beside it, then renamed)."""
        out = self.dir("outbox") / batch.name
        if results and not out.exists():
            tmp = self.dir("outbox") / f".{batch.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            for name, data in results.items():
                atomic_write(tmp / name, data, mode=FILE_MODE)
            if self.dir("results").joinpath(batch.name).exists():  # processed and sent before a crash
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                os.replace(tmp, out)
                fsync_dir(self.dir("outbox"))
        shutil.rmtree(batch, ignore_errors=True)
        return out

    def keep_failed(self, batch_name: str, items: list[tuple[Path, str]]) -> Path:
        """Move the instances of a batch that the model refused to failed/<batch>/, reasons beside them."""
        target = self.dir("failed") / batch_name
        target.mkdir(parents=True, exist_ok=True)
        lines = []
        for path, reason in items:
            if path.exists():
                os.replace(path, target / path.name)
            lines.append(f"{path.stem}\t{reason}")
        atomic_write(target / "reasons.tsv", ("\n".join(lines) + "\n").encode(), mode=FILE_MODE)
        return target

    def dead_letter(self, batch: Path, reason: str) -> int:
        """Move every instance left in a claimed batch to failed/<batch>/ with one reason (a batch that keeps
        failing, or that the service rejected as a client error), and drop the batch; returns the instances moved."""
        files = sorted(batch.glob("*.dcm"))
        self.keep_failed(batch.name, [(f, reason) for f in files])
        shutil.rmtree(batch, ignore_errors=True)
        return len(files)

    def free_bytes(self) -> int:
        """Free disk space where the spool lives."""
        return shutil.disk_usage(self.root).free

    def purge(self, older_than_s: float, now: float | None = None) -> int:
        """Delete delivered results and failures whose folders were last changed more than `older_than_s` ago
        (the PACS holds the results; failures are kept that long for a look); returns the folders removed."""
        cutoff = (time.time() if now is None else now) - older_than_s
        removed = 0
        for stage in ("results", "failed", "unprocessed", "series"):
            for d in self.dir(stage).iterdir():
                try:
                    if not d.name.startswith(".") and d.stat().st_mtime < cutoff:
                        shutil.rmtree(d) if d.is_dir() else d.unlink()
                        removed += 1
                except OSError:  # moved or removed meanwhile
                    continue
        return removed

    def results_of(self, out: Path) -> list[Path]:
        """The result files of an outbox batch, by name (any media type; temporaries excluded)."""
        return sorted(p for p in out.iterdir() if p.is_file() and not p.name.startswith("."))

    def outbox(self) -> list[Path]:
        """The outbox batches, oldest first."""
        return sorted((d for d in self.dir("outbox").iterdir() if d.is_dir() and not d.name.startswith(".")),
                      key=lambda d: d.stat().st_mtime)

    def delivered(self, out: Path) -> None:
        """The destination acknowledged every result of this batch: move it to results/."""
        target = self.dir("results") / out.name
        if target.exists():
            shutil.rmtree(out, ignore_errors=True)
        else:
            os.replace(out, target)
        fsync_dir(self.dir("results"))

    def recover(self) -> None:
        """After a crash: drop half-written temporaries. Claimed batches stay in work/ and are processed
        again (their results are reproducible); unsent results stay in the outbox."""
        for stage in STAGES:
            for tmp in self.dir(stage).rglob(".*.tmp"):
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    tmp.unlink(missing_ok=True)
