"""The DICOM gateway: C-ECHO / C-STORE SCP and STOW-RS in, spool, inference, TID 1500 SR out.

Flow (every step leaves its work on disk, `serving.gateway.spool`):
1. `accept` (for C-STORE and STOW-RS alike): decode the header, refuse what cannot be an image for a
   model (no pixel data, a transfer syntax with no decoder), skip what must never be processed (SR,
   Secondary Capture, encapsulated documents, presentation states, anything remedis made: the loop
   guard) and what no route takes, and spool the rest *before* answering success.
2. The worker claims a series once it has been quiet for `quiet_seconds`, asks the route's model
   (the deployed service, or the same code in process), writes one SR per batch into the outbox and
   drops the instances; files the model refuses go to failed/ with the reason.
3. The sender delivers the outbox to the destination (C-STORE SCU or STOW-RS) with back-off; a
   result leaves the outbox only when the destination acknowledged it.

Logs and status name series by a hash of their UID and never carry patient data.

Example:
    >>> gw = Gateway(load_gateway_settings("serving/gateway.yaml")).start()
    >>> gw.status()["received"]
    0
    >>> gw.stop()
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from concurrent import futures
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from serving.gateway.audit import MINOR, SERIOUS, AuditTrail
from serving.gateway.batch import BatchOutcome, route_for, run_batch
from serving.gateway.codes import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_NOT_MATCHING,
    STATUS_OUT_OF_RESOURCES,
    STATUS_REFUSED_NOT_AUTHORISED,
    STATUS_SUCCESS,
    Refused,
)
from serving.gateway.contexts import shared_syntax_contexts
from serving.gateway.inference import Inference, open_model
from serving.gateway.report import MANUFACTURER
from serving.gateway.security import caller_refusal, peer_subject_cn, server_context
from serving.gateway.send import Backoff, SendError, nodelay_server, send
from serving.gateway.settings import GatewaySettings
from serving.gateway.spool import Spool, uid_key
from serving.gateway.workers import BatchWorkers, log_in_process_routes
from serving.gateway.writers import DICOM, media_type_of

PURGE_EVERY_S = 3600.0
VIDEO_SYNTAXES = frozenset(str(uid) for uid in pydicom.uid.MPEGTransferSyntaxes)  # MPEG-2, MPEG-4 AVC, HEVC
log = logging.getLogger("remedis.gateway")

# SOP classes never processed (the loop guard and documents): SR, Secondary Capture, encapsulated
# PDF/CDA/STL, presentation states, key objects, segmentations, RT structures, raw data.
NEVER = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.104.",
         "1.2.840.10008.5.1.4.1.1.11.", "1.2.840.10008.5.1.4.1.1.66", "1.2.840.10008.5.1.4.1.1.481.3")


def _decodable(ts: str) -> bool:
    """Whether pydicom has a working decoder for the transfer syntax `ts`."""
    from pydicom.pixels.decoders.base import get_decoder

    try:
        return bool(get_decoder(ts).is_available)
    except (NotImplementedError, ValueError, KeyError):
        return False


def _group_of(batch: Path, trigger: str) -> str:
    """The series (or with `trigger: study`, the study) a claimed batch belongs to, from its first instance's
    header (the batch's name if none can be read: then nothing else waits for it)."""
    for f in sorted(batch.glob("*.dcm"))[:1]:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SeriesInstanceUID"])
            return str(ds.StudyInstanceUID if trigger == "study" else ds.SeriesInstanceUID)
        except Exception:  # unreadable: the batch will say so itself
            break
    return batch.name


def _short_pixel_data(ds: pydicom.Dataset, ts: str) -> str | None:
    """Why native pixel data is shorter than its header says (a truncated file), or None."""
    from pydicom.uid import UID

    if "PixelData" not in ds or (ts and UID(ts).is_compressed):
        return None
    try:
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        need = int(ds.Rows) * int(ds.Columns) * int(getattr(ds, "SamplesPerPixel", 1)) * frames * int(ds.BitsAllocated) // 8
        have = len(ds.PixelData)
    except (AttributeError, TypeError, ValueError):
        return "image header incomplete (Rows, Columns or BitsAllocated)"
    return f"pixel data has {have} bytes, the header needs {need} (truncated)" if have < need else None


def skip_reason(ds: pydicom.Dataset) -> str | None:
    """Why an instance is never processed (loop guard, documents), or None."""
    sop = str(getattr(ds, "SOPClassUID", ""))
    if any(sop.startswith(p) for p in NEVER):
        name = getattr(getattr(ds, "SOPClassUID", None), "name", sop)
        return f"SOP class {name} is not an image for a model"
    if str(getattr(ds, "Manufacturer", "")) == MANUFACTURER:
        return "made by remedis (loop guard)"
    return None


class Gateway:
    """The gateway: DICOM and DICOMweb in, the spool, inference per route, result writers, delivery out.

    Args:
        settings: the gateway's settings (`serving.gateway.settings`).
        models: route index -> an `Inference` to use instead of opening the route's model (tests, benchmarks);
            then the batches run in the gateway's own thread, whatever `workers` says.
        model_wait_s: how long `start` keeps trying a route's service that is not up yet.
    """

    def __init__(self, settings: GatewaySettings, models: dict[int, Inference] | None = None,
                 model_wait_s: float = 0.0):
        logging.getLogger("pydicom").disabled = True  # pydicom can log element values (identifiers)
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        logging.getLogger("highdicom").setLevel(logging.WARNING)  # its INFO lines quote dataset UIDs at length
        self.settings = settings
        self.spool = Spool(settings.spool)
        self.audit = AuditTrail(settings.audit or Path(settings.spool) / "audit.jsonl", settings.audit_syslog)
        self.models: dict[int, Inference] = models or {}
        self._workers: BatchWorkers | None = None  # the processes that run the batches (`workers`)
        self.model_wait_s = model_wait_s
        self.backoff = Backoff(settings.retry)
        self.model_backoff = Backoff(settings.retry)
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._last_purge: float | None = None
        self.died = threading.Event()  # a worker thread ended by an error: /healthz answers 503, `serve` exits non-zero
        self.dead_worker: str | None = None
        self._threads: list[threading.Thread] = []
        self._server = None
        self._http = None
        self._monitors: list = []

    # ---- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> "Gateway":
        """Open the routes' models, recover the spool, listen (DIMSE, and STOW-RS with status), start the workers."""
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        if self.settings.workers and not self.models:
            self._workers = BatchWorkers(self.settings, self.model_wait_s)  # opens the models there; raises if one cannot
        else:
            for i, r in enumerate(self.settings.routes):
                if i not in self.models:
                    self.models[i] = open_model(r.model, r.api_key_env, r.timeout_s, wait_s=self.model_wait_s,
                                                ca=self.settings.tls.ca)
            self._monitors = log_in_process_routes(self.settings, self.models)
        self.spool.recover()
        ae = AE(ae_title=self.settings.ae_title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.maximum_pdu_size = 0
        if self.settings.allowed_aets:
            ae.require_calling_aet = list(self.settings.allowed_aets)
        elif not self.settings.callers:
            log.warning("allowed_aets and callers are empty: any calling AE title is accepted")
        handlers = [(evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS), (evt.EVT_C_STORE, self._on_c_store),
                    (evt.EVT_ESTABLISHED, self._on_established), (evt.EVT_REJECTED, self._on_rejected)]
        tls = server_context(self.settings.tls)
        self._server = ae.start_server((self.settings.host, self.settings.port), block=False, evt_handlers=handlers,
                                       ssl_context=tls, contexts=shared_syntax_contexts(ae.supported_contexts))
        self.audit.record("configuration-loaded", detail=f"DICOM {'TLS' if tls else 'plain TCP'} on {self.settings.host}:"
                          f"{self.settings.port}; {len(self.settings.callers)} caller rule(s), "
                          f"{len(self.settings.allowed_aets)} allowed AE title(s); {len(self.settings.routes)} route(s)")
        nodelay_server(self._server)
        for target in (self._work_loop, self._send_loop):
            t = threading.Thread(target=self._guarded, args=(target,), daemon=True, name=f"gateway-{target.__name__}")
            t.start()
            self._threads.append(t)
        if self.settings.stow.enabled:
            from serving.gateway.stow import HttpServer

            key = os.environ.get(self.settings.stow.api_key_env, "").strip()
            if not key:
                log.warning("STOW-RS and /status need no credentials ($%s is not set; loopback only)",
                            self.settings.stow.api_key_env)
            self._http = HttpServer(self, self.settings.stow.host, self.settings.stow.port, key, self.settings.tls).start()
        log.info("gateway %s listening on %s:%d (DIMSE)%s; %d route(s); destination %s", self.settings.ae_title,
                 self.settings.host, self.settings.port,
                 f", {self._http.url} (STOW-RS, status)" if self._http else "", len(self.settings.routes),
                 self.settings.destination.kind)
        return self

    def _guarded(self, loop) -> None:
        """Run a worker loop; if it ends by an error (a bug: the loops catch what they expect), say so and make the
        gateway unhealthy, so that a supervisor restarts it instead of a gateway that receives and never answers."""
        try:
            loop()
        except BaseException as exc:
            self.dead_worker = f"{loop.__name__.strip('_')} died ({type(exc).__name__})"
            self.last_error = self.dead_worker
            log.critical("worker %s; the gateway is unhealthy and should be restarted", self.dead_worker,
                         exc_info=log.isEnabledFor(logging.DEBUG))
            self.died.set()

    def healthy(self) -> bool:
        """Every worker thread alive (or stopping on request)."""
        return self.dead_worker is None and (self._stop.is_set() or all(t.is_alive() for t in self._threads))

    def stop(self) -> None:
        """Stop listening and let the workers finish their current step (what is spooled stays)."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        if self._http is not None:
            self._http.stop()
        for t in self._threads:
            t.join(timeout=30)
        if self._workers is not None:  # after the work loop, which applied what was running
            self._workers.close()
        for monitor in self._monitors:  # what is queued is written
            monitor.close()
        for model in self.models.values():  # a service's kept-alive connections
            if hasattr(model, "close"):
                model.close()
        self.audit.close()

    def __enter__(self) -> "Gateway":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def status(self) -> dict[str, Any]:
        """Counters, queue sizes, the destination and routes, the last error (no identifier)."""
        return {**self.spool.status(), "destination": self.settings.destination.kind,
                "routes": [r.name or Path(r.model).name for r in self.settings.routes], "last_error": self.last_error,
                "healthy": self.healthy(),
                **({"syslog_dropped": self.audit.syslog.dropped} if self.audit.syslog is not None else {})}

    # ---- in: C-STORE and STOW-RS ---------------------------------------------------------------------

    @staticmethod
    def _peer(event) -> tuple[str, str, str | None]:
        """The association's calling AE title, peer address and (under TLS) client certificate CN."""
        requestor = event.assoc.requestor
        sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
        cert = sock.getpeercert() if hasattr(sock, "getpeercert") else None
        return str(requestor.ae_title).strip(), str(requestor.address), peer_subject_cn(cert)

    def _on_established(self, event) -> None:
        """Check the caller (AE title with address and certificate) and audit the association."""
        aet, address, cn = self._peer(event)
        refusal = caller_refusal(self.settings.callers, aet, address, cn)
        if refusal:
            self.audit.record("association-rejected", MINOR, user=aet, address=address, detail=refusal)
            log.warning("association from %s at %s aborted: %s", aet, address, refusal)
            event.assoc.abort()
            return
        self.audit.record("association-accepted", user=aet, address=address,
                          detail="TLS" + (f", client certificate {cn}" if cn else "") if self.settings.tls.cert else "plain TCP")

    def _on_rejected(self, event) -> None:
        aet, address, _ = self._peer(event)
        self.audit.record("association-rejected", MINOR, user=aet, address=address, detail="calling AE title not recognised")

    def _on_c_store(self, event) -> int:
        aet, address, cn = self._peer(event)
        if caller_refusal(self.settings.callers, aet, address, cn):  # never reached after the abort; defence in depth
            self.refused("C-STORE", STATUS_REFUSED_NOT_AUTHORISED, "caller not allowed")
            return STATUS_REFUSED_NOT_AUTHORISED
        try:
            data = event.encoded_dataset(include_meta=True)
            ds = pydicom.dcmread(io.BytesIO(data))
        except Exception as exc:  # a truncated or malformed data set
            self.refused("C-STORE", STATUS_CANNOT_UNDERSTAND, f"cannot read the data set ({type(exc).__name__})",
                         user=aet, address=address)
            return STATUS_CANNOT_UNDERSTAND
        study = uid_key(str(getattr(ds, "StudyInstanceUID", "") or ""))
        try:
            status = self.accept(data, ds)
        except Refused as exc:
            self.refused("C-STORE", exc.status, exc.reason, user=aet, address=address, study=study)
            return exc.status
        self.audit.record("instance-received", user=aet, address=address, object_key=study)
        return status

    def refused(self, via: str, status: int, reason: str, user: str | None = None, address: str | None = None,
                study: str | None = None) -> None:
        """Count, log and audit an instance refused on the way in (`via`: C-STORE, STOW-RS part)."""
        self.spool.count("refused")
        self.audit.record("instance-refused", MINOR, user=user, address=address, object_key=study,
                          detail=f"{via} 0x{status:04X}: {reason}")
        log.info("%s refused (0x%04X): %s", via, status, reason)

    def accept(self, data: bytes, ds: pydicom.Dataset | None = None) -> int:
        """Check one instance and spool it; returns the DICOM status. Raises `Refused` for a bad one."""
        if ds is None:
            try:
                ds = pydicom.dcmread(io.BytesIO(data))
            except (InvalidDicomError, EOFError, ValueError, OSError) as exc:
                raise Refused(STATUS_CANNOT_UNDERSTAND, f"not a readable DICOM file ({type(exc).__name__})") from None
        for tag in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "SOPClassUID"):
            if not str(getattr(ds, tag, "") or ""):
                raise Refused(STATUS_CANNOT_UNDERSTAND, f"{tag} is missing")
        reason = skip_reason(ds)
        if reason is None and route_for(ds, self.settings.routes) is None:
            reason = "no route takes it (modality / SOP class / body part)"
        if reason is not None:
            self.spool.count("ignored")
            log.info("instance of series %s skipped: %s", uid_key(ds.SeriesInstanceUID), reason)
            return STATUS_SUCCESS
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            raise Refused(STATUS_NOT_MATCHING, "no pixel data")
        ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
        if ts in VIDEO_SYNTAXES:  # acknowledged and kept, never refused: a refusal fails the PACS's forwarding job
            try:
                self.spool.keep_unprocessed(data, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                                            f"video transfer syntax {ts}: not processed")
            except OSError as exc:
                raise Refused(STATUS_OUT_OF_RESOURCES, f"spool write failed ({type(exc).__name__})") from None
            log.info("instance of series %s kept, not processed: video (%s)", uid_key(ds.SeriesInstanceUID), ts)
            return STATUS_SUCCESS
        if ts and not _decodable(ts):
            raise Refused(STATUS_CANNOT_UNDERSTAND, f"transfer syntax {ts} cannot be decoded here")
        short = _short_pixel_data(ds, ts)
        if short:
            raise Refused(STATUS_CANNOT_UNDERSTAND, short)
        floor = self.settings.spool_min_free_mb * 2**20
        if floor and self.spool.free_bytes() - len(data) < floor:
            raise Refused(STATUS_OUT_OF_RESOURCES, f"less than {self.settings.spool_min_free_mb} MB free for the spool")
        try:
            group = ds.StudyInstanceUID if self.settings.trigger == "study" else ds.SeriesInstanceUID
            self.spool.receive(data, group, ds.SOPInstanceUID)
        except OSError as exc:
            raise Refused(STATUS_OUT_OF_RESOURCES, f"spool write failed ({type(exc).__name__})") from None
        return STATUS_SUCCESS

    # ---- processing --------------------------------------------------------------------------------

    def _work_loop(self) -> None:
        """Claim quiet series; run the pending batches (in the worker processes, several series at once, or here),
        and apply what each gave."""
        running: dict[str, tuple[str, Path, Future]] = {}  # batch name -> (its group, folder, future) in the workers
        groups: dict[str, str] = {}  # batch name -> its series (or study), read once per batch
        while not self._stop.is_set():
            try:
                for d in self.spool.quiet_series(self.settings.quiet_seconds):
                    self.spool.claim(d)
            except OSError as exc:
                self.last_error = f"claiming: {type(exc).__name__}"
                log.error("claiming a quiet series failed: %s", type(exc).__name__)
            for batch in self.spool.pending_batches():
                if self._stop.is_set() or (self._workers is not None and len(running) >= self._workers.size):
                    break
                if batch.name in running or not self.model_backoff.due(batch.name):
                    continue
                if self._workers is None:
                    self._attempt(batch, lambda b=batch: self.process(b))
                    continue
                if batch.name not in groups:
                    groups[batch.name] = _group_of(batch, self.settings.trigger)
                group = groups[batch.name]
                if any(group == g for g, _, _ in running.values()):
                    continue  # a series' next batch waits for its last: its SR supersedes that one
                running[batch.name] = (group, batch, self._workers.submit(batch))
            if running:
                futures.wait([f for _, _, f in running.values()], timeout=0.2, return_when=futures.FIRST_COMPLETED)
                for name in self._collect(running, block=False):
                    groups.pop(name, None)
            else:
                self._stop.wait(0.2)
        self._collect(running, block=True)  # stopping: what is running finishes and is applied

    def _collect(self, running: dict[str, tuple[str, Path, Future]], block: bool) -> list[str]:
        """Apply the outcome of every finished batch in `running` (all of them when `block`), forget it, and
        return the names of those applied."""
        done = [name for name, (_, _, future) in running.items() if block or future.done()]
        for name in done:
            _, batch, future = running.pop(name)
            self._attempt(batch, lambda b=batch, f=future: self.apply(b, f.result()))
        return done

    def _attempt(self, batch: Path, step) -> None:
        """Run one batch step; a failure leaves the batch in work/, retried with back-off, and after
        `retry.max_attempts` failures it goes to failed/ with the reason."""
        try:
            step()
        except Exception as exc:  # never let the loop die
            wait = self.model_backoff.failed(batch.name)
            tries = self.model_backoff.attempts(batch.name)
            self.last_error = f"processing: {type(exc).__name__}"
            # The type only: an exception's message can quote a data element's value.
            log.debug("batch %s", batch.name, exc_info=True)
            if tries >= self.settings.retry.max_attempts:
                self._dead_letter(batch, f"processing failed {tries} times ({type(exc).__name__})")
            else:
                log.error("batch %s failed (%s; attempt %d of %d), retried in %.0f s", batch.name,
                          type(exc).__name__, tries, self.settings.retry.max_attempts, wait)

    def _dead_letter(self, batch: Path, reason: str) -> None:
        """Give a batch up: its instances to failed/ with `reason`, counted; the back-off forgets it."""
        moved = self.spool.dead_letter(batch, reason)
        self.model_backoff.succeeded(batch.name)
        self.spool.count("failed", moved)
        self.spool.count("failed_batches")
        self.last_error = reason
        log.error("batch %s moved to failed/ (%d instance(s)): %s", batch.name, moved, reason)

    def process(self, batch: Path) -> None:
        """One claimed batch in this thread: each instance to its route's model, the answers to every enabled
        result writer (`serving.gateway.batch.run_batch`), the results to the outbox; instances the model refuses
        go to failed/ with the reason."""
        self.apply(batch, run_batch(batch, self.settings, self.models))

    def apply(self, batch: Path, outcome: BatchOutcome) -> None:
        """Put what a batch gave on disk: results to the outbox, refused instances to failed/, the series history,
        the counters; or, for a model that could not answer, the back-off; for a client error, failed/."""
        if outcome.rejected is not None:  # a client error: the same request cannot succeed later
            self._dead_letter(batch, outcome.rejected)
            return
        if outcome.unavailable is not None:  # the model is unavailable: the batch waits in work/ (back-off)
            wait = self.model_backoff.failed(batch.name)
            self.last_error = outcome.unavailable
            log.warning("batch %s waits %.0f s: %s", batch.name, wait, outcome.unavailable)
            return
        self.model_backoff.succeeded(batch.name)
        if outcome.sanitised:  # header values outside the defined terms, left empty in the results
            self.spool.count("sanitised_values", outcome.sanitised)
        for r, group, history in outcome.histories:
            self.spool.record_series(r, group, history)
        failed = outcome.failed
        if failed:
            self.spool.keep_failed(batch.name, failed)
            for f, reason in failed:
                log.info("instance %s of batch %s not processed: %s", f.stem[:12], batch.name, reason)
        self.spool.finish(batch, outcome.results)
        self.spool.count("processed", outcome.answered)
        if failed:
            self.spool.count("failed", len(failed))
        log.info("batch %s: %d image(s) answered, %d failed, %d result(s) queued", batch.name, outcome.answered,
                 len(failed), len(outcome.results))

    # ---- out -------------------------------------------------------------------------------------

    def _send_loop(self) -> None:
        """Deliver the outbox with back-off; a batch leaves it only when the destination acknowledged it."""
        while not self._stop.is_set():
            for out in self.spool.outbox():
                if self._stop.is_set() or not self.backoff.due(out.name):
                    continue
                try:
                    sent = self._deliver(out)
                except (SendError, OSError) as exc:
                    wait = self.backoff.failed(out.name)
                    self.last_error = str(exc)
                    self.spool.count("send_errors")
                    log.warning("results %s not delivered (attempt %d, next in %.0f s): %s", out.name,
                                self.backoff.attempts(out.name), wait, exc)
                    continue
                except Exception as exc:  # a bug or an unexpected client error: keep the results, retry later
                    wait = self.backoff.failed(out.name)
                    self.last_error = f"send: {type(exc).__name__}"
                    log.error("sending results %s failed (%s), next in %.0f s", out.name, type(exc).__name__, wait)
                    log.debug("results %s", out.name, exc_info=True)
                    continue
                self.backoff.succeeded(out.name)
                if sent:  # counted before the outbox empties: whoever sees it drained sees the count
                    self.spool.count("sent", sent)
                self.spool.delivered(out)
            self._purge_when_due()
            self._stop.wait(0.2)

    def _purge_when_due(self) -> None:
        """Every `PURGE_EVERY_S` (and at start): drop delivered results and failures older than `retention_days`."""
        days = self.settings.retention_days
        now = time.monotonic()
        if not days or (self._last_purge is not None and now - self._last_purge < PURGE_EVERY_S):
            return
        self._last_purge = now
        removed = self.spool.purge(days * 86400)
        if removed:
            log.info("purged %d result/failure folder(s) older than %g days", removed, days)

    def _deliver(self, out: Path) -> int:
        """Send one outbox batch by media type: DICOM results to the destination (C-STORE or STOW-RS); a result
        the destination does not take stays with the batch in results/. Returns how many were sent."""
        dest = self.settings.destination
        files = self.spool.results_of(out)
        dicom = [f for f in files if media_type_of(f) == DICOM]
        kept = [f.name for f in files if media_type_of(f) != DICOM]
        if kept:
            log.info("results %s: %d result(s) of a media type the destination does not take are kept", out.name, len(kept))
        if dest.kind == "none" or not dicom:
            return 0
        datasets = [pydicom.dcmread(f) for f in dicom]
        studies = ",".join(sorted({uid_key(str(d.StudyInstanceUID)) for d in datasets}))
        try:
            send(datasets, dest, self.settings.ae_title, self.settings.tls)
        except Exception as exc:
            self.audit.record("result-failed", SERIOUS, user=dest.ae_title if dest.kind == "dimse" else "stow",
                              address=dest.host if dest.kind == "dimse" else dest.url, object_key=studies,
                              detail=type(exc).__name__)
            raise
        self.audit.record("result-sent", user=dest.ae_title if dest.kind == "dimse" else "stow",
                          address=dest.host if dest.kind == "dimse" else dest.url, object_key=studies,
                          detail=f"{len(datasets)} result(s)" + (" over TLS" if dest.kind == "dimse" and dest.tls else ""))
        return len(dicom)
