"""Sending results to the destination: C-STORE SCU (pynetdicom) or STOW-RS (dicomweb-client).

`send` raises `SendError` unless the destination acknowledged every instance; the caller keeps the
results in the spool and retries with back-off (`Backoff`), so nothing is lost while a PACS is down.
Sending the same SR twice is harmless: its UIDs are fixed, a PACS stores it once.

Example:
    >>> send([sr_dataset], Destination(kind="dimse", host="pacs", port=104, ae_title="PACS"), "REMEDIS")
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pydicom

from serving.gateway.settings import Destination, Retry

_NODELAY = threading.Lock()


def tcp_nodelay() -> None:
    """Turn Nagle's algorithm off on the DICOM connections pynetdicom opens (idempotent).

    pynetdicom writes a P-DATA PDU in several small sends; with Nagle on, each C-STORE waited for the
    peer's delayed ACK: 52 ms per instance on loopback, 10 ms with TCP_NODELAY (measured here, 100 small
    CT instances; dcmtk and Orthanc set it themselves). pynetdicom has no option for it, so the socket
    factory of its `AssociationSocket` is wrapped.
    """
    from pynetdicom import transport

    with _NODELAY:
        if getattr(transport.AssociationSocket._create_socket, "_remedis_nodelay", False):
            return
        original = transport.AssociationSocket._create_socket

        def create_socket(self, address):
            sock = original(self, address)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock

        create_socket._remedis_nodelay = True  # type: ignore[attr-defined]
        transport.AssociationSocket._create_socket = create_socket


def nodelay_server(server) -> None:
    """TCP_NODELAY on every connection an `AssociationServer` accepts (its C-STORE responses)."""
    accept = server.get_request

    def get_request():
        sock, addr = accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, addr

    server.get_request = get_request


class SendError(RuntimeError):
    """The destination did not acknowledge every result (the reason names no patient data)."""


def send(datasets: list[pydicom.Dataset], dest: Destination, calling_ae: str, tls=None) -> None:
    """Deliver datasets to the destination (C-STORE or STOW-RS); SendError unless every one was acknowledged.
    `tls`: the gateway's TLS settings (CA bundle, own certificate) for a destination with `tls: true`."""
    if dest.kind == "dimse":
        _c_store(datasets, dest, calling_ae, tls)
    elif dest.kind == "stow":
        _stow(datasets, dest)
    elif dest.kind != "none":
        raise SendError(f"unknown destination kind {dest.kind!r}")


def _c_store(datasets: list[pydicom.Dataset], dest: Destination, calling_ae: str, tls=None) -> None:
    from pynetdicom import AE

    from serving.gateway.security import client_context

    tcp_nodelay()
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = dest.timeout_s
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ts = sorted({str(ds.file_meta.TransferSyntaxUID) for ds in datasets if ds.SOPClassUID == sop_class})
        ae.add_requested_context(sop_class, ts + [t for t in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2") if t not in ts])
    tls_args = None
    if dest.tls:  # verified against our CA bundle; never falls back to plain TCP
        if tls is None:
            raise SendError("destination.tls: no TLS settings given")
        tls_args = (client_context(tls), dest.tls_server_name or dest.host)
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
    except OSError as exc:  # e.g. the certificate failed verification
        raise SendError(f"association to {dest.ae_title}@{dest.host}:{dest.port} failed ({type(exc).__name__})") from None
    if not assoc.is_established:
        raise SendError(f"association to {dest.ae_title}@{dest.host}:{dest.port} not established"
                        + (" (TLS)" if dest.tls else ""))
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None:
                raise SendError(f"no C-STORE response from {dest.ae_title} (timeout or aborted)")
            if code not in (0x0000, 0xB000, 0xB007, 0xB006):  # success, or a warning (stored, coerced)
                raise SendError(f"{dest.ae_title} answered C-STORE status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()


def _stow(datasets: list[pydicom.Dataset], dest: Destination) -> None:
    import requests
    from dicomweb_client.api import DICOMwebClient

    headers = {}
    if dest.headers_env:
        raw = os.environ.get(dest.headers_env, "")
        if ":" in raw:
            name, value = raw.split(":", 1)
            headers[name.strip()] = value.strip()
    client = DICOMwebClient(url=dest.url, headers=headers)
    try:
        answer = client.store_instances(datasets)
    except (requests.RequestException, OSError) as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        raise SendError(f"STOW-RS to {dest.url} failed ({type(exc).__name__}{f' {status}' if status else ''})") from None
    failed = answer.get("FailedSOPSequence", []) if answer is not None else []  # a pydicom Dataset
    if failed:
        raise SendError(f"STOW-RS to {dest.url}: {len(failed)} instance(s) refused")


class Backoff:
    """Exponential back-off per key (a result batch): retry after initial_s, 2x, ... up to max_s; never give up."""

    def __init__(self, retry: Retry, clock=time.monotonic):
        self.retry, self.clock = retry, clock
        self.state: dict[str, tuple[int, float]] = {}

    def due(self, key: str) -> bool:
        """Whether `key` may be tried now."""
        return self.clock() >= self.state.get(key, (0, 0.0))[1]

    def failed(self, key: str) -> float:
        """Record a failure; returns the seconds until the next attempt."""
        n = self.state.get(key, (0, 0.0))[0] + 1
        wait = min(self.retry.max_s, self.retry.initial_s * 2 ** (n - 1))
        self.state[key] = (n, self.clock() + wait)
        return wait

    def succeeded(self, key: str) -> None:
        """Forget `key`'s failures."""
        self.state.pop(key, None)

    def attempts(self, key: str) -> int:
        """Failed attempts so far for `key`."""
        return self.state.get(key, (0, 0.0))[0]
