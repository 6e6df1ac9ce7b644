"""Ground truth for logged predictions from a CSV: a radiologist's reads or pathology results, by key or by
SOP Instance UID (turned into the key with the site's secret, so the store never sees the UID).

    key,label                          or    sop_instance_uid,label,source
    i-5c0e...,malignant                      1.2.840.113619.2.55...,malignant,pathology

Example:
    >>> import io
    >>> read_label_rows(io.StringIO("key,label\\ni-1,benign\\n"), secret=None)
    [('i-1', 'benign', '')]
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import IO

from remedis.config import ConfigError
from remedis.monitor.keys import instance_key

# bandit B105: the name of the environment variable that holds the secret, not a secret
SECRET_ENV = "REMEDIS_MONITOR_SECRET"  # nosec B105


def read_secret(path: str | None) -> bytes | None:
    """The site's secret from a file (first line) or $REMEDIS_MONITOR_SECRET; None when neither is set."""
    if path:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"--secret-file {path}: cannot read it ({type(exc).__name__})") from None
        secret = lines[0].strip() if lines else ""
    else:
        secret = os.environ.get(SECRET_ENV, "").strip()
        if not secret:
            return None
    if len(secret) < 16:
        raise ConfigError("the monitor secret is shorter than 16 characters")
    return secret.encode()


def read_label_rows(fh: IO[str], secret: bytes | None, name: str = "labels") -> list[tuple[str, str, str]]:
    """(key, label, source) per row; a clear error names the file, row and column of a bad one."""
    reader = csv.DictReader(fh)
    cols = set(reader.fieldnames or [])
    if "label" not in cols or not cols & {"key", "sop_instance_uid"}:
        raise ConfigError(f"{name}: needs a 'label' column and a 'key' or 'sop_instance_uid' column (has {sorted(cols)})")
    if "key" not in cols and secret is None:
        raise ConfigError(f"{name}: sop_instance_uid needs the site's secret (--secret-file or ${SECRET_ENV})")
    out = []
    for i, row in enumerate(reader, start=2):
        label = (row.get("label") or "").strip()
        if not label:
            raise ConfigError(f"{name}:{i}: empty label")
        key = (row.get("key") or "").strip()
        if not key:
            uid = (row.get("sop_instance_uid") or "").strip()
            if not uid or secret is None:
                raise ConfigError(f"{name}:{i}: neither a key nor a SOP Instance UID")
            key = instance_key(uid, secret)
        out.append((key, label, (row.get("source") or "").strip()))
    return out
