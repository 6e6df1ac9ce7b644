"""Pseudonymous keys that let a label find its logged prediction without storing an identifier.

A DICOM image is keyed by its SOP Instance UID, anything else by its bytes, each through HMAC-SHA256 with the
site's secret (the same secret file `remedis data index` uses for patient pseudonyms, or its own). Without the
secret a key cannot be computed from a UID, so the store holds no identifier; with it, `remedis monitor label`
turns a results CSV that names SOP Instance UIDs into keys.

Example:
    >>> secret = b"0123456789abcdef0123456789abcdef"
    >>> instance_key("1.2.826.0.1.3680043.8.498.1", secret)[:4]
    'i-17'
"""

from __future__ import annotations

import hashlib
import hmac


def instance_key(sop_instance_uid: str, secret: bytes) -> str:
    """The key of a DICOM instance: `i-` and 32 hex digits of HMAC-SHA256(secret, its SOP Instance UID)."""
    uid = sop_instance_uid.strip().rstrip("\x00")
    if not uid:
        raise ValueError("an empty SOP Instance UID has no key")
    return "i-" + hmac.new(secret, uid.encode("ascii", "replace"), hashlib.sha256).hexdigest()[:32]


def bytes_key(data: bytes, secret: bytes) -> str:
    """The key of an upload without a UID (PNG, JPEG, TIFF): `b-` and 32 hex digits of HMAC-SHA256(secret, its bytes)."""
    return "b-" + hmac.new(secret, data, hashlib.sha256).hexdigest()[:32]
