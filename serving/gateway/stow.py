"""DICOMweb in: a STOW-RS endpoint feeding the gateway's spool, and the status page, on one small server.

    POST /dicom-web/studies[/{study}]   multipart/related; type="application/dicom"
    GET  /status                        counters (received, processed, sent, failed, queued, ...)
    GET  /healthz                       (no credentials: for load balancers and supervisors)

STOW-RS and /status need the API key (header `X-API-Key: <key>` or `Authorization: Bearer <key>`, compared
in constant time) when one is configured; 401 otherwise, audited without the key. With the gateway's
`tls.cert` the server speaks HTTPS only (and with `tls.require_client_cert`, mutual TLS).

The STOW-RS answer is the standard DICOM JSON: the stored instances under ReferencedSOPSequence
(0008,1199), the refused ones under FailedSOPSequence (0008,1198) with their FailureReason
(0008,1197); 200 when all were stored, 202 when some were refused, 409 when none was, 415 for a
body that is not multipart/related DICOM. A part is answered only after it is in the spool.

Example:
    >>> server = HttpServer(gateway, "127.0.0.1", 8043).start()
    >>> DICOMwebClient(f"{server.url}/dicom-web").store_instances([ds])
"""

from __future__ import annotations

import asyncio
import hmac
import io
import logging
import socket
import threading
import time
from email.parser import BytesParser
from email.policy import HTTP

import pydicom
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from serving.gateway.codes import STATUS_CANNOT_UNDERSTAND, Receiver, Refused

log = logging.getLogger("remedis.gateway")
MAX_BODY = 2 * 1024**3


class StowError(Exception):
    """A STOW-RS request the gateway refuses as a whole: HTTP status and reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def parse_multipart_related(body: bytes, content_type: str) -> list[bytes]:
    """The DICOM parts of a multipart/related body (RFC 2387), in order.

    Raises:
        StowError: 415 when it is not multipart/related with type application/dicom, 400 when malformed.
    """
    ctype = content_type.lower()
    if not ctype.startswith("multipart/related"):
        raise StowError(415, f"Content-Type must be multipart/related; type=\"application/dicom\", got {content_type[:80]!r}")
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not msg.is_multipart():
        raise StowError(400, "malformed multipart body (no boundary or no parts)")
    parts = []
    for part in msg.iter_parts():
        pt = part.get_content_type()
        if pt != "application/dicom":
            raise StowError(415, f"part of type {pt} (only application/dicom is accepted)")
        parts.append(part.get_payload(decode=True) or b"")
    if not parts:
        raise StowError(400, "no parts in the multipart body")
    return parts


def _item(ds: pydicom.Dataset | None, reason: int | None = None) -> dict:
    item = {}
    if ds is not None:
        if "SOPClassUID" in ds:
            item["00081150"] = {"vr": "UI", "Value": [str(ds.SOPClassUID)]}
        if "SOPInstanceUID" in ds:
            item["00081155"] = {"vr": "UI", "Value": [str(ds.SOPInstanceUID)]}
    if reason is not None:
        item["00081197"] = {"vr": "US", "Value": [reason]}
    return item


def _authorised(request: Request, api_key: str) -> bool:
    """The request carries the API key (or none is configured)."""
    if not api_key:
        return True
    given = request.headers.get("x-api-key", "")
    auth = request.headers.get("authorization", "")
    if not given and auth.lower().startswith("bearer "):
        given = auth[7:]
    return hmac.compare_digest(given.strip().encode(), api_key.encode())


async def _store_parts(gateway: Receiver, parts: list[bytes]) -> tuple[list, list]:
    """Each part into the gateway: the stored parts' items and the refused ones' (with their status)."""
    stored, failed = [], []
    for data in parts:
        ds = None
        try:
            ds = pydicom.dcmread(io.BytesIO(data))
            status = await asyncio.to_thread(gateway.accept, data, ds)
            stored.append(_item(ds)) if status == 0 else failed.append(_item(ds, status))
        except Refused as exc:
            gateway.refused("STOW-RS part", exc.status, exc.reason)
            failed.append(_item(ds, exc.status))
        except Exception as exc:  # an unreadable part
            gateway.refused("STOW-RS part", STATUS_CANNOT_UNDERSTAND, f"not a readable DICOM file ({type(exc).__name__})")
            failed.append(_item(None, STATUS_CANNOT_UNDERSTAND))
    return stored, failed


def make_app(gateway: Receiver, api_key: str = "") -> Starlette:
    """The STOW-RS, status and health routes over `gateway` (anything that accepts instances: `Receiver`);
    STOW-RS and status behind `api_key` when it is set."""

    def refuse(request: Request) -> JSONResponse:
        audit = getattr(gateway, "audit", None)
        if audit is not None:
            audit.record("authentication-failed", 4, user="api-key" if request.headers.get("x-api-key") or
                         request.headers.get("authorization") else "anonymous",
                         address=request.client.host if request.client else None,
                         detail=f"{request.method} {request.url.path}: missing or wrong API key")
        return JSONResponse({"error": "missing or wrong API key (X-API-Key or Authorization: Bearer)"}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})

    async def store(request: Request) -> JSONResponse:
        if not _authorised(request, api_key):
            return refuse(request)
        declared = int(request.headers.get("content-length") or 0)
        if declared > MAX_BODY:
            return JSONResponse({"error": f"body of {declared} bytes is above the limit of {MAX_BODY}"}, status_code=413)
        body = await request.body()
        try:
            parts = parse_multipart_related(body, request.headers.get("content-type", ""))
        except StowError as exc:
            return JSONResponse({"error": exc.reason}, status_code=exc.status)
        stored, failed = await _store_parts(gateway, parts)
        answer: dict = {}
        if stored:
            answer["00081199"] = {"vr": "SQ", "Value": stored}
        if failed:
            answer["00081198"] = {"vr": "SQ", "Value": failed}
        code = 200 if not failed else (202 if stored else 409)
        return JSONResponse(answer, status_code=code, media_type="application/dicom+json")

    async def status(request: Request) -> JSONResponse:
        if not _authorised(request, api_key):
            return refuse(request)
        return JSONResponse(await asyncio.to_thread(gateway.status))

    async def healthz(request: Request) -> JSONResponse:
        if gateway.healthy():
            return JSONResponse({"ok": True})
        return JSONResponse({"ok": False, "reason": gateway.dead_worker or "a worker is not running"}, status_code=503)

    return Starlette(routes=[
        Route("/dicom-web/studies", store, methods=["POST"]),
        Route("/dicom-web/studies/{study}", store, methods=["POST"]),
        Route("/status", status, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
    ])


class HttpServer:
    """uvicorn in a background thread (loopback by default)."""

    def __init__(self, gateway: Receiver, host: str, port: int, api_key: str = "", tls=None):
        import ssl

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        https = tls is not None and bool(tls.cert)
        self.url = f"{'https' if https else 'http'}://{host}:{port}"
        extra = {}
        if https:
            extra = {"ssl_certfile": tls.cert, "ssl_keyfile": tls.key or None, "ssl_ca_certs": tls.ca or None,
                     "ssl_cert_reqs": ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE}
        config = uvicorn.Config(make_app(gateway, api_key), host=host, port=port, log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=2, **extra)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="gateway-http")

    def start(self) -> "HttpServer":
        """Start serving in a background thread; returns once it accepts connections."""
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"gateway HTTP server did not start on {self.url}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Stop serving and wait for the thread."""
        self.server.should_exit = True
        self.thread.join(timeout=10)
