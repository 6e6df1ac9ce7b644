"""Serving settings: one YAML file, typed dataclasses, unknown keys rejected by name.

The service reads them at import time (BentoML needs resources and batching before the class is
built): `--arg config=FILE`, else `$REMEDIS_SERVE_CONFIG`, else `serving/serving.yaml` next to this
file. `--arg model=TAG` / `$REMEDIS_MODEL` override `model`.

Example:
    >>> s = load_settings("serving/serving.yaml")
    >>> s.batching.max_batch_size, s.limits.max_pixels
    (32, 40000000)
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from remedis.config import ConfigError, from_dict

DEFAULT_FILE = Path(__file__).with_name("serving.yaml")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass
class BatchingSettings:
    """Adaptive batching of the model worker: largest batch and longest wait."""

    enabled: bool = True  # false: every request is its own forward pass (max batch size 1)
    max_batch_size: int = 32
    # BentoML sheds (503) a queued request only once it has waited this long; the batch window
    # itself is adaptive and much shorter.
    max_latency_ms: int = 10_000
    # The API worker merges waiting requests into one call to the model worker while this many calls
    # are out (serving/coalesce.py; saves the per-call HTTP cost on both sides). 0: one call per request.
    coalesce_in_flight: int = 2


@dataclass
class ResourceSettings:
    """CPU threads and GPUs of the model worker."""

    cpu: int = 1  # cores for the model worker (torch intra-op threads)
    gpu: int = 0  # 1: run the model worker on a GPU


@dataclass
class LimitSettings:
    """Upload limits checked before decoding: bytes, pixels, batch files, zip expansion."""

    max_upload_bytes: int = 64 * 1024 * 1024  # one file
    max_request_bytes: int = 512 * 1024 * 1024  # a whole request body (batch uploads, zips)
    max_pixels: int = 40_000_000  # rows x columns (x frames) declared by the header, checked before decoding
    max_batch_files: int = 256  # images in one predict_batch call (files or zip members)
    max_zip_bytes: int = 1024 * 1024 * 1024  # uncompressed zip content (zip-bomb guard)
    decode_timeout_s: float = 30.0  # a slower decode answers 422 instead of holding the client


@dataclass
class AuthSettings:
    """Who may call the service: API keys from an environment variable or file, and the open paths."""

    enabled: bool = False
    header: str = "X-API-Key"
    key_env: str = "REMEDIS_API_KEY"  # the key's environment variable ...
    key_file: str | None = None  # ... or a file holding it (first line); the file wins when set


@dataclass
class TlsSettings:
    """HTTPS for the service (PEM files; never logged): BentoML's own TLS options."""

    cert: str = ""  # the service's certificate chain: HTTPS only when set
    key: str = ""  # its private key
    ca: str = ""  # CA bundle that client certificates must chain to (with require_client_cert)
    require_client_cert: bool = False  # mutual TLS


@dataclass
class MonitorGaugeSettings:
    """The latest window's monitoring figures and alarms as Prometheus gauges on /metrics (serving.monitor_gauges)."""

    every_s: float = 300.0  # recomputed this often from the store; 0 = no gauges
    window: str = "1d"  # the latest window: the answers of the last day (30m, 12h, 1d, 1w)
    reference_since: str = ""  # the reference period, UTC date or time (e.g. the first weeks after go-live) ...
    reference_until: str = ""  # ... "" for both: the log's first window


@dataclass
class MonitorSettings:
    """The prediction log (remedis.monitor): every answer appended to a store, off the request path."""

    store: str = ""  # SQLAlchemy URL (sqlite:///predictions.db, postgresql+psycopg://...) or a SQLite path; "" = off
    secret_env: str = "REMEDIS_MONITOR_SECRET"  # the site's secret for pseudonymous keys (>= 16 characters) ...
    secret_file: str = ""  # ... or a file holding it (first line); the file wins when set
    embeddings: bool = False  # also keep each image's embedding (float16) for drift tests
    queue: int = 10_000  # answers that may wait for the store; beyond it they are dropped and counted
    gauges: MonitorGaugeSettings = field(default_factory=MonitorGaugeSettings)


@dataclass
class ShadowSettings:
    """A candidate version answering the same traffic in shadow (logged only; serving.shadow)."""

    model: str = ""  # BentoML tag of the candidate, e.g. site-b:v4; "" = none. Needs monitor.store
    queue: int = 256  # uploads waiting for the shadow; beyond it images are skipped and counted


@dataclass
class ServeSettings:
    """The service's settings (serving.yaml): model, devices, precision, batching, limits, authentication, modalities."""

    model: str = "remedis-quickstart:latest"  # BentoML store tag
    precision: str = "auto"  # auto: bf16 autocast (CPU, as offline) / AMP on GPU; or bf16, fp16, fp32
    channels_last: bool = True
    warmup: bool = True
    workers: int = 1  # API (decode) workers
    timeout_s: float = 120.0
    host: str = "127.0.0.1"  # where the API listens: loopback unless configured (0.0.0.0 in the container)
    modalities: list[str] = field(default_factory=list)  # DICOM Modality values the model expects; [] = any
    reject_other_modalities: bool = False  # false: a mismatch is reported in the answer, not refused
    resources: ResourceSettings = field(default_factory=ResourceSettings)
    batching: BatchingSettings = field(default_factory=BatchingSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    monitor: MonitorSettings = field(default_factory=MonitorSettings)
    shadow: ShadowSettings = field(default_factory=ShadowSettings)

    def validate(self) -> "ServeSettings":
        """Check the settings; a ValueError names the key."""
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision: {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        for where, value in (("batching.max_batch_size", self.batching.max_batch_size),
                             ("batching.max_latency_ms", self.batching.max_latency_ms),
                             ("resources.cpu", self.resources.cpu), ("workers", self.workers),
                             ("limits.max_upload_bytes", self.limits.max_upload_bytes),
                             ("limits.max_pixels", self.limits.max_pixels),
                             ("limits.max_batch_files", self.limits.max_batch_files)):
            if value < 1:
                raise ConfigError(f"{where}: must be >= 1, got {value}")
        if self.batching.coalesce_in_flight < 0:
            raise ConfigError(f"batching.coalesce_in_flight: must be >= 0, got {self.batching.coalesce_in_flight}")
        for key in ("cert", "key", "ca"):
            value = getattr(self.tls, key)
            if value and not Path(value).is_file():
                raise ConfigError(f"tls.{key}: {value} is not a file")
        if self.tls.require_client_cert and not (self.tls.cert and self.tls.ca):
            raise ConfigError("tls.require_client_cert: needs tls.cert, tls.key and tls.ca")
        if self.shadow.model and not self.monitor.store:
            raise ConfigError("shadow.model: a shadow's answers go only to the prediction log; set monitor.store")
        if self.monitor.store and self.monitor.queue < 1:
            raise ConfigError(f"monitor.queue: must be >= 1, got {self.monitor.queue}")
        self._validate_gauges()
        if self.resources.gpu < 0:
            raise ConfigError(f"resources.gpu: must be >= 0, got {self.resources.gpu}")
        return self

    def _validate_gauges(self) -> None:
        import datetime as dt

        from remedis.monitor.report import parse_duration

        g = self.monitor.gauges
        if g.every_s < 0:
            raise ConfigError(f"monitor.gauges.every_s: must be >= 0 (0 = off), got {g.every_s}")
        try:
            parse_duration(g.window)
        except ValueError as exc:
            raise ConfigError(f"monitor.gauges.window: {exc}") from None
        for key in ("reference_since", "reference_until"):
            value = getattr(g, key)
            try:
                if value:
                    dt.datetime.fromisoformat(str(value))
            except ValueError:
                raise ConfigError(f"monitor.gauges.{key}: {value!r} is not a date or time such as 2026-11-01") from None
        if bool(g.reference_since) != bool(g.reference_until):
            raise ConfigError("monitor.gauges.reference_since/reference_until: give both, or neither (the log's first window)")

    @property
    def max_batch_size(self) -> int:
        """The largest model batch."""
        return self.batching.max_batch_size if self.batching.enabled else 1

    def public(self) -> dict[str, Any]:
        """What `metadata` shows: everything but where the key lives."""
        d = asdict(self)
        d["auth"] = {"enabled": self.auth.enabled, "header": self.auth.header}
        d["monitor"] = {"enabled": bool(self.monitor.store), "embeddings": self.monitor.embeddings}  # not where it is
        return d


def load_settings(path: str | Path | None = None) -> ServeSettings:
    """The service settings: a YAML file (default: the packaged serving.yaml) with overrides; ValueError names a bad key."""
    path = Path(path) if path else DEFAULT_FILE
    try:
        raw = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read serving config ({exc})") from None
    if not path.is_file() and path != DEFAULT_FILE:
        raise ConfigError(f"{path}: serving config not found")
    try:
        return from_dict(ServeSettings, raw).validate()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def resolve(args: Any = None) -> ServeSettings:
    """Settings for this process: the config file named by `--arg config` / env, then the model tag."""
    cfg = getattr(args, "config", None) or os.environ.get("REMEDIS_SERVE_CONFIG")
    s = load_settings(cfg)
    s.model = getattr(args, "model", None) or os.environ.get("REMEDIS_MODEL") or s.model
    return s


def read_monitor_secret(monitor: MonitorSettings) -> bytes:
    """The site's secret for the prediction log's keys; a clear error (never the secret) when it is missing."""
    if monitor.secret_file:
        try:
            lines = Path(monitor.secret_file).read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"monitor.secret_file: cannot read {monitor.secret_file} ({type(exc).__name__})") from None
        secret, where = (lines[0].strip() if lines else ""), f"file {monitor.secret_file}"
    else:
        secret, where = os.environ.get(monitor.secret_env, "").strip(), f"environment variable {monitor.secret_env}"
    if len(secret) < 16:
        raise ConfigError(f"monitor.store is set but the secret from {where} is missing or shorter than 16 characters")
    return secret.encode()


def read_api_key(auth: AuthSettings) -> str:
    """The configured key; a clear error (never the key) when it is missing."""
    if auth.key_file:
        try:
            key = Path(auth.key_file).read_text().splitlines()[0].strip() if Path(auth.key_file).stat().st_size else ""
        except (OSError, IndexError) as exc:
            raise ConfigError(f"auth.key_file: cannot read {auth.key_file} ({type(exc).__name__})") from None
        where = f"file {auth.key_file}"
    else:
        key = os.environ.get(auth.key_env, "").strip()
        where = f"environment variable {auth.key_env}"
    if len(key) < 16:
        raise ConfigError(f"auth is enabled but the API key from {where} is missing or shorter than 16 characters")
    return key
