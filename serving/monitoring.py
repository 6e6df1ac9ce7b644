"""The service's side of the prediction log: one row per answer, built on the request path in microseconds
and written by `remedis.monitor.writer.PredictionWriter`'s thread.

A row holds the header facts a drift report groups by (modality, manufacturer, device model, photometric
interpretation, size), the calibrated answer and a pseudonymous key (`remedis.monitor.keys`): the HMAC of
the SOP Instance UID for DICOM, of the bytes otherwise. The key is returned to the caller, who sends it back
with the ground truth (`POST /feedback`). No file name, patient identifier or tag value other than those
device facts is read into a row.

Example:
    >>> monitor = ServiceMonitor(MonitorSettings(store="sqlite:///:memory:"), {"name": "m", "version": "1"}, "ab" * 32,
    ...                          secret=b"0123456789abcdef")
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from remedis.monitor.keys import bytes_key, instance_key
from remedis.monitor.store import PredictionStore
from remedis.monitor.writer import PredictionWriter
from serving.answer import Answer
from serving.inputs import HEADER_TAGS, Upload
from serving.settings import MonitorSettings, read_monitor_secret

log = logging.getLogger("remedis.serving")
DEVICE_TAGS = HEADER_TAGS


def _device_facts(up: Upload) -> dict[str, str | None]:
    """SOP Instance UID (for the key only), manufacturer and model of a DICOM upload, as `check_upload` read them
    with its header (none when the header did not parse)."""
    if up.format != "dicom" or up.source is None:
        return {}
    return {k: (up.source.tags.get(k, "")[:200] or None) for k in DEVICE_TAGS}


class ServiceMonitor:
    """Rows for the prediction log and the writer that stores them.

    Args:
        settings: the service's `monitor` settings (store URL, secret, embeddings, queue).
        model: the served model's name and version.
        weights_sha256: the served weights' hash.
        secret: the site's secret (default: read as the settings say).
        positive_class: of a binary model, the class its operating point decides for (monitor reports need it).
    """

    def __init__(self, settings: MonitorSettings, model: dict[str, str], weights_sha256: str | None,
                 secret: bytes | None = None, positive_class: str | None = None):
        self.settings, self.positive_class = settings, positive_class
        self.secret = secret if secret is not None else read_monitor_secret(settings)
        self.model, self.weights_sha256 = model, weights_sha256
        self.writer = PredictionWriter(PredictionStore(settings.store), capacity=settings.queue)

    def key(self, up: Upload, facts: dict[str, str | None]) -> str:
        """The upload's pseudonymous key: from its SOP Instance UID when it has one, else from its bytes."""
        uid = facts.get("SOPInstanceUID")
        return instance_key(uid, self.secret) if uid else bytes_key(up.data, self.secret)

    def record(self, up: Upload, answer: Answer, caller: str, embedding: np.ndarray | None = None,
               role: str = "primary") -> str:
        """Queue one answer's row; returns its key (to give back to the caller)."""
        facts = _device_facts(up)
        key = self.key(up, facts)
        src = up.source
        row: dict[str, Any] = {
            "key": key, "model_name": self.model.get("name"), "model_version": self.model.get("version"),
            "weights_sha256": self.weights_sha256, "role": role, "caller": caller, "modality": up.modality,
            "manufacturer": facts.get("Manufacturer"), "device_model": facts.get("ManufacturerModelName"),
            "photometric": src.photometric if src is not None else None, "rows": up.rows or None,
            "columns": up.columns or None, "positive_class": self.positive_class, **answer.log_fields(),
            "embedding": embedding if self.settings.embeddings else None}
        self.writer.submit(row)
        return key

    def stats(self) -> dict[str, int]:
        """The writer's counters (written, dropped, queued, failed batches)."""
        return self.writer.stats()

    def close(self) -> None:
        """Write what is queued and stop."""
        self.writer.close()
