"""Worker processes that run the gateway's claimed batches (decode, model, result writing), so that the
process receiving C-STOREs never waits for them.

Python runs one thread at a time per process: in one process, the associations that receive instances and
the thread that decodes, infers and encodes the SRs (pure-Python DICOM writing, about 9 ms per instance)
take turns. With `workers: N` (default 2) the batches run in N processes of their own, started by a fork
server (from a clean interpreter, not a fork of a threaded one), each opening the routes' models once. The
gateway gives them batches of different series at once (a series' next batch waits for its last: its SR
supersedes that one). A batch that crashes a worker (a decoder fault) counts as a failed attempt of the
batches then running; new workers are started.

Example:
    >>> workers = BatchWorkers(settings)          # opens the models in the workers, raises if one cannot open
    >>> outcome = workers.submit(Path("spool/work/3f9c...")).result()
    >>> workers.close()
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from serving.gateway.batch import BatchOutcome, run_batch, warm_up
from serving.gateway.inference import ModelInfo, open_model
from serving.gateway.settings import GatewaySettings

log = logging.getLogger("remedis.gateway")

# Imported once by the fork server, so that a (re)started worker does not import torch and the rest again.
PRELOAD = ["serving.gateway.batch", "serving.gateway.workers", "serving.runtime", "serving.answer", "serving.inputs",
           "serving.monitoring", "remedis.adapt.calibration", "remedis.data.contract", "remedis.data.preprocess"]

_settings: GatewaySettings | None = None
_models: dict = {}
_failure: Exception | None = None
_closers: list = []  # what the worker closes at its end (prediction logs first, then models)


def _open(settings: GatewaySettings, model_wait_s: float, log_level: int, threads: int, environ: dict[str, str],
          started: Any, gateway_alive: Any) -> None:
    """In the worker: open every route's model once (and its prediction log), with `threads` compute threads
    (the cores shared among the workers); remember a failure to report; then release `started`. `environ` is the
    gateway's environment now (API keys, the monitor's secret): the fork server's copy is the one it had when it
    started. `gateway_alive`: the read end of a pipe whose write end only the gateway holds (`_end_with`)."""
    global _settings, _failure
    from multiprocessing.util import Finalize

    os.environ.clear()
    os.environ.update(environ)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("pydicom").disabled = True  # pydicom can log element values (identifiers)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    _settings = settings
    try:
        for i, r in enumerate(settings.routes):
            _models[i] = open_model(r.model, r.api_key_env, r.timeout_s, threads=threads, wait_s=model_wait_s,
                                    ca=settings.tls.ca)
        _closers.extend(monitor.close for monitor in log_in_process_routes(settings, _models))
    except Exception as exc:  # raised again by `_infos` in the gateway, which refuses to start
        _failure = exc
    for model in _models.values():
        try:
            warm_up(model.info)  # the first batch then runs as fast as the next ones
        except Exception as exc:  # a made-up image's SR: never a reason not to serve
            log.warning("worker warm-up failed (%s); the first batch will be slower", type(exc).__name__)
    _closers.extend(model.close for model in _models.values() if hasattr(model, "close"))
    Finalize(None, _close_all, exitpriority=10)  # at a normal end; `_end_with` when the gateway is gone
    threading.Thread(target=_end_with, args=(gateway_alive,), daemon=True, name="gateway-watch").start()
    started.release()


def _end_with(gateway_alive: Any) -> None:
    """End this worker when the gateway ends, however it ends (SIGKILL included): a process pool's worker
    otherwise waits on its task queue forever (it holds that pipe's write end itself), its models loaded, and
    keeps the fork server alive. The pipe reads end-of-file once the gateway's write end is closed."""
    try:
        gateway_alive.recv()
    except (EOFError, OSError):
        pass
    _close_all()
    os._exit(0)


def _close_all() -> None:
    """Close the prediction logs (what they queued is written), then the models."""
    for close in _closers:
        try:
            close()
        except Exception as exc:
            log.warning("closing %s failed (%s)", getattr(close, "__qualname__", "a resource"), type(exc).__name__)


def log_in_process_routes(settings: GatewaySettings, models: dict) -> list:
    """With `monitor.store`, every answer of a route whose model runs in process goes to the prediction log
    (a route to the service is logged by the service); returns the monitors opened."""
    from serving.gateway.inference import LocalInference
    from serving.monitoring import ServiceMonitor

    opened = []
    if not settings.monitor.store:
        return opened
    for model in models.values():
        if isinstance(model, LocalInference) and model.monitor is None:
            info = model.info
            positive = info.class_names[info.positive_index] if len(info.class_names) == 2 else None
            model.log_to(ServiceMonitor(settings.monitor, {"name": info.name, "version": info.version},
                                        info.weights_sha256, positive_class=positive), f"gateway {settings.ae_title}")
            opened.append(model.monitor)
    return opened


def _infos() -> dict[int, ModelInfo]:
    if _failure is not None:
        raise _failure
    return {i: m.info for i, m in _models.items()}


def _run(batch: str) -> BatchOutcome:
    if _failure is not None or _settings is None:
        raise RuntimeError(f"the worker could not open the models ({type(_failure).__name__})")
    return run_batch(Path(batch), _settings, _models)


class BatchWorkers:
    """Worker processes that open the routes' models and run batches (`run_batch`) on request.

    Args:
        settings: the gateway's settings (`workers`: how many processes).
        model_wait_s: how long a worker keeps trying a route's service that is not up yet.
    """

    def __init__(self, settings: GatewaySettings, model_wait_s: float = 0.0):
        self.settings, self.model_wait_s = settings, model_wait_s
        self.size = max(1, settings.workers)
        self._pool = self._start()
        try:
            # Every worker starts now, not when traffic first runs two batches at once (the pool starts a process
            # per task submitted while none is idle): each opens the models, or `_infos` raises what that raised.
            for f in [self._pool.submit(_infos) for _ in range(self.size)]:
                f.result()
            deadline = time.monotonic() + max(600.0, model_wait_s + 600.0)
            for _ in range(self.size):
                if not self._started.acquire(timeout=max(0.0, deadline - time.monotonic())):
                    raise RuntimeError("a batch worker did not open the models in time")
        except BaseException:
            self._pool.shutdown(wait=True)
            self._alive.close()
            raise

    def _start(self) -> ProcessPoolExecutor:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        threads = max(1, (os.cpu_count() or 1) // self.size)  # workers that each take every core only contend
        level = logging.getLogger("remedis.gateway").getEffectiveLevel()
        self._started = ctx.Semaphore(0)  # released by each worker once its models are open
        # The workers end when this write end closes: with `close`, or when the gateway's process ends.
        alive_r, self._alive = ctx.Pipe(duplex=False)
        return ProcessPoolExecutor(self.size, mp_context=ctx, initializer=_open,
                                   initargs=(self.settings, self.model_wait_s, level, threads, dict(os.environ),
                                             self._started, alive_r))

    def submit(self, batch: Path) -> Future:
        """Start one claimed batch in a worker; its future gives the `BatchOutcome`, or raises what the batch raised
        (`BrokenProcessPool` if a worker died on it: then new workers are started for the next batches)."""
        try:
            return self._pool.submit(_run, str(batch))
        except BrokenProcessPool:
            self._pool.shutdown(wait=False)
            self._alive.close()  # the broken pool's other workers end too
            log.error("a batch worker died; starting new workers")
            self._pool = self._start()
            return self._pool.submit(_run, str(batch))

    def pids(self) -> list[int]:
        """The process ids of the workers now running."""
        return [proc.pid for proc in dict(self._pool._processes or {}).values() if proc.is_alive()]

    def close(self) -> None:
        """End the workers (what their prediction logs queued is written first)."""
        self._pool.shutdown(wait=True)
        self._alive.close()
