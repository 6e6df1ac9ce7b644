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

Example:
    >>> trail = AuditTrail("spool/audit.jsonl")
    >>> trail.record("association-accepted", 0, user="MODALITY1", address="10.0.0.5")
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

EVENTS = ("association-accepted", "association-rejected", "instance-received", "instance-refused", "result-sent",
          "result-failed", "authentication-failed", "configuration-loaded")
SUCCESS, MINOR, SERIOUS, MAJOR = 0, 4, 8, 12


class AuditTrail:
    """An append-only JSON-lines audit file (created 0600).

    Args:
        path: the file; its folder is created (0700).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def record(self, event: str, outcome: int = SUCCESS, *, user: str | None = None, address: str | None = None,
               object_key: str | None = None, detail: str | None = None) -> dict[str, Any]:
        """Append one event; returns the line's fields."""
        if event not in EVENTS:
            raise ValueError(f"audit event {event!r} is not one of {', '.join(EVENTS)}")
        line = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"), "event": event,
                "outcome": int(outcome), "user": user, "address": address, "object": object_key, "detail": detail}
        data = (json.dumps({k: v for k, v in line.items() if v is not None}) + "\n").encode()
        with self._lock:
            os.write(self._fd, data)
        return line

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


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
