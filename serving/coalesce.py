"""Coalesce concurrent requests' images into fewer calls to the model worker.

Every call from the API worker to the model worker costs a fixed amount of HTTP handling on both
sides; on CPU that was a quarter of the model worker's core (py-spy, 16 clients), time the network
could have run in. `Coalescer` sends what is waiting as one call: while `max_in_flight` calls are
out, new images queue; as soon as one returns, everything queued (up to `max_batch_size` images)
goes as the next call. An idle service sends a lone request at once, so nothing waits that did not
have to. The model worker's adaptive batcher (BentoML `batchable`) still merges the calls in flight.

Example:
    >>> co = Coalescer(lambda x: net.to_async.forward(x), max_batch_size=32)
    >>> out = await co.submit(x)          # x: (n, C, S, S) -> (n, outputs), in the caller's order
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

import numpy as np


class Coalescer:
    """Merges concurrent requests into model batches: at most `max_batch_size` rows per call and `max_in_flight`
    calls at once; each caller gets its own rows back."""

    def __init__(self, call: Callable[[np.ndarray], Awaitable[np.ndarray]], max_batch_size: int = 32,
                 max_in_flight: int = 2):
        if max_batch_size < 1 or max_in_flight < 1:
            raise ValueError("max_batch_size and max_in_flight must be >= 1")
        self.call, self.max_batch_size, self.max_in_flight = call, max_batch_size, max_in_flight
        self._waiting: deque[tuple[np.ndarray, asyncio.Future]] = deque()
        self._in_flight = 0
        self._tasks: set[asyncio.Task] = set()  # strong references: the loop keeps only weak ones
        self.calls = 0  # calls sent (tests read it)

    async def submit(self, x: np.ndarray) -> np.ndarray:
        """(n, ...) images through the model; the result rows are these images' rows, in order."""
        fut = asyncio.get_running_loop().create_future()
        self._waiting.append((x, fut))
        self._pump()
        return await fut

    def _pump(self) -> None:
        while self._waiting and self._in_flight < self.max_in_flight:
            group, n = [], 0
            # Whole requests only, so one request's images stay in one call; a request larger than
            # max_batch_size goes alone (the model worker's batcher splits nothing; callers chunk).
            while self._waiting and (not group or n + len(self._waiting[0][0]) <= self.max_batch_size):
                x, fut = self._waiting.popleft()
                if fut.cancelled():  # the client went away while it waited: nothing to compute
                    continue
                group.append((x, fut))
                n += len(x)
            if not group:
                return
            self._in_flight += 1
            self.calls += 1
            task = asyncio.ensure_future(self._send(group))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, group: list[tuple[np.ndarray, asyncio.Future]]) -> None:
        try:
            x = group[0][0] if len(group) == 1 else np.concatenate([g[0] for g in group])
            out = await self.call(x)
        except asyncio.CancelledError:  # shutting down
            for _, fut in group:
                fut.cancel()
            raise
        except Exception as exc:  # every request of the call gets the call's failure
            for _, fut in group:
                if not fut.done():
                    fut.set_exception(exc)
        else:
            start = 0
            for x, fut in group:
                if not fut.done():
                    fut.set_result(out[start:start + len(x)])
                start += len(x)
        finally:
            self._in_flight -= 1
            self._pump()
