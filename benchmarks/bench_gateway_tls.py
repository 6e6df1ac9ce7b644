"""The cost of DICOM TLS on the gateway (issue 31), plain TCP against mutual TLS (trustme certificates, TLS 1.3
as negotiated), the same instances and gateway settings in the same run; the plain run is the reference:

  accepted    instances/s acknowledged by C-STORE over 4 parallel associations (no processing: the way in).
  delivered   end to end: the same instances in, the model in process, one SR per series C-STOREd to a PACS
              (a pynetdicom storage SCP, over mutual TLS in the TLS run), until the last SR has arrived.

    .venv/bin/python benchmarks/bench_gateway_tls.py --out benchmarks/results/gateway-tls-cpu.json
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from gateway_support import ct_files, free_port, make_model, study_from  # noqa: E402

from benchmarks._common import environment, fig  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def accept_rate(settings, instances, client_tls: ssl.SSLContext | None, until=None, timeout: float = 600.0) -> float:
    """Instances/s the gateway acknowledges over 4 parallel associations (until the last C-STORE response);
    with `until`, the gateway runs on until that condition holds (polled, with a deadline)."""
    from pynetdicom import AE, StoragePresentationContexts

    from serving.gateway.app import Gateway
    from serving.gateway.send import tcp_nodelay

    tcp_nodelay()

    def send(chunk):
        ae = AE(ae_title="MODALITY1")
        ae.requested_contexts = StoragePresentationContexts
        kw = {"tls_args": (client_tls, "127.0.0.1")} if client_tls else {}
        a = ae.associate("127.0.0.1", settings.port, ae_title=settings.ae_title, **kw)
        try:
            return [a.send_c_store(ds).Status for ds in chunk]
        finally:
            a.release()

    with Gateway(settings):
        chunks = [instances[i::4] for i in range(4)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            statuses = [s for r in pool.map(send, chunks) for s in r]
        deadline = time.time() + timeout
        while until is not None and not until():
            if time.time() > deadline:
                raise TimeoutError("the results did not all arrive")
            time.sleep(0.01)
        seconds = time.perf_counter() - t0
    assert statuses == [0] * len(instances), "every instance acknowledged"
    return len(instances) / seconds


def delivered_rate(settings, instances, client_tls: ssl.SSLContext | None, pacs_tls: ssl.SSLContext | None) -> float:
    """Instances/s from the first C-STORE to the last series' SR received by the PACS."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    series = len({ds.SeriesInstanceUID for ds in instances})
    received = []
    pacs = AE(ae_title="PACS")
    pacs.supported_contexts = AllStoragePresentationContexts
    server = pacs.start_server(("127.0.0.1", settings.destination.port), block=False, ssl_context=pacs_tls,
                               evt_handlers=[(evt.EVT_C_STORE, lambda e: received.append(1) or 0)])
    try:
        t0 = time.perf_counter()
        accept_rate(settings, instances, client_tls, until=lambda: len(received) >= series)
        return len(instances) / (time.perf_counter() - t0)
    finally:
        server.shutdown()


def main() -> None:
    import trustme

    from serving.gateway.settings import load_gateway_settings

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=300)
    ap.add_argument("--size", type=int, default=256, help="CT pixels cropped to this size")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-gateway-tls-"))
    model = make_model(tmp / "model", ct_files(SHARED, 12), size=64)
    instances = [ds for _ in range(args.instances // 25) for ds in study_from(ct_files(SHARED, 1)[0], 25, size=args.size)]
    ca = trustme.CA()
    ca.cert_pem.write_to_path(tmp / "ca.pem")
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(tmp / "gateway.pem")
    client = ca.issue_cert("modality.example", common_name="MODALITY1")
    client.private_key_and_cert_chain_pem.write_to_path(tmp / "modality.pem")
    client_tls = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tmp / "ca.pem"))
    client_tls.load_cert_chain(str(tmp / "modality.pem"))
    ca.issue_cert("127.0.0.1", common_name="PACS").private_key_and_cert_chain_pem.write_to_path(tmp / "pacs.pem")
    pacs_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tmp / "ca.pem"))
    pacs_tls.load_cert_chain(str(tmp / "pacs.pem"))
    pacs_tls.verify_mode = ssl.CERT_REQUIRED
    rates = {}
    gateway_tls = {"cert": str(tmp / "gateway.pem"), "key": str(tmp / "gateway.pem"), "ca": str(tmp / "ca.pem"),
                   "require_client_cert": True}
    runs = {}
    # A warm-up run first (imports, the model's first batch), then each arm twice in the order plain, TLS, TLS,
    # plain, so neither arm is favoured by going first or by drift in the machine's load; the mean is reported.
    for mode, name, tls in [("accepted", "warm-up", {})] + [(m, n, t) for m in ("accepted", "delivered") for n, t in
                                                             (("plain", {}), ("tls", gateway_tls), ("tls", gateway_tls), ("plain", {}))]:
        settings = load_gateway_settings(None, {
            "port": free_port(), "spool": str(tmp / f"spool-{mode}-{name}-{len(runs)}"), "tls": tls,
            "quiet_seconds": 3600 if mode == "accepted" else 0.5,  # accepted: receive only
            "destination": {"kind": "dimse", "port": free_port(), "ae_title": "PACS", "tls": bool(tls)},
            "routes": [{"model": str(model), "modalities": ["CT"]}], "stow": {"enabled": False},
            "callers": [{"ae_title": "MODALITY1", "hosts": ["127.0.0.1"]}]})
        client = client_tls if tls else None
        rate = (accept_rate(settings, instances, client) if mode == "accepted" else
                delivered_rate(settings, instances, client, pacs_tls if tls else None))
        runs.setdefault((mode, name), []).append(rate)
    rates = {k: sum(v) / len(v) for k, v in runs.items()}
    result = {"benchmark": "gateway_tls", "environment": environment(), "instances": len(instances), "image_size": args.size,
              "series": len({ds.SeriesInstanceUID for ds in instances}),
              "runs": {f"{mode} {name}": v for (mode, name), v in runs.items()},
              "figures": [f for mode, what in (("accepted", "C-STORE accepted"), ("delivered", "delivered (SR at the PACS)"))
                          for f in (fig(f"{what}, plain TCP (4 associations)", rates[mode, "plain"], "instances/s"),
                                    fig(f"{what}, mutual DICOM TLS in and out (4 associations)", rates[mode, "tls"],
                                        "instances/s", reference=rates[mode, "plain"], reference_name="plain TCP"))]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["figures"], indent=1))


if __name__ == "__main__":
    main()
