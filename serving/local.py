"""Run the service as a real `bentoml serve` subprocess on a free loopback port (tests, benchmarks).

Example:
    >>> with LocalServer("svc:latest", bentoml_home="/tmp/bm", config="my.yaml") as srv:
    ...     httpx.post(f"{srv.url}/predict", files={"image": open("a.png", "rb")})
    >>> srv.log_text()          # everything the server printed
"""

from __future__ import annotations

import os
import signal
import socket
import ssl

# bandit B404 / B603: this module starts `bentoml serve` with arguments it builds itself, no shell
import subprocess  # nosec B404
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """`bentoml serve` in a subprocess on a free loopback port, started and stopped by the caller (tests, benchmarks)."""

    def __init__(self, model: str, bentoml_home: str | Path, config: str | Path | None = None,
                 env: dict[str, str] | None = None, startup_timeout: float = 180.0, target: str = "serving.service:RemedisService",
                 fail_on: tuple[str, ...] = (), https_ca: str | Path | None = None):
        """fail_on: log texts that mean the service will never be ready (its workers keep restarting):
        `start` raises as soon as one appears instead of waiting `startup_timeout`. https_ca: the config serves
        HTTPS (its `tls`); its certificate is checked against this CA bundle."""
        self.model, self.config, self.target, self.fail_on = model, config, target, fail_on
        self.port = free_port()
        self.https_ca = https_ca
        self.url = f"{'https' if https_ca else 'http'}://127.0.0.1:{self.port}"
        self.env = {**os.environ, "BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "true",
                    "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", **(env or {})}
        self.startup_timeout = startup_timeout
        self._log = tempfile.NamedTemporaryFile(prefix="remedis-serve-", suffix=".log", delete=False)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "LocalServer":
        """Start the server and wait until /readyz answers (or fail with its log)."""
        cmd = [sys.executable, "-m", "bentoml", "serve", self.target, "--host", "127.0.0.1", "--port", str(self.port),
               "--arg", f"model={self.model}"]
        if self.config:
            cmd += ["--arg", f"config={self.config}"]
        # Own process group: stopping it stops the workers too, and nothing else.
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,  # nosec B603
                                     start_new_session=True)
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited ({self.proc.returncode}):\n{self.log_text()[-4000:]}")
            if self.fail_on and any(text in self.log_text() for text in self.fail_on):
                self.stop(kill=True)
                raise RuntimeError(f"service failed to start:\n{self.log_text()[-4000:]}")
            try:
                # bandit B310: the URL is our own http(s)://127.0.0.1 address
                context = ssl.create_default_context(cafile=str(self.https_ca)) if self.https_ca else None
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=2, context=context) as r:  # nosec B310
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"service not ready after {self.startup_timeout:.0f} s:\n{self.log_text()[-4000:]}")

    def log_text(self) -> str:
        """What the server has logged so far."""
        return Path(self._log.name).read_text(errors="replace")

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (a graceful shutdown, up to 20 s), or SIGKILL at once with `kill` (a server that failed)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        import psutil

        try:  # the workers (circus starts them in their own sessions): remembered to reap stragglers
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            children = []
        try:
            os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        _, alive = psutil.wait_procs(children, timeout=0 if kill else 10)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        Path(self._log.name).unlink(missing_ok=True)
