"""A candidate model version run in shadow: the same traffic as the primary, answers logged, never returned.

A site proves a new version before it replaces the old: with `shadow.model` set (a BentoML tag in the same
store), the API worker loads that version once, on the CPU, and after each primary answer hands the upload to
a background thread that reads it with the candidate's own preprocessing, contract, calibration and OOD
detector and appends the candidate's answer to the prediction log with `role: shadow` and the same key.
`remedis monitor compare` then gives agreement, rate changes and, with labels, the paired AUROC difference.
The shadow never delays or changes an answer: when its queue is full an image is skipped and counted.

Example (serving.yaml):
    monitor: {store: "sqlite:///var/lib/remedis/predictions.db"}
    shadow: {model: "site-b:v4"}
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path

from remedis.adapt.calibration import Calibration
from remedis.data.contract import InputContract
from remedis.data.preprocess import Preprocessing
from remedis.models.checkpoint import read_meta
from serving.answer import answers, prepare
from serving.inputs import Upload
from serving.monitoring import ServiceMonitor
from serving.settings import MonitorSettings

log = logging.getLogger("remedis.serving")


class ShadowModel:
    """The candidate version: its model folder on the CPU and a thread that answers queued uploads.

    Args:
        folder: the candidate's model folder (from the BentoML store).
        model: its name and version, as logged.
        monitor: the prediction log's settings (the same store as the primary's).
        secret: the site's secret (the keys must equal the primary's).
        capacity: uploads that may wait; beyond it an image is skipped (counted in `skipped`).
    """

    def __init__(self, folder: str | Path, model: dict[str, str], monitor: MonitorSettings, secret: bytes,
                 capacity: int = 256):
        from remedis.adapt.ood import OODDetector
        from serving.runtime import ModelRuntime

        folder = Path(folder)
        meta = read_meta(folder)
        self.runtime = ModelRuntime.load(folder, gpu=0, precision="auto", channels_last=True, threads=1)
        self.class_names: list[str] = list(meta["class_names"])
        self.preprocessing = Preprocessing.from_dict(meta["preprocessing"])
        self.calibration = Calibration.from_meta(meta)
        self.detector = OODDetector.load(folder)
        self.contract = InputContract.from_dict(meta["input_contract"]) if meta.get("input_contract") else None
        positive = self.class_names[self.calibration.positive_index] if len(self.class_names) == 2 else None
        self.monitor = ServiceMonitor(monitor, model, meta.get("weights_sha256"), secret=secret, positive_class=positive)
        self.skipped = self.failed = 0
        self._queue: queue.Queue = queue.Queue(capacity)
        self._thread = threading.Thread(target=self._run, name="shadow-model", daemon=True)
        self._thread.start()

    def submit(self, up: Upload, caller: str) -> bool:
        """Queue an upload the primary answered; False (counted) when the queue is full."""
        try:
            self._queue.put_nowait((up, caller))
            return True
        except queue.Full:
            self.skipped += 1
            return False

    def answer(self, up: Upload, caller: str) -> str:
        """The candidate's answer to one upload, logged with role shadow; returns the key."""
        x, reasons = prepare(up, self.preprocessing, self.contract)
        out = self.runtime.forward(x[None])
        result = answers(out, self.class_names, self.calibration, self.detector, [reasons], self.contract is not None)[0]
        return self.monitor.record(up, result, caller, out[0, len(self.class_names):], role="shadow")

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self.answer(*item)
            except Exception as exc:  # an image the candidate cannot read: counted, the primary is unaffected
                self.failed += 1
                log.info("shadow: an image was not answered (%s)", type(exc).__name__)
            finally:
                self._queue.task_done()

    def stats(self) -> dict[str, int]:
        """Images skipped (queue full) and failed; the shadow log's counters."""
        return {"skipped": self.skipped, "failed": self.failed, **self.monitor.stats()}
