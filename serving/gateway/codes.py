"""The gateway's DICOM status codes and refusals, and what an inbound endpoint needs of the gateway.

C-STORE (`serving.gateway.app`) and STOW-RS (`serving.gateway.stow`) answer with these codes; both take an
instance through a `Receiver` (the gateway), so neither endpoint imports the other.
"""

from __future__ import annotations

from typing import Any, Protocol

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_NOT_MATCHING = 0xA900  # data set does not match SOP class (here: no pixel data)
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_REFUSED_NOT_AUTHORISED = 0x0124  # the caller is not allowed (PS3.7 C.4.2.1.4 "Refused: Not Authorized")


class Refused(Exception):
    """An instance the gateway will not take: the DICOM status to answer and a reason for the log
    (never a data element's value)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


class Receiver(Protocol):
    """What an inbound endpoint (C-STORE, STOW-RS) calls: take an instance, count a refusal, report status."""

    def accept(self, data: bytes, ds: Any = None) -> int:
        """Check one instance and spool it; the DICOM status. Raises `Refused` for a bad one."""
        ...

    def refused(self, via: str, status: int, reason: str) -> None:
        """Count and log a refused instance (`via`: "C-STORE", "STOW-RS part")."""
        ...

    def status(self) -> dict[str, Any]:
        """Counters and queue sizes (no identifier)."""
        ...
