"""Who may connect to the gateway, and the TLS it speaks.

- `server_context` / `client_context`: `ssl.SSLContext`s for DICOM TLS (PS3.15 B.1: TLS 1.2 or later) on the
  gateway's SCP and on its C-STORE SCU to the PACS, and for HTTPS; certificates and keys come from files named
  in the settings and are never logged.
- `caller_refusal`: an association is accepted only from a calling AE title *and* peer address of a
  configured caller (and, under mutual TLS, the certificate subject it names); an AE title alone is a
  string anyone can send.
- `plain_network_refusal`: a gateway that listens beyond loopback without TLS is refused unless its
  settings say `insecure_plain_network: true`.

Example:
    >>> ctx = server_context(settings.tls)      # None when no certificate is configured
    >>> caller_refusal(settings.callers, "MODALITY1", "10.0.0.5", None)   # None: allowed
"""

from __future__ import annotations

import ipaddress
import ssl
from typing import Any

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def server_context(tls: Any) -> ssl.SSLContext | None:
    """The TLS context of a listening socket (None without a certificate): its certificate and key; the CA
    bundle that client certificates must chain to; client certificates required with `require_client_cert`."""
    if not tls.cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert, tls.key or None)
    if tls.ca:
        ctx.load_verify_locations(cafile=tls.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else (ssl.CERT_OPTIONAL if tls.ca else ssl.CERT_NONE)
    return ctx


def client_context(tls: Any) -> ssl.SSLContext:
    """The TLS context of a connection the gateway opens: the server's certificate verified against `tls.ca`
    (the system's CAs when empty) and its host name checked; the gateway's own certificate offered when set."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert:
        ctx.load_cert_chain(tls.cert, tls.key or None)
    return ctx


def peer_subject_cn(peer_cert: dict | None) -> str | None:
    """The common name of a peer certificate's subject (`ssl.SSLSocket.getpeercert()`), or None."""
    for rdn in (peer_cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


def _address_matches(address: str, hosts: list[str]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address in hosts
    for h in hosts:
        try:
            if ip in ipaddress.ip_network(h, strict=False):
                return True
        except ValueError:
            if h == address:
                return True
    return False


def caller_refusal(callers: list, ae_title: str, address: str, subject_cn: str | None) -> str | None:
    """Why an association is refused (None: accepted). With no callers configured every caller passes here
    (the AE-title list `allowed_aets` still applies); otherwise one caller must match the calling AE title, the
    peer address (an address or network in its `hosts`; empty: any) and, when it names one, the certificate's CN."""
    if not callers:
        return None
    titled = [c for c in callers if c.ae_title == ae_title.strip()]
    if not titled:
        return "calling AE title not recognised"
    placed = [c for c in titled if not c.hosts or _address_matches(address, c.hosts)]
    if not placed:
        return "calling AE title not allowed from this address"
    if not any(not c.subject_cn or c.subject_cn == subject_cn for c in placed):
        return "client certificate subject not allowed for this AE title"
    return None


def plain_network_refusal(settings: Any) -> str | None:
    """Why the settings would put patient data on the network in clear (None: loopback, or TLS, or explicitly
    allowed with `insecure_plain_network`)."""
    if settings.insecure_plain_network:
        return None
    out = []
    if settings.host not in LOOPBACK and not settings.tls.cert:
        out.append(f"DICOM on {settings.host}:{settings.port}")
    if settings.stow.enabled and settings.stow.host not in LOOPBACK and not settings.tls.cert:
        out.append(f"HTTP on {settings.stow.host}:{settings.stow.port}")
    if not out:
        return None
    return (f"{' and '.join(out)} would listen beyond loopback without TLS: set tls.cert and tls.key, or "
            "insecure_plain_network: true to accept that risk")
