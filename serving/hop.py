"""The API worker's call to the model worker, resent when the connection under it goes away.

BentoML's client for a `bentoml.depends` service pools keep-alive connections and can close its
session while calls are in flight ("Connector is closed", "Session is closed", "Server disconnected";
BentoML issues 5540, 5544 and PR 5698). The service turns session refreshes off for the model worker
(`runner_connection` in `serving.service`); this resend covers what is left: a pooled connection the
model worker closed after its keep-alive timeout, or a worker restart. A forward pass is a pure
function of its input, so resending is safe; anything else (a model error, a shed request) is not
retried.

Example:
    >>> out = await call_resending(lambda: net.to_async.forward(x), log)
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aiohttp

T = TypeVar("T")


def dropped_connection(exc: BaseException) -> bool:
    """True for a failure of the connection itself, never for an answer the model worker gave."""
    if isinstance(exc, aiohttp.ClientResponseError):
        return False
    if isinstance(exc, aiohttp.ClientConnectionError):  # disconnected, reset, refused, connector closed
        return True
    return isinstance(exc, RuntimeError) and "Session is closed" in str(exc)


async def call_resending(call: Callable[[], Awaitable[T]], log: logging.Logger, attempts: int = 3) -> T:
    """Await `call`, sending it again (up to `attempts`) only when the connection dropped before an answer."""
    for attempt in range(1, attempts + 1):
        try:
            return await call()
        except Exception as exc:
            if attempt == attempts or not dropped_connection(exc):
                raise
            log.info("model worker connection dropped (%s); resending (%d)", type(exc).__name__, attempt)
    raise AssertionError("unreachable")
