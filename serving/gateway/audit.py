"""The gateway's audit trail: one JSON line per security-relevant event, append-only, never a patient identifier.

The fields follow a DICOM audit message (PS3.15 A.5, IHE ATNA) in a form a SIEM reads directly:

    time        UTC, ISO 8601 with milliseconds
    event       association-accepted | association-rejected | instance-received | instance-refused |
                result-sent | result-failed | authentication-failed | configuration-loaded
    outcome     0 success, 4 minor failure, 8 serious failure, 12 major failure (EventOutcomeIndicator)
    user        the calling AE title, or "api-key" / "anonymous" for HTTP
    address     the peer's IP address
    object      a pseudonymous key of the study (a hash of its Study Instance UID), when one is concerned
    detail      a short reason (no data element values)

Lines are appended with O_APPEND and flushed at once, so concurrent writers never interleave a line and a
killed process loses none that was written. `remedis-gateway audit --since 1d` prints them.

An optional syslog sink (`audit_syslog`: `udp://host:514`, `tcp://host:601` or `unix:/dev/log`) sends each
line to a collector as well, as an RFC 5424 message (facility 13, "log audit"; severity from the outcome;
MSGID the event; the JSON line as MSG; TCP framed by octet counting, RFC 6587). The file stays the record:
a collector that is down costs the syslog copy (counted in `syslog_dropped`, warned once), never an event.

Example:
    >>> trail = AuditTrail("spool/audit.jsonl")
    >>> trail.record("association-accepted", 0, user="MODALITY1", address="10.0.0.5")
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

EVENTS = ("association-accepted", "association-rejected", "instance-received", "instance-refused", "result-sent",
          "result-failed", "authentication-failed", "configuration-loaded")
SUCCESS, MINOR, SERIOUS, MAJOR = 0, 4, 8, 12
LOG_AUDIT = 13  # RFC 5424 facility "log audit"
SEVERITY = {SUCCESS: 6, MINOR: 4, SERIOUS: 3, MAJOR: 2}  # informational, warning, error, critical
log = logging.getLogger("remedis.gateway")


def parse_syslog_target(target: str) -> tuple[str, str | tuple[str, int]]:
    """`udp://host:port`, `tcp://host:port` or `unix:/path` -> (kind, address); ValueError names the problem."""
    if target.startswith("unix:"):
        path = target[len("unix:"):]
        if not path:
            raise ValueError(f"audit_syslog: {target!r} names no socket path")
        return "unix", path
    parts = urlsplit(target)
    if parts.scheme not in ("udp", "tcp") or not parts.hostname:
        raise ValueError(f"audit_syslog: {target!r} is not udp://host:port, tcp://host:port or unix:/path")
    try:
        port = parts.port or (514 if parts.scheme == "udp" else 601)
    except ValueError:
        raise ValueError(f"audit_syslog: {target!r} has no valid port") from None
    return parts.scheme, (parts.hostname, port)


def rfc5424(line: dict[str, Any], payload: str, hostname: str, app: str = "remedis-gateway") -> bytes:
    """One RFC 5424 message for an audit line: PRI, version 1, its time, host, app, pid, the event as MSGID."""
    pri = LOG_AUDIT * 8 + SEVERITY.get(int(line["outcome"]), 4)
    header = f"<{pri}>1 {line['time']} {hostname or '-'} {app} {os.getpid()} {line['event']} -"
    return f"{header} {payload}".encode()


class SyslogSink:
    """Best-effort copy of audit lines to a syslog collector (RFC 5424 over UDP, TCP or a Unix datagram socket).

    Args:
        target: `udp://host:port`, `tcp://host:port` or `unix:/dev/log`.
        timeout: seconds to connect or send over TCP before the copy is dropped.
    """

    def __init__(self, target: str, timeout: float = 2.0):
        self.kind, self.address = parse_syslog_target(target)
        self.timeout = timeout
        self.hostname = socket.gethostname().split(".")[0][:255]
        self.dropped = 0
        self._sock: socket.socket | None = None
        self._warned = False

    def _connect(self) -> socket.socket:
        if self.kind == "tcp":
            return socket.create_connection(self.address, timeout=self.timeout)
        family = socket.AF_UNIX if self.kind == "unix" else socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.settimeout(self.timeout)
        sock.connect(self.address)
        return sock

    def send(self, line: dict[str, Any], payload: str) -> bool:
        """Send one line; False (and counted) when the collector cannot be reached."""
        message = rfc5424(line, payload, self.hostname)
        if self.kind == "tcp":
            message = f"{len(message)} ".encode() + message
        for attempt in (0, 1):  # one reconnect: a collector restarted since the last line
            try:
                if self._sock is None:
                    self._sock = self._connect()
                self._sock.sendall(message) if self.kind == "tcp" else self._sock.send(message)
                return True
            except OSError as exc:
                self.close()
                if attempt:
                    self.dropped += 1
                    if not self._warned:
                        log.warning("audit syslog %s unreachable (%s); the audit file keeps every line",
                                    self.kind, type(exc).__name__)
                        self._warned = True
        return False

    def close(self) -> None:
        """Close the socket (reopened by the next send)."""
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None


class AuditTrail:
    """An append-only JSON-lines audit file (created 0600).

    Args:
        path: the file; its folder is created (0700).
        syslog: optional collector for a copy of every line (`udp://host:514`, `tcp://host:601`, `unix:/dev/log`).
    """

    def __init__(self, path: str | Path, syslog: str = ""):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.syslog = SyslogSink(syslog) if syslog else None

    def record(self, event: str, outcome: int = SUCCESS, *, user: str | None = None, address: str | None = None,
               object_key: str | None = None, detail: str | None = None) -> dict[str, Any]:
        """Append one event; returns the line's fields."""
        if event not in EVENTS:
            raise ValueError(f"audit event {event!r} is not one of {', '.join(EVENTS)}")
        line = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"), "event": event,
                "outcome": int(outcome), "user": user, "address": address, "object": object_key, "detail": detail}
        payload = json.dumps({k: v for k, v in line.items() if v is not None})
        with self._lock:
            os.write(self._fd, (payload + "\n").encode())
            if self.syslog is not None:
                self.syslog.send(line, payload)
        return line

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if self.syslog is not None:
                self.syslog.close()


def parse_since(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """`30m`, `12h`, `1d`, `2w` before now, or an ISO date/time; ValueError otherwise."""
    now = now or dt.datetime.now(dt.timezone.utc)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([mhdw])", text.strip())
    if m:
        unit = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[m.group(2)]
        return now - dt.timedelta(**{unit: float(m.group(1))})
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since {text!r}: give a duration (30m, 12h, 1d, 2w) or an ISO date") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def read_trail(path: str | Path, since: dt.datetime | None = None) -> Iterator[dict[str, Any]]:
    """The audit lines of `path` from `since` on (unreadable lines are skipped)."""
    try:
        fh = open(path, encoding="utf-8")
    except FileNotFoundError:
        return
    with fh:
        for raw in fh:
            try:
                line = json.loads(raw)
                when = dt.datetime.fromisoformat(line["time"])
            except (ValueError, KeyError, TypeError):
                continue
            if since is None or when >= since:
                yield line
