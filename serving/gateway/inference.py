"""Where the gateway gets its answers: the deployed BentoML service over HTTP, or the same code in process.

Both return, per DICOM file, exactly what the service's `predict_batch` answers for it: calibrated
probabilities, the label at the stored operating point, the OOD flag, score and reasons, or an `error`
with a 4xx `status` for a file the model cannot take. The in-process path runs the service's own
functions (`serving.inputs.check_upload`, `serving.answer.prepare` / `answers`, `serving.runtime`),
so its numbers equal a served answer.

Example:
    >>> model = open_model("runs/quickstart/adapted/remedis@1")      # or "http://127.0.0.1:3000"
    >>> model.predict([dicom_bytes])[0]["probabilities"]
    {'benign': 0.71, 'malignant': 0.29}
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from remedis.models.checkpoint import read_meta
from serving.answer import Answer, Refusal


@dataclass
class ModelInfo:
    """What a result says about the algorithm that made it."""

    name: str
    version: str
    weights_sha256: str
    class_names: list[str]
    positive_index: int = 1


class Inference(Protocol):
    """Where a route gets its answers: a model in process or the deployed service."""

    info: ModelInfo

    def predict(self, files: list[bytes]) -> list[Answer | Refusal]:
        """Per DICOM file, in order, its answer or its refusal."""
        ...


class InferenceUnavailable(RuntimeError):
    """The model could not answer now (service down, overloaded, 5xx, 408, 429, key refused): the batch is retried later."""


class InferenceRejected(RuntimeError):
    """The service answered a client error (a 4xx other than 401, 403, 408 and 429, e.g. 413 for a large cine):
    sending the same batch again cannot succeed, so it goes to failed/ at once."""


class LocalInference:
    """An adapted model folder run in this process, through the service's own decode/check/answer code."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        from remedis.adapt.calibration import Calibration
        from remedis.data.contract import InputContract
        from remedis.data.preprocess import Preprocessing
        from serving.runtime import ModelRuntime
        from serving.settings import LimitSettings

        folder = Path(folder)
        meta = read_meta(folder)
        self.runtime = ModelRuntime.load(folder, threads=threads)
        self.preprocessing = Preprocessing.from_dict(meta["preprocessing"])
        self.calibration = Calibration.from_meta(meta)
        self.contract = InputContract.from_dict(meta["input_contract"]) if meta.get("input_contract") else None
        self.detector = self.runtime.model.ood_detector
        self.limits = LimitSettings()
        version = str(meta.get("weights_sha256", ""))[:12]
        self.info = ModelInfo(folder.name, version, str(meta.get("weights_sha256", "")), list(meta["class_names"]),
                              int(meta.get("positive_index", 1)))
        self.monitor = None  # a serving.monitoring.ServiceMonitor: every answer goes to the prediction log
        self.caller = "gateway"

    def log_to(self, monitor, caller: str) -> None:
        """Log every answer of this route to `monitor` (the gateway's `monitor` settings), as `caller`."""
        self.monitor, self.caller = monitor, caller

    def predict(self, files: list[bytes]) -> list[Answer | Refusal]:
        """Per DICOM file, its answer, or the refusal the service would give."""
        from serving.answer import answers, prepare
        from serving.inputs import UploadError, check_upload

        results: list[Answer | Refusal | None] = [None] * len(files)
        xs, reasons, where, ups = [], [], [], []
        for i, data in enumerate(files):
            try:
                up = check_upload(data, "application/dicom", self.limits)
                x, r = prepare(up, self.preprocessing, self.contract)
            except UploadError as exc:
                results[i] = Refusal(exc.reason, exc.status)
                continue
            xs.append(x)
            reasons.append(r)
            where.append(i)
            ups.append(up)
        if xs:
            out = self.runtime.forward(np.stack(xs))
            k = len(self.info.class_names)
            for j, (i, a) in enumerate(zip(where, answers(out, self.info.class_names, self.calibration, self.detector, reasons,
                                                          self.contract is not None))):
                results[i] = a
                if self.monitor is not None:  # queued in microseconds; written by the log's own thread
                    self.monitor.record(ups[j], a, self.caller, out[j, k:])
        return results  # type: ignore[return-value]


class ServiceInference:
    """The deployed service (`predict_batch`), with its API key from an environment variable; over https its
    certificate is verified against `ca` (a CA bundle file; the system's CAs when empty)."""

    def __init__(self, url: str, api_key_env: str = "REMEDIS_API_KEY", timeout_s: float = 120.0, ca: str = ""):
        import httpx

        self.url = url.rstrip("/")
        key = os.environ.get(api_key_env, "").strip()
        self.headers = {"X-API-Key": key} if key else {}
        self.client = httpx.Client(timeout=timeout_s, verify=ca or True)
        try:
            meta = self._call("metadata", json={})
        except Exception:
            self.client.close()
            raise
        model = meta.get("model", {})
        sha = _find(meta, "weights_sha256") or ""
        classes = list(_find(meta, "class_names") or [])
        positive = _find(meta, "positive_class")
        self.info = ModelInfo(str(model.get("name", "remedis")), str(model.get("version", "")), str(sha), classes,
                              classes.index(positive) if positive in classes else 1)

    def _call(self, route: str, **kw) -> dict:
        import httpx

        try:
            r = self.client.post(f"{self.url}/{route}", headers=self.headers, **kw)
        except httpx.HTTPError as exc:
            raise InferenceUnavailable(f"service {self.url} unreachable ({type(exc).__name__})") from None
        if r.status_code in (401, 403):
            raise InferenceUnavailable(f"service {self.url} refused the API key ({r.status_code})")
        if r.status_code >= 500 or r.status_code in (408, 429):
            raise InferenceUnavailable(f"service {self.url} answered {r.status_code}")
        if r.status_code >= 400:  # the body is not logged: it may quote what was sent
            raise InferenceRejected(f"the service answered {r.status_code} ({_reason(r.status_code)})")
        return r.json()

    def close(self) -> None:
        """Close the kept-alive connections (a service's graceful shutdown waits for open ones)."""
        self.client.close()

    def predict(self, files: list[bytes]) -> list[Answer | Refusal]:
        """Per DICOM file, the service's answer, or its refusal (an item's `error` and `status`)."""
        parts = [("images", (f"{i}.dcm", data, "application/dicom")) for i, data in enumerate(files)]
        body = self._call("predict_batch", files=parts)
        results = sorted(body["results"], key=lambda r: r["index"])
        if not self.info.class_names and results:
            probs = next((r["probabilities"] for r in results if "probabilities" in r), None)
            if probs:
                self.info.class_names = list(probs)
        return [Answer.from_dict(r) if "probabilities" in r else Refusal(str(r.get("error", "no answer")), int(r.get("status", 422)))
                for r in results]


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "client error"


def _find(obj: Any, key: str) -> Any:
    """The first value under `key` anywhere in a JSON document (the model card nests provenance)."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for v in obj.values():
            found = _find(v, key)
            if found is not None:
                return found
    elif isinstance(obj, list):
        for v in obj:
            found = _find(v, key)
            if found is not None:
                return found
    return None


def open_model(model: str, api_key_env: str = "REMEDIS_API_KEY", timeout_s: float = 120.0,
               threads: int | None = None, wait_s: float = 0.0, ca: str = "") -> Inference:
    """A route's model: an http(s) URL is the deployed service, anything else a model folder.

    Args:
        wait_s: for a service, keep trying this long while it is not up yet (it may start after the gateway).
    """
    if model.startswith(("http://", "https://")):
        deadline = time.time() + wait_s
        while True:
            try:
                return ServiceInference(model, api_key_env, timeout_s, ca)
            except InferenceUnavailable:
                if time.time() >= deadline:
                    raise
                time.sleep(1.0)
    folder = Path(model)
    if not (folder / "meta.json").is_file():
        raise FileNotFoundError(f"{model}: not a model folder (no meta.json) and not an http(s) URL")
    return LocalInference(folder, threads)
