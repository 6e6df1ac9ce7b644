"""Gateway settings: one YAML file, typed dataclasses, unknown keys rejected by name (as the service's).

Example (`serving/gateway.yaml` is the commented default):
    >>> s = load_gateway_settings("serving/gateway.yaml")
    >>> s.ae_title, s.port, s.quiet_seconds
    ('REMEDIS', 11112, 5.0)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from remedis.config import ConfigError, from_dict
from serving.settings import MonitorSettings

DEFAULT_FILE = Path(__file__).resolve().parent.parent / "gateway.yaml"


@dataclass
class Route:
    """Which instances go to which model. Empty lists match anything; the first matching route wins.

    `model` is a model folder (an adapted model, run in this process) or an http(s) URL of the deployed
    BentoML service (its `predict_batch` is called with the API key from `api_key_env`)."""

    model: str = ""
    name: str = ""  # shown in logs and status; defaults to the model's name
    modalities: list[str] = field(default_factory=list)  # DICOM Modality (0008,0060)
    sop_classes: list[str] = field(default_factory=list)  # SOP Class UIDs
    body_parts: list[str] = field(default_factory=list)  # Body Part Examined (0018,0015)
    api_key_env: str = "REMEDIS_API_KEY"
    timeout_s: float = 120.0


@dataclass
class Tls:
    """DICOM TLS and HTTPS (`serving.gateway.security`): PEM files, never logged."""

    cert: str = ""  # this gateway's certificate (chain): enables TLS on its DICOM port and its HTTP server
    key: str = ""  # its private key
    ca: str = ""  # CA bundle that peers' certificates must chain to (client certificates; the PACS's and service's)
    require_client_cert: bool = False  # mutual TLS: a caller without a certificate from `ca` is refused


@dataclass
class Caller:
    """One allowed caller: its AE title, from these addresses, (under mutual TLS) with this certificate."""

    ae_title: str = ""
    hosts: list[str] = field(default_factory=list)  # IP addresses or networks (CIDR) it may call from; [] any
    subject_cn: str = ""  # the client certificate's subject common name it must present; "" any


@dataclass
class Destination:
    """Where results go. kind: dimse (C-STORE SCU), stow (STOW-RS) or none (kept in spool/results)."""

    kind: str = "none"
    host: str = "127.0.0.1"
    port: int = 104
    ae_title: str = "PACS"  # the destination's AE title (dimse)
    tls: bool = False  # dimse over DICOM TLS: the PACS's certificate verified against tls.ca, ours offered if set
    tls_server_name: str = ""  # the name its certificate is checked against (default: host)
    url: str = ""  # the DICOMweb root for stow, e.g. http://pacs:8042/dicom-web
    headers_env: str = ""  # an environment variable holding 'Name: value' for stow (e.g. a bearer token)
    timeout_s: float = 30.0


@dataclass
class Retry:
    """Back-off of deliveries and model calls (first and longest wait), and when a batch is given up."""

    initial_s: float = 1.0  # the first retry waits this long, doubling up to max_s
    max_s: float = 60.0
    # A batch whose processing fails (an error, not an unavailable service) this many times goes to failed/
    # with the reason; a service that is down or overloaded (5xx, 408, 429, unreachable, 401/403) is waited
    # for without limit, and a client error it answers (another 4xx, e.g. 413) sends the batch to failed/ at once.
    max_attempts: int = 5


@dataclass
class FrameSettings:
    """Which frames of a multi-frame instance (a cine loop) the model reads (`serving.gateway.frames`)."""

    mode: str = "all"  # all (up to max_frames, evenly spaced; the result is the most positive frame), first, middle
    max_frames: int = 32


@dataclass
class StowIn:
    """The STOW-RS endpoint (DICOMweb in) and the status page, on one small HTTP server."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8043
    # STOW-RS and /status need this key (header X-API-Key, or Authorization: Bearer) when the variable is set;
    # beyond loopback a key (or mutual TLS) is required. HTTPS with the gateway's tls.cert.
    api_key_env: str = "REMEDIS_GATEWAY_API_KEY"


@dataclass
class GatewaySettings:
    """The DICOM gateway's settings: listening, allowed callers, routes to models, destination, spool, retry, result options."""

    ae_title: str = "REMEDIS"
    host: str = "127.0.0.1"  # loopback unless configured
    port: int = 11112
    allowed_aets: list[str] = field(default_factory=list)  # calling AE titles accepted; [] accepts any (logged)
    callers: list[Caller] = field(default_factory=list)  # AE title + address (+ certificate) checked together
    tls: Tls = field(default_factory=Tls)
    insecure_plain_network: bool = False  # allow listening beyond loopback without TLS (patient data in clear)
    audit: str = ""  # the audit trail (JSON lines); "" = <spool>/audit.jsonl
    audit_syslog: str = ""  # also send each audit line to a syslog collector (RFC 5424): udp://host:514, tcp://host:601, unix:/dev/log
    spool: str = "spool"
    spool_min_free_mb: int = 1024  # below this much free disk under the spool, stores are refused (0xA700) before it fills
    retention_days: float = 30.0  # delivered results and failures older than this are purged from the spool; 0 keeps them
    quiet_seconds: float = 5.0  # a series (or study) is processed once no instance of it arrived for this long
    trigger: str = "series"  # what one batch and its SR cover: a series, or a whole study (quiet per study)
    batch_size: int = 32  # images per inference call
    # processes that run batches (decode, model, SR writing) beside the one that receives and sends, so that
    # receiving never waits for them (serving.gateway.workers); 0: in the gateway's own thread
    workers: int = 2
    secondary_capture: bool = False  # also send a Secondary Capture with the result burned in
    institution: str = ""  # written into results' Institution Name when set
    uid_root: str = ""  # the organisation's UID root for the results' derived UIDs (e.g. "1.2.826.0.1.3680043.10.123."); "" = pydicom's
    routes: list[Route] = field(default_factory=list)
    destination: Destination = field(default_factory=Destination)
    retry: Retry = field(default_factory=Retry)
    frames: FrameSettings = field(default_factory=FrameSettings)
    stow: StowIn = field(default_factory=StowIn)
    # the prediction log of the in-process routes (as the service's `monitor`; a route to the service is logged there)
    monitor: MonitorSettings = field(default_factory=MonitorSettings)

    def _validate_security(self) -> None:
        _check_security(self)

    def validate(self) -> "GatewaySettings":
        """Check the settings; a ValueError names the key."""
        if not 1 <= len(self.ae_title) <= 16:
            raise ConfigError(f"ae_title: must be 1-16 characters, got {self.ae_title!r}")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port: {self.port} is not a TCP port")
        if not self.routes:
            raise ConfigError("routes: at least one route (a model folder or service URL) is needed")
        for i, r in enumerate(self.routes):
            if not r.model:
                raise ConfigError(f"routes[{i}].model: a model folder or service URL is needed")
        if self.destination.kind not in ("none", "dimse", "stow"):
            raise ConfigError(f"destination.kind: {self.destination.kind!r} is not one of none, dimse, stow")
        if self.destination.kind == "stow" and not self.destination.url:
            raise ConfigError("destination.url: needed for kind stow")
        if self.quiet_seconds < 0 or self.batch_size < 1 or not 0 <= self.workers <= 64:
            raise ConfigError("quiet_seconds must be >= 0, batch_size >= 1 and workers 0 (batches in the gateway's own "
                              "thread) to 64 processes")
        if self.retry.initial_s <= 0 or self.retry.max_s < self.retry.initial_s:
            raise ConfigError("retry: need 0 < initial_s <= max_s")
        if self.spool_min_free_mb < 0 or self.retention_days < 0:
            raise ConfigError("spool_min_free_mb and retention_days must be >= 0")
        if self.uid_root and (not re.fullmatch(r"[0-9]+(\.[0-9]+)*\.", self.uid_root) or len(self.uid_root) > 40):
            raise ConfigError(f"uid_root: {self.uid_root!r} must be digits and dots ending with a dot, at most 40 characters")
        self._validate_security()
        if self.trigger not in ("series", "study"):
            raise ConfigError(f"trigger: {self.trigger!r} is not one of series, study")
        if self.frames.mode not in ("all", "first", "middle") or self.frames.max_frames < 1:
            raise ConfigError(f"frames: mode must be all, first or middle and max_frames >= 1 (got {self.frames})")
        if self.retry.max_attempts < 1:
            raise ConfigError(f"retry.max_attempts: {self.retry.max_attempts}; need at least 1")
        return self


def _check_security(s: GatewaySettings) -> None:
    """TLS files present, mutual TLS with a CA, nothing in clear beyond loopback, credentials on the HTTP side."""
    import os

    from serving.gateway.security import LOOPBACK, plain_network_refusal

    for key in ("cert", "key", "ca"):
        value = getattr(s.tls, key)
        if value and not Path(value).is_file():
            raise ConfigError(f"tls.{key}: {value} is not a file")
    if s.tls.require_client_cert and not s.tls.ca:
        raise ConfigError("tls.require_client_cert: needs tls.ca (the CA bundle client certificates must chain to)")
    if s.tls.require_client_cert and not s.tls.cert:
        raise ConfigError("tls.require_client_cert: needs tls.cert and tls.key (TLS on the gateway's ports)")
    refusal = plain_network_refusal(s)
    if refusal:
        raise ConfigError(refusal)
    if (s.stow.enabled and s.stow.host not in LOOPBACK and not os.environ.get(s.stow.api_key_env, "").strip()
            and not s.tls.require_client_cert):
        raise ConfigError(f"stow: listening on {s.stow.host} needs credentials: set the API key in ${s.stow.api_key_env} "
                          "or require client certificates (tls.require_client_cert)")
    if s.audit_syslog:
        from serving.gateway.audit import parse_syslog_target

        try:
            parse_syslog_target(s.audit_syslog)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    for i, c in enumerate(s.callers):
        if not 1 <= len(c.ae_title) <= 16:
            raise ConfigError(f"callers[{i}].ae_title: must be 1-16 characters, got {c.ae_title!r}")


def load_gateway_settings(path: str | Path | None = None, overrides: dict | None = None) -> GatewaySettings:
    """Settings from a YAML file (default `serving/gateway.yaml`), with `overrides` merged on top."""
    path = Path(path) if path else DEFAULT_FILE
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: gateway config not found") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read gateway config ({exc})") from None
    raw = {**raw, **(overrides or {})}
    try:
        return from_dict(GatewaySettings, raw).validate()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
