"""ASGI middleware in front of the API: API key, request size and content type, before any body is
parsed, each answered with a JSON error naming the problem.

- API key (when `auth.enabled`): the configured header (or `Authorization: Bearer KEY`, what
  `bentoml.SyncHTTPClient(token=...)` sends) compared in constant time; 401 without it. Health, readiness
  and metrics stay open so orchestrators and Prometheus need no key. The key is never logged.
- Body size: a Content-Length above `limits.max_request_bytes` gets 413 at once; a chunked body is
  counted as it streams and cut off at the limit (413).
- Upload endpoints accept only multipart/form-data (415 otherwise), so a JSON body can never make
  the server fetch a URL on the client's behalf.

Example:
    >>> RemedisService.add_asgi_middleware(RequestGuard, settings=settings, upload_paths={"/predict"})
"""

from __future__ import annotations

import hmac
import json
import logging

from serving.settings import ServeSettings, read_api_key

log = logging.getLogger("bentoml.remedis")
OPEN_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/metrics"})


async def send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """Answer an ASGI request with a JSON body."""
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": payload})


class RequestGuard:
    """ASGI middleware in front of the service: API key, content type and request size checked before the app reads a byte."""

    def __init__(self, app, settings: ServeSettings, upload_paths: frozenset[str] | set[str] = frozenset()):
        self.app = app
        self.limit = settings.limits.max_request_bytes
        self.upload_paths = frozenset(upload_paths)
        self.header = settings.auth.header.lower().encode("latin-1")
        self.header_name = settings.auth.header
        # Resolved once per worker; a missing key stops the worker at start with a clear message.
        self.key = read_api_key(settings.auth).encode() if settings.auth.enabled else None

    async def __call__(self, scope, receive, send):
        """ASGI entry: refuse a request without a valid key, of a wrong content type or too large; else pass it on."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = dict(scope.get("headers") or [])
        if self.key is not None and path not in OPEN_PATHS:
            given = headers.get(self.header, b"")
            bearer = headers.get(b"authorization", b"")
            if bearer[:7].lower() == b"bearer ":  # what bentoml.SyncHTTPClient(token=...) sends
                given = given or bearer[7:].strip()
            if not hmac.compare_digest(given, self.key):
                return await send_json(send, 401, {"error": f"missing or invalid API key (header {self.header_name})"},
                                       [(b"www-authenticate", f'ApiKey header="{self.header_name}"'.encode())])
        if scope.get("method") == "POST" and path in self.upload_paths:
            ctype = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
            if ctype != "multipart/form-data":
                return await send_json(send, 415, {"error": f"{path[1:]} takes multipart/form-data uploads, "
                                                            f"got content type {ctype or 'none'!r}"})
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return await send_json(send, 400, {"error": "invalid Content-Length header"})
            if n > self.limit:
                return await send_json(send, 413, {"error": f"request body is {n} bytes, above this service's limit of {self.limit}"})
            return await self.app(scope, receive, send)
        return await self._counted(scope, receive, send)

    async def _counted(self, scope, receive, send):
        """A body without Content-Length (chunked): read it up to the limit first (413 past it), then
        hand it on; the app never sees a body it would have to abandon half-parsed."""
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            body = message.get("body", b"")
            seen += len(body)
            if seen > self.limit:
                return await send_json(send, 413, {"error": f"request body is above this service's limit of {self.limit} bytes"})
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replay = iter([{"type": "http.request", "body": b"".join(chunks), "more_body": False}])

        async def replay_receive():
            try:
                return next(replay)
            except StopIteration:
                return await receive()

        await self.app(scope, replay_receive, send)
