"""Logging off the request path: answers go into a bounded queue; one thread writes them in batches.

The service hands each answer to `PredictionWriter.submit`, which never blocks and never raises: when the
queue is full (a store that is down or too slow) the row is dropped and counted, so logging can cost the
service neither latency nor availability. A batch is committed every `flush_s` seconds or `batch` rows, so
a killed process loses at most the rows of one interval. A batch the store refuses is retried with backoff
and dropped (counted) only after `max_attempts`.

Example:
    >>> from remedis.monitor.store import PredictionStore
    >>> w = PredictionWriter(PredictionStore("sqlite:///:memory:"))
    >>> w.submit({"key": "k1", "probabilities": {"a": 1.0}})
    True
    >>> w.close(); w.written
    1
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from remedis.monitor.store import PredictionStore

log = logging.getLogger("remedis.monitor")


class PredictionWriter:
    """A daemon thread that batches submitted rows into a `PredictionStore`.

    Args:
        store: where rows go.
        capacity: rows that may wait; beyond it rows are dropped and counted (`dropped`).
        batch: most rows per transaction.
        flush_s: longest a row waits before its batch is committed.
        max_attempts: tries per batch before it is dropped.
    """

    def __init__(self, store: PredictionStore, capacity: int = 10_000, batch: int = 256, flush_s: float = 0.5,
                 max_attempts: int = 5):
        self.store, self.batch, self.flush_s, self.max_attempts = store, batch, flush_s, max_attempts
        self._queue: queue.Queue = queue.Queue(capacity)
        self.written = self.dropped = self.failed_batches = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    def submit(self, row: dict[str, Any]) -> bool:
        """Queue one row; False (counted in `dropped`) when the queue is full."""
        try:
            self._queue.put_nowait(row)
            return True
        except queue.Full:
            self.dropped += 1
            return False

    def _take(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        deadline = time.monotonic() + self.flush_s
        while len(rows) < self.batch:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
            try:
                rows.append(self._queue.get(timeout=timeout))
            except queue.Empty:
                break
        return rows

    def _write(self, rows: list[dict[str, Any]]) -> None:
        for attempt in range(self.max_attempts):
            try:
                self.written += self.store.append(rows)
                return
            except Exception as exc:  # the store is down or refuses: retry, then count the loss
                log.warning("prediction log: %d row(s) not written (%s), attempt %d of %d", len(rows),
                            type(exc).__name__, attempt + 1, self.max_attempts)
                if self._stop.wait(min(2.0 ** attempt * 0.2, 5.0)) and attempt + 1 >= self.max_attempts:
                    break
        self.failed_batches += 1
        self.dropped += len(rows)

    def _run(self) -> None:
        while not (self._stop.is_set() and self._queue.empty()):
            rows = self._take()
            if rows:
                self._write(rows)
                for _ in rows:
                    self._queue.task_done()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every submitted row is written or dropped (polled with a deadline); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.02)
        return False

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, then stop the thread."""
        self._stop.set()
        self._thread.join(timeout)

    def stats(self) -> dict[str, int]:
        """Rows written, dropped and waiting; batches that failed every attempt."""
        return {"written": self.written, "dropped": self.dropped, "queued": self._queue.qsize(),
                "failed_batches": self.failed_batches}
