"""BentoML service: a DICOM, PNG, JPEG or TIFF upload in; calibrated probabilities, the label at the
stored operating point, an OOD flag with its reasons and the feature OOD score out.

Two services, one bento (BentoML's pattern for adaptive batching behind pre-processing):
- `RemedisService` (the API): checks and decodes uploads (`serving.inputs`, the training reader and
  preprocessing from `remedis.data`), checks each input against the model's input contract
  (`remedis.data.contract`: modality, channels, size, intensity), calibrates and decides with the
  model's `Calibration`, applies the OOD detector, answers `predict`, `predict_batch`, `embed`,
  `metadata`; BentoML adds `/healthz`, `/readyz`, `/metrics`.
- `RemedisModel`: the network on CPU or GPU (`serving.runtime`), one `batchable` endpoint, so
  concurrent requests share forward passes (max batch size and latency from the serving config).

Settings: `serving/serving.yaml` or `--arg config=FILE`; the model: `--arg model=TAG` / REMEDIS_MODEL.

    bentoml serve serving.service:RemedisService --arg model=remedis-quickstart:latest
    curl -F image=@scan.dcm http://localhost:3000/predict

An answer's `ood` is true when the input breaks the model's input contract (`ood_reasons` says how, e.g.
"modality CT, model trained on US") or when the detector's `ood_score` is above its threshold; null when
the model folder has neither a detector nor a contract.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import anyio
import bentoml
import numpy as np
import torch
from starlette.responses import JSONResponse

from remedis.adapt.calibration import Calibration
from remedis.data.contract import InputContract
from remedis.data.preprocess import Preprocessing
from remedis.models.checkpoint import read_meta
from serving.answer import Answer, Refusal, answers, modality_warnings, prepare
from serving.coalesce import Coalescer
from serving.guard import RequestGuard
from serving.hop import call_resending
from serving.inputs import Upload, UploadError, check_upload, expand_zip, sniff
from serving.monitoring import ServiceMonitor
from serving.settings import resolve

log = logging.getLogger("bentoml.remedis")  # under BentoML's logger, so it reaches the server log
SETTINGS = resolve(bentoml.use_arguments())
MODEL_TAG = SETTINGS.model
UPLOAD_PATHS = {"/predict", "/predict_batch", "/embed"}


def _resources() -> dict[str, Any]:
    r: dict[str, Any] = {"cpu": str(SETTINGS.resources.cpu)}
    if SETTINGS.resources.gpu > 0:
        r["gpu"] = SETTINGS.resources.gpu
    return r


# runner_connection: BentoML's client to this worker would otherwise replace its session every 100
# calls, closing the connections of calls still waiting for their batch (measured: 3 of 800 requests
# answered 500 with 64 concurrent clients). One model worker leaves nothing to rebalance.
@bentoml.service(resources=_resources(), workers=1, traffic={"timeout": SETTINGS.timeout_s},
                 runner_connection={"max_requests": 2**31 - 1, "max_age": 10.0 * 365 * 24 * 3600})
class RemedisModel:
    """The network. Not exposed on its own: the API service reaches it over a local socket."""

    model_ref = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        from serving.runtime import ModelRuntime

        self.runtime = ModelRuntime.load(self.model_ref.path, gpu=SETTINGS.resources.gpu, precision=SETTINGS.precision,
                                         channels_last=SETTINGS.channels_last, threads=SETTINGS.resources.cpu)
        # Images per forward pass (BentoML's adaptive_batch_size counts calls, and a call from the API
        # worker can carry several coalesced requests). prometheus_client is imported here, after BentoML
        # has pointed it at the multiprocess directory that /metrics reads.
        from prometheus_client import Histogram

        self.batch_images = Histogram("remedis_forward_batch_images", "Images in each forward pass of the model",
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        if SETTINGS.warmup:
            t0 = time.perf_counter()
            self.runtime.warm_up((1, SETTINGS.max_batch_size))
            log.info("model %s warmed up on %s (%s) in %.1f s", self.model_ref.tag, self.runtime.device,
                     self.runtime.dtype or "fp32", time.perf_counter() - t0)

    # Batching off (or a max batch of 1): a plain endpoint, one request per forward pass.
    @bentoml.api(batchable=SETTINGS.max_batch_size > 1, max_batch_size=max(2, SETTINGS.max_batch_size),
                 max_latency_ms=SETTINGS.batching.max_latency_ms)
    def forward(self, x: np.ndarray) -> np.ndarray:
        """(N, C, S, S) preprocessed images -> (N, classes + embedding) [logits | embedding]."""
        self.batch_images.observe(len(x))
        return self.runtime.forward(x)

    @bentoml.api
    def device(self) -> dict:
        """The device the model worker runs on."""
        return {"device": str(self.runtime.device), "precision": str(self.runtime.dtype or "fp32").replace("torch.", "")}


class _Uploads(bentoml.IODescriptor):
    """Multipart parsing done here, not by BentoML's generic path: each file part keeps its declared
    content type (checked against the bytes later), a text value in a file field is a 400 instead of
    a URL for the server to fetch, and nothing is written to disk beyond Starlette's spooling. The
    parts go to the endpoint through the request state; the fields exist for the schema and clients."""

    @classmethod
    async def from_http_request(cls, request, serde):
        uploads: dict[str, Any] = {}
        try:
            form = await request.form(max_files=SETTINGS.limits.max_batch_files + 1, max_fields=32)
            for field in cls.multipart_fields:
                items = []
                for value in form.getlist(field):
                    if isinstance(value, str):
                        raise UploadError(400, f"field '{field}' must be a file upload, got a text value")
                    items.append((await value.read(), value.content_type, value.filename))
                uploads[field] = items
        except UploadError as exc:
            uploads = exc
        except Exception as exc:  # Starlette's multipart errors (too many parts, malformed boundary, ...)
            uploads = UploadError(400, f"malformed multipart body ({type(exc).__name__})")
        request.state.remedis_uploads = uploads
        return cls.model_construct(**{f: None for f in cls.model_fields})


class ImageInput(_Uploads):
    """One upload in field `image`."""

    image: Path


class ImagesInput(_Uploads):
    """Several uploads (or one zip) in field `images`."""

    images: list[Path]


def _uploads(ctx: bentoml.Context, field: str) -> list[tuple[bytes, str | None, str | None]]:
    uploads = getattr(ctx.request.state, "remedis_uploads", None)
    if isinstance(uploads, UploadError):
        raise uploads
    items = (uploads or {}).get(field, [])
    if not items:
        raise UploadError(400, f"no file in field '{field}' (send it as multipart/form-data)")
    return items


def _error(ctx: bentoml.Context, status: int, reason: str, field: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": reason}
    if field:
        body["field"] = field
    # BentoML copies the context's status and headers onto the response of an API that takes `ctx`.
    ctx.response.status_code = status
    for k, v in (headers or {}).items():
        ctx.response.headers[k] = v
    return JSONResponse(body, status_code=status, headers=headers)


def _ssl() -> dict[str, Any]:
    """BentoML's TLS options from `tls` in the serving config: HTTPS only when a certificate is set."""
    t = SETTINGS.tls
    if not t.cert:
        return {}
    out: dict[str, Any] = {"enabled": True, "certfile": t.cert, "keyfile": t.key or t.cert}
    if t.ca:
        out["ca_certs"] = t.ca
    out["cert_reqs"] = 2 if t.require_client_cert else 0  # ssl.CERT_REQUIRED / CERT_NONE
    return out


@bentoml.service(workers=SETTINGS.workers, traffic={"timeout": SETTINGS.timeout_s}, http={"host": SETTINGS.host},
                 ssl=_ssl())
class RemedisService:
    """The BentoML service: loads one adapted model once and answers uploads with calibrated probabilities, the
    label at the operating point and an OOD flag with reasons."""

    model_ref = bentoml.models.BentoModel(MODEL_TAG)
    net = bentoml.depends(RemedisModel)

    def __init__(self) -> None:
        torch.set_num_threads(1)  # this worker decodes and resizes; the model worker owns the cores
        # pydicom can log an invalid element's value verbatim (warn_and_log), and values can be
        # identifiers; every DICOM failure reaches the client and the log as a safe reason instead.
        logging.getLogger("pydicom").disabled = True
        folder = Path(self.model_ref.path)
        meta = read_meta(folder)
        self.tag = self.model_ref.tag
        self.class_names: list[str] = list(meta["class_names"])
        self.preprocessing = Preprocessing.from_dict(meta["preprocessing"])
        self.calibration = Calibration.from_meta(meta)  # the model's own probabilities and decision
        card = folder / "model_card.json"
        self.card = json.loads(card.read_text()) if card.is_file() else {}
        self.detector = self._load_detector(folder)
        self.contract = InputContract.from_dict(meta["input_contract"]) if meta.get("input_contract") else None
        self.modalities = {m.upper() for m in SETTINGS.modalities}  # else the contract's (serving.answer)
        self.limits = SETTINGS.limits
        self.decode_limiter = anyio.CapacityLimiter(4)
        in_flight = SETTINGS.batching.coalesce_in_flight if SETTINGS.max_batch_size > 1 else 0
        self.coalescer = Coalescer(self._call_model, SETTINGS.max_batch_size, in_flight) if in_flight else None
        positive = self.class_names[self.calibration.positive_index] if len(self.class_names) == 2 else None
        self.monitor = (ServiceMonitor(SETTINGS.monitor, self._model, meta.get("weights_sha256"), positive_class=positive)
                        if SETTINGS.monitor.store else None)
        self.gauges = None
        if self.monitor is not None and positive is not None and SETTINGS.monitor.gauges.every_s > 0:
            from serving.monitor_gauges import ReportGauges

            self.gauges = ReportGauges(self.monitor.writer.store, self._model, SETTINGS.monitor.gauges)
        self.caller = "api-key" if SETTINGS.auth.enabled else "anonymous"
        self.shadow = self._load_shadow() if SETTINGS.shadow.model else None
        log.info("serving %s: %d classes, operating point %s, OOD %s, input contract %s", self.tag, len(self.class_names),
                 "none (argmax)" if self.calibration.threshold is None else f"{self.calibration.threshold:.4f}",
                 f"{self.detector.method} > {self.detector.threshold:.4g}" if self.detector else "none",
                 self._contract_line())

    def _contract_line(self) -> str:
        c = self.contract
        if c is None:
            return "none"
        size = f"{c.rows[0]}-{c.rows[1]} x {c.columns[0]}-{c.columns[1]} px" if c.rows and c.columns else "any size"
        return (f"{'/'.join(c.modalities) or 'modality unknown'}, channels {c.channels or 'unknown'}, {size}, "
                f"{c.n_images} training images")

    def _load_shadow(self):
        """The candidate version of `shadow.model`, from the BentoML store, answering in shadow."""
        from serving.shadow import ShadowModel

        model = bentoml.models.get(SETTINGS.shadow.model)
        log.info("shadow: %s answers the same traffic; its answers are logged, never returned", model.tag)
        return ShadowModel(model.path, {"name": model.tag.name, "version": model.tag.version or ""}, SETTINGS.monitor,
                           self.monitor.secret, SETTINGS.shadow.queue)

    @staticmethod
    def _load_detector(folder: Path):
        try:
            from remedis.adapt.ood import OODDetector
        except ImportError:  # an older remedis without OOD detection: serve without it (ood: null)
            return None
        return OODDetector.load(folder)

    # ---- the shared path: upload -> checked pixels -> tensor -> model -> answer -------------------

    def _prepare(self, data: bytes, declared: str | None, filename: str | None) -> tuple[Upload, np.ndarray, list[str], list[str]]:
        """Upload -> (upload, normalised pixels, warnings, input-contract reasons)."""
        up = check_upload(data, declared, self.limits, filename)
        warnings = modality_warnings(up, self.modalities, self.contract, SETTINGS.reject_other_modalities)
        x, reasons = prepare(up, self.preprocessing, self.contract)
        return up, x, warnings, reasons

    async def _prepare_async(self, data: bytes, declared: str | None, filename: str | None):
        result = None
        with anyio.move_on_after(self.limits.decode_timeout_s):
            # Abandoned on timeout: the client gets its 422 and the event loop never waits on it.
            result = await anyio.to_thread.run_sync(self._prepare, data, declared, filename,
                                                    limiter=self.decode_limiter, abandon_on_cancel=True)
        if result is None:
            raise UploadError(422, f"image took longer than {self.limits.decode_timeout_s:g} s to decode")
        return result

    async def _call_model(self, x: np.ndarray) -> np.ndarray:
        net = self.net
        if not hasattr(net, "to_async"):
            return await asyncio.to_thread(net.forward, x)  # not served (a local instance): a plain call
        return np.asarray(await call_resending(lambda: net.to_async.forward(x), log), dtype=np.float32)

    async def _forward(self, x: np.ndarray) -> np.ndarray:
        if self.coalescer is None:
            return await self._call_model(x)
        return await self.coalescer.submit(x)

    async def _forward_chunks(self, xs: list[np.ndarray]) -> np.ndarray:
        """Every image through the batched model; chunks go out together so the batcher can merge them."""
        step = SETTINGS.max_batch_size
        chunks = [np.stack(xs[i:i + step]) for i in range(0, len(xs), step)]
        outs = await asyncio.gather(*(self._forward(c) for c in chunks))
        return np.concatenate(outs) if outs else np.zeros((0, len(self.class_names)), np.float32)

    def _answers(self, out: np.ndarray, contract_reasons: list[list[str]]) -> list[Answer]:
        return answers(out, self.class_names, self.calibration, self.detector, contract_reasons, self.contract is not None)

    @property
    def _model(self) -> dict[str, str]:
        return {"name": self.tag.name, "version": self.tag.version or ""}

    async def _one(self, ctx: bentoml.Context, field: str):
        files = _uploads(ctx, field)
        if len(files) != 1:
            raise UploadError(400, f"send exactly one file in field '{field}' (got {len(files)}); use predict_batch for more")
        return await self._prepare_async(*files[0])

    async def _forward_one(self, ctx: bentoml.Context, route: str):
        """The one upload in field `image` through the checks and the model: ((upload, output, warnings,
        contract reasons), None), or (None, the error answer) for a client mistake or a model failure."""
        try:
            up, x, warnings, reasons = await self._one(ctx, "image")
        except UploadError as exc:
            log.info("%s: %d %s", route, exc.status, exc.reason)
            return None, _error(ctx, exc.status, exc.reason, "image")
        try:
            out = await self._forward(x[None])
        except bentoml.exceptions.BentoMLException as exc:
            return None, self._model_failure(ctx, exc)
        return (up, out, warnings, reasons), None

    # ---- endpoints ---------------------------------------------------------------------------------

    @bentoml.api(input_spec=ImageInput)
    async def predict(self, image: Path, ctx: bentoml.Context) -> dict:
        """Calibrated class probabilities, the label at the stored operating point, and the OOD flag with
        its reasons (input contract, feature score) for one image."""
        done, failure = await self._forward_one(ctx, "predict")
        if failure is not None:
            return failure
        up, out, warnings, reasons = done
        answer = self._answers(out, [reasons])[0]
        return {**answer.to_dict(), "format": up.format, "modality": up.modality, "warnings": warnings, "model": self._model,
                **self._logged(up, answer, out[0])}

    @bentoml.api(input_spec=ImagesInput)
    async def predict_batch(self, images: list[Path], ctx: bentoml.Context) -> dict:
        """Many images (several files in `images`, or one zip of them) in one call, answered in upload
        order; a bad item gets its own `error` and `status` and does not fail the others."""
        try:
            files = _uploads(ctx, "images")
            if len(files) == 1 and sniff(files[0][0]) == "zip":
                files = [(member, None, None) for member in expand_zip(files[0][0], self.limits)]
            if not files:
                raise UploadError(400, "no files in field 'images'")
            if len(files) > self.limits.max_batch_files:
                raise UploadError(413, f"{len(files)} files, above this service's limit of {self.limits.max_batch_files}")
        except UploadError as exc:
            log.info("predict_batch: %d %s", exc.status, exc.reason)
            return _error(ctx, exc.status, exc.reason, "images")
        prepared = await asyncio.gather(*(self._prepare_async(*f) for f in files), return_exceptions=True)
        good = [i for i, p in enumerate(prepared) if not isinstance(p, BaseException)]
        for p in prepared:
            if isinstance(p, BaseException) and not isinstance(p, UploadError):
                raise p
        answers: dict[int, Answer] = {}
        if good:
            try:
                out = await self._forward_chunks([prepared[i][1] for i in good])
            except bentoml.exceptions.BentoMLException as exc:
                return self._model_failure(ctx, exc)
            answers = dict(zip(good, self._answers(out, [prepared[i][3] for i in good])))
        results = []
        for i, p in enumerate(prepared):
            if isinstance(p, UploadError):
                results.append({"index": i, **Refusal(p.reason, p.status).to_dict()})
            else:
                results.append({"index": i, **answers[i].to_dict(), "format": p[0].format, "modality": p[0].modality,
                                "warnings": p[2], **self._logged(p[0], answers[i], out[good.index(i)])})
        n_bad = len(files) - len(good)
        if n_bad:
            log.info("predict_batch: %d of %d items refused", n_bad, len(files))
        return {"results": results, "count": len(files), "errors": n_bad, "model": self._model}

    def _logged(self, up: Upload, answer: Answer, output: np.ndarray) -> dict[str, str]:
        """Queue the answer for the prediction log (when on); its pseudonymous key for the response."""
        if self.monitor is None:
            return {}
        key = self.monitor.record(up, answer, self.caller, output[len(self.class_names):])
        if self.shadow is not None:
            self.shadow.submit(up, self.caller)
        return {"key": key}

    @bentoml.api
    async def feedback(self, labels: list[dict[str, str]], ctx: bentoml.Context, source: str = "") -> dict:
        """Ground truth for logged predictions: `{"labels": [{"key": ..., "label": ...}], "source": "pathology"}`.
        Each key is one a prediction's answer returned; each label one of the model's classes. Nothing is
        attached when any item is wrong (422) or any key has no logged prediction (404)."""
        if self.monitor is None:
            return _error(ctx, 404, "the prediction log is off (monitor.store in the serving config)", "labels")
        pairs = []
        for i, item in enumerate(labels):
            key, label = str(item.get("key", "")).strip(), str(item.get("label", "")).strip()
            if not key or label not in self.class_names:
                reason = "no key" if not key else f"label {label[:40]!r} is not one of {', '.join(self.class_names)}"
                return _error(ctx, 422, f"labels[{i}]: {reason}", "labels")
            pairs.append((key, label))
        if not pairs:
            return _error(ctx, 400, "no labels", "labels")
        await anyio.to_thread.run_sync(self.monitor.writer.flush, 5.0)  # a label for an answer just given
        attached, unknown = await anyio.to_thread.run_sync(self.monitor.writer.store.attach_labels, pairs, source[:200])
        if unknown:
            return _error(ctx, 404, f"{len(unknown)} key(s) have no logged prediction; nothing attached", "labels")
        log.info("feedback: %d label(s) attached", attached)
        return {"attached": attached}

    @bentoml.api(input_spec=ImageInput)
    async def embed(self, image: Path, ctx: bentoml.Context) -> dict:
        """The backbone's pooled embedding of one image (for retrieval, clustering, downstream heads)."""
        done, failure = await self._forward_one(ctx, "embed")
        if failure is not None:
            return failure
        up, out, warnings, _ = done
        emb = out[0, len(self.class_names):]
        return {"embedding": [float(v) for v in emb], "dim": int(emb.shape[0]), "format": up.format,
                "warnings": warnings, "model": self._model}

    @bentoml.api
    async def metadata(self) -> dict:
        """Model card: task, classes, sites, report summary (per-site AUROC, ECE, OOD), provenance hashes."""
        net = self.net
        try:
            runtime = await net.to_async.device() if hasattr(net, "to_async") else net.device()
        except Exception as exc:  # the card is still useful when the model worker is busy or restarting
            runtime = {"error": type(exc).__name__}
        ood = None if self.detector is None else {"method": self.detector.method, "threshold": float(self.detector.threshold),
                                                  "accept_rate": float(getattr(self.detector, "accept_rate", 0.95))}
        return {
            **self.card,
            "model": self._model,
            "operating_threshold": self.calibration.threshold,
            "ood_detector": ood,
            "input_contract": self.contract.summary() if self.contract is not None else None,
            "serving": {**SETTINGS.public(), "model": str(self.tag), "max_batch_size": SETTINGS.max_batch_size,
                        "runtime": runtime, "prediction_log": self.monitor.stats() if self.monitor else None,
                        "shadow": self.shadow.stats() if self.shadow else None},
        }

    def _model_failure(self, ctx: bentoml.Context, exc: Exception) -> JSONResponse:
        code = int(getattr(getattr(exc, "error_code", None), "value", 500) or 500)
        if code == 503:  # the batcher shed the request: the queue is longer than batching.max_latency_ms
            return _error(ctx, 503, "model is overloaded, retry shortly", headers={"Retry-After": "1"})
        log.error("model worker failed: %s", type(exc).__name__)
        return _error(ctx, 500, "model worker failed; see the server log")


RemedisService.add_asgi_middleware(RequestGuard, settings=SETTINGS, upload_paths=UPLOAD_PATHS)
