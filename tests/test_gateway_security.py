"""The gateway on a hospital network (issue 31): DICOM TLS (mutual) on its port and on its C-STORE to the PACS,
callers checked by AE title and address together, STOW-RS and /status behind an API key over HTTPS, an audit
line for every event with no patient identifier, a spool only its user reads, and no plain-text listening beyond
loopback unless asked for. Certificates are made by trustme at test time."""

from __future__ import annotations

import json
import logging
import ssl
import stat
import threading
from pathlib import Path

import pytest
from gateway_support import ct_files, free_port, make_model, no_identifiers, study_from, wait_until

pynetdicom = pytest.importorskip("pynetdicom")
trustme = pytest.importorskip("trustme")


@pytest.fixture(scope="module")
def model(tmp_path_factory, shared_data):
    return make_model(tmp_path_factory.mktemp("gw-sec") / "model", ct_files(shared_data, 12))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A hospital CA, the gateway's and the PACS's server certificates, a modality's client certificate, and a
    second CA nobody trusts."""
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue = trustme.CA(), trustme.CA()
    out = {"ca": folder / "ca.pem", "rogue_ca": folder / "rogue-ca.pem"}
    ca.cert_pem.write_to_path(out["ca"])
    rogue.cert_pem.write_to_path(out["rogue_ca"])
    for name, issuer, ident in (("gateway", ca, "127.0.0.1"), ("pacs", ca, "127.0.0.1"), ("modality", ca, "MODALITY1"),
                                ("rogue-pacs", rogue, "127.0.0.1")):
        cert = issuer.issue_cert(ident) if name != "modality" else issuer.issue_cert("modality.example", common_name="MODALITY1")
        out[name] = folder / f"{name}.pem"
        cert.private_key_and_cert_chain_pem.write_to_path(out[name])
        cert.private_key_pem.write_to_path(folder / f"{name}.key")  # separate files, as dcmtk takes them
        cert.cert_chain_pems[0].write_to_path(folder / f"{name}.crt")
    return out


def _settings(tmp: Path, model: Path, pki: dict, **over):
    from serving.gateway.settings import load_gateway_settings

    base = {"port": free_port(), "spool": str(tmp / "spool"), "quiet_seconds": 0.2,
            "routes": [{"model": str(model), "modalities": ["CT"]}], "stow": {"enabled": False},
            "retry": {"initial_s": 0.1, "max_s": 0.3},
            "tls": {"cert": str(pki["gateway"]), "key": str(pki["gateway"]), "ca": str(pki["ca"]), "require_client_cert": True},
            "callers": [{"ae_title": "MODALITY1", "hosts": ["127.0.0.1"], "subject_cn": "MODALITY1"}]}
    return load_gateway_settings(None, {**base, **over})


def _client_tls(pki, cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
    if cert:
        ctx.load_cert_chain(str(pki["modality"]))
    return ctx


def _assoc(port: int, aet="MODALITY1", tls=None, bind=None):
    from pynetdicom import AE, StoragePresentationContexts
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=aet)
    ae.requested_contexts = StoragePresentationContexts[:120]
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    kw = {"tls_args": (tls, "127.0.0.1")} if tls is not None else {}
    if bind:
        kw["bind_address"] = (bind, 0)
    return ae.associate("127.0.0.1", port, ae_title="REMEDIS", **kw)


_wait = wait_until  # poll with a deadline (tests/gateway_support.py)


def _audit(tmp: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp / "spool" / "audit.jsonl").read_text().splitlines()]


def _tls_pacs(port: int, cert: Path, ca: Path, received: list):
    """A storage SCP speaking DICOM TLS (the PACS), requiring the gateway's client certificate."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
    ctx.load_cert_chain(str(cert))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ae = AE(ae_title="PACS")
    ae.supported_contexts = AllStoragePresentationContexts

    def on_store(event):
        received.append(event.dataset.SOPInstanceUID)
        return 0

    return ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)], ssl_context=ctx)


def test_mutual_tls_callers_and_results_back_over_tls_with_an_audit_line_each(tmp_path, model, pki, shared_data, caplog):
    from serving.gateway.app import Gateway

    pacs_port, received = free_port(), []
    pacs = _tls_pacs(pacs_port, pki["pacs"], pki["ca"], received)
    settings = _settings(tmp_path, model, pki, destination={"kind": "dimse", "port": pacs_port, "ae_title": "PACS", "tls": True})
    study = study_from(ct_files(shared_data, 1)[0], 2, size=None)  # planted identifiers
    try:
        with caplog.at_level(logging.INFO), Gateway(settings) as gw:
            assoc = _assoc(settings.port, tls=_client_tls(pki))
            assert assoc.is_established
            assert [assoc.send_c_store(ds).Status for ds in study] == [0, 0]
            assoc.release()
            _wait(lambda: gw.status()["sent"] == 1, 60, "the SR delivered to the PACS over TLS")
            # Without a client certificate (required): no association.
            assert not _assoc(settings.port, tls=_client_tls(pki, cert=False)).is_established
            # Plain TCP to the TLS port: no association.
            assert not _assoc(settings.port).is_established
            # The allowed AE title from another address: accepted at TLS, aborted by the caller check.
            wrong = _assoc(settings.port, tls=_client_tls(pki), bind="127.0.0.2")
            _wait(lambda: not wrong.is_alive(), 10, "the association from a wrong address to end")
            assert not wrong.is_established or wrong.is_aborted
            # A title that is not a caller.
            other = _assoc(settings.port, aet="INTRUDER", tls=_client_tls(pki))
            _wait(lambda: not other.is_alive(), 10, "the intruder's association to end")
            assert gw.status()["received"] == 2
    finally:
        pacs.shutdown()
    assert len(received) == 1  # the SR, over TLS
    events = _audit(tmp_path)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "configuration-loaded" and "DICOM TLS" in events[0]["detail"]
    assert kinds.count("instance-received") == 2 and kinds.count("result-sent") == 1
    accepted = [e for e in events if e["event"] == "association-accepted"]
    assert accepted and accepted[0]["user"] == "MODALITY1" and "client certificate MODALITY1" in accepted[0]["detail"]
    rejected = [e for e in events if e["event"] == "association-rejected"]
    assert {e["detail"] for e in rejected} >= {"calling AE title not allowed from this address", "calling AE title not recognised"}
    assert [e for e in events if e["event"] == "result-sent"][0]["detail"] == "1 result(s) over TLS"
    text = (tmp_path / "spool" / "audit.jsonl").read_text() + caplog.text
    assert not no_identifiers(text) and study[0].StudyInstanceUID not in text
    # Patient data at rest: the spool is the gateway user's alone.
    spool = tmp_path / "spool"
    assert stat.S_IMODE(spool.stat().st_mode) == 0o700
    files = [p for p in spool.rglob("*") if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)


def test_results_are_never_sent_to_a_pacs_whose_certificate_is_not_trusted(tmp_path, model, pki, shared_data):
    from serving.gateway.app import Gateway

    pacs_port, received = free_port(), []
    pacs = _tls_pacs(pacs_port, pki["rogue-pacs"], pki["ca"], received)
    settings = _settings(tmp_path, model, pki, destination={"kind": "dimse", "port": pacs_port, "ae_title": "PACS", "tls": True})
    try:
        with Gateway(settings) as gw:
            assoc = _assoc(settings.port, tls=_client_tls(pki))
            assert assoc.send_c_store(study_from(ct_files(shared_data, 1)[0], 1, size=None)[0]).Status == 0
            assoc.release()
            _wait(lambda: gw.status()["send_errors"] >= 2, 60, "failed deliveries")
            assert gw.status()["sent"] == 0 and gw.status()["results_unsent"] == 1  # kept, retried, never in clear
    finally:
        pacs.shutdown()
    assert received == []
    assert any(e["event"] == "result-failed" for e in _audit(tmp_path))


def test_stow_and_status_over_https_need_the_api_key(tmp_path, model, pki, shared_data, monkeypatch, caplog):
    import httpx

    from serving.gateway.app import Gateway

    monkeypatch.setenv("REMEDIS_GATEWAY_API_KEY", "s3cret-key-123")
    port = free_port()
    tls = {"cert": str(pki["gateway"]), "key": str(pki["gateway"]), "ca": str(pki["ca"])}
    settings = _settings(tmp_path, model, pki, stow={"enabled": True, "port": port}, tls=tls, callers=[])
    ds = study_from(ct_files(shared_data, 1)[0], 1)[0]
    import io

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + buf.getvalue()
            + f"\r\n--{boundary}--\r\n".encode())
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    with caplog.at_level(logging.DEBUG), Gateway(settings):
        client = httpx.Client(verify=str(pki["ca"]), timeout=30)
        url = f"https://127.0.0.1:{port}"
        assert client.post(f"{url}/dicom-web/studies", content=body, headers=headers).status_code == 401
        assert client.post(f"{url}/dicom-web/studies", content=body, headers={**headers, "X-API-Key": "wrong"}).status_code == 401
        ok = client.post(f"{url}/dicom-web/studies", content=body, headers={**headers, "X-API-Key": "s3cret-key-123"})
        assert ok.status_code == 200, ok.text
        assert client.get(f"{url}/status").status_code == 401
        assert client.get(f"{url}/status", headers={"Authorization": "Bearer s3cret-key-123"}).json()["received"] == 1
        assert client.get(f"{url}/healthz").status_code == 200
        with pytest.raises(httpx.HTTPError):  # plain HTTP to the HTTPS port
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    events = _audit(tmp_path)
    assert sum(e["event"] == "authentication-failed" for e in events) == 3
    text = (tmp_path / "spool" / "audit.jsonl").read_text() + caplog.text
    assert "s3cret-key-123" not in text and not no_identifiers(text)


def test_listening_beyond_loopback_in_clear_is_refused_unless_asked_for(tmp_path, model, pki, monkeypatch):
    from serving.gateway.settings import ConfigError, load_gateway_settings

    base = {"spool": str(tmp_path / "s"), "routes": [{"model": str(model)}], "stow": {"enabled": False}}
    with pytest.raises(ConfigError, match="beyond loopback without TLS"):
        load_gateway_settings(None, {**base, "host": "0.0.0.0"})
    assert load_gateway_settings(None, {**base, "host": "0.0.0.0", "insecure_plain_network": True}).host == "0.0.0.0"
    tls = {"cert": str(pki["gateway"]), "key": str(pki["gateway"])}
    assert load_gateway_settings(None, {**base, "host": "0.0.0.0", "tls": tls}).tls.cert
    monkeypatch.delenv("REMEDIS_GATEWAY_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="needs credentials"):
        load_gateway_settings(None, {**base, "tls": tls, "stow": {"enabled": True, "host": "0.0.0.0"}})
    with pytest.raises(ConfigError, match="tls.ca"):
        load_gateway_settings(None, {**base, "tls": {**tls, "require_client_cert": True}})
    with pytest.raises(ConfigError, match="tls.cert: .* is not a file"):
        load_gateway_settings(None, {**base, "tls": {"cert": str(tmp_path / "missing.pem")}})


def test_the_audit_command_prints_events_since(tmp_path, capsys):
    import datetime as dt

    from serving.gateway.audit import AuditTrail, parse_since
    from serving.gateway.cli import main

    trail = AuditTrail(tmp_path / "spool" / "audit.jsonl")
    trail.record("configuration-loaded", detail="test")
    trail.record("authentication-failed", 4, user="anonymous", address="127.0.0.1")
    trail.close()
    with open(tmp_path / "spool" / "audit.jsonl", "a") as fh:  # an old line and a damaged one
        fh.write(json.dumps({"time": "2020-01-01T00:00:00+00:00", "event": "result-sent", "outcome": 0}) + "\n{broken\n")
    args = ["audit", "--set", f"spool={tmp_path / 'spool'}", "--set", "routes=[{model: x}]", "--set", "stow={enabled: false}"]
    assert main(args) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["event"] for x in lines] == ["configuration-loaded", "authentication-failed"]
    assert main(args + ["--since", "3000d", "--event", "result-sent"]) == 0
    assert [json.loads(x)["event"] for x in capsys.readouterr().out.splitlines()] == ["result-sent"]
    assert main(args + ["--since", "yesterday"]) == 2
    assert parse_since("2h", dt.datetime(2026, 1, 1, 12, tzinfo=dt.timezone.utc)).hour == 10
    assert stat.S_IMODE((tmp_path / "spool" / "audit.jsonl").stat().st_mode) == 0o600


def test_audit_lines_also_reach_a_syslog_collector_as_rfc5424(tmp_path):
    import re
    import socket

    from serving.gateway.audit import AuditTrail
    from serving.gateway.settings import ConfigError, load_gateway_settings

    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(10)
    tcp = socket.create_server(("127.0.0.1", 0))
    tcp.settimeout(10)
    pattern = re.compile(r"<(\d+)>1 (\S+) (\S+) remedis-gateway (\d+) (\S+) - (\{.*\})$")

    trail = AuditTrail(tmp_path / "a.jsonl", syslog=f"udp://127.0.0.1:{udp.getsockname()[1]}")
    trail.record("association-rejected", 4, user="MODALITY", address="10.0.0.7", detail="address not allowed")
    m = pattern.match(udp.recv(65536).decode())
    assert m, "not an RFC 5424 message"
    assert int(m.group(1)) == 13 * 8 + 4  # facility log audit, severity warning for a minor failure
    assert m.group(5) == "association-rejected" and json.loads(m.group(6))["address"] == "10.0.0.7"
    assert json.loads(m.group(6)) == json.loads((tmp_path / "a.jsonl").read_text())  # the same line as the file
    trail.close()

    trail = AuditTrail(tmp_path / "b.jsonl", syslog=f"tcp://127.0.0.1:{tcp.getsockname()[1]}")
    trail.record("configuration-loaded")
    trail.record("result-sent", user="PACS")
    conn, _ = tcp.accept()
    conn.settimeout(10)
    stream = b""
    while stream.count(b"remedis-gateway") < 2:
        stream += conn.recv(65536)
    frames = []
    while stream:  # RFC 6587 octet counting: "<length> <message>"
        length, rest = stream.split(b" ", 1)
        frames.append(rest[: int(length)].decode())
        stream = rest[int(length):]
    assert [pattern.match(f).group(5) for f in frames] == ["configuration-loaded", "result-sent"]
    assert int(pattern.match(frames[0]).group(1)) == 13 * 8 + 6
    conn.close()
    tcp.close()
    trail.close()

    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # a collector that is down: the file keeps every line, the copies are counted as dropped
    trail = AuditTrail(tmp_path / "c.jsonl", syslog=f"tcp://127.0.0.1:{port}")
    trail.record("configuration-loaded")
    trail.record("result-failed", 8)
    assert trail.syslog.dropped == 2 and len((tmp_path / "c.jsonl").read_text().splitlines()) == 2
    trail.close()
    udp.close()
    base = {"routes": [{"model": "x"}], "stow": {"enabled": False}, "spool": str(tmp_path / "s")}
    with pytest.raises(ConfigError, match="audit_syslog: 'syslog.example' is not udp://"):
        load_gateway_settings(None, {**base, "audit_syslog": "syslog.example"})


def _https_service(cert: Path):
    """A stand-in inference service over HTTPS on loopback: metadata, and a fixed answer per image."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path.endswith("/metadata"):
                answer = {"model": {"name": "tls-service", "version": "1"}, "class_names": ["contrast", "no_contrast"],
                          "positive_class": "contrast", "weights_sha256": "0" * 64}
            else:
                n = body.count(b'name="images"')
                answer = {"results": [{"index": i, "probabilities": {"contrast": 0.7, "no_contrast": 0.3}, "label": "contrast",
                                       "decision": "argmax", "ood": False, "ood_score": None, "ood_reasons": []} for i in range(n)]}
            data = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert))
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_the_service_over_https_is_verified_and_an_untrusted_one_is_never_used(tmp_path, pki, shared_data):
    from serving.gateway.app import Gateway
    from serving.gateway.inference import InferenceUnavailable

    trusted, rogue = _https_service(pki["gateway"]), _https_service(pki["rogue-pacs"])
    try:
        url = f"https://127.0.0.1:{trusted.server_address[1]}"
        settings = _settings(tmp_path, url, pki, routes=[{"model": url, "modalities": ["CT"]}])
        with Gateway(settings) as gw:
            assoc = _assoc(settings.port, tls=_client_tls(pki))
            assert assoc.send_c_store(study_from(ct_files(shared_data, 1)[0], 1)[0]).Status == 0
            assoc.release()
            _wait(lambda: gw.status()["processed"] == 1, 60, "the instance answered by the HTTPS service")
        bad = f"https://127.0.0.1:{rogue.server_address[1]}"
        with pytest.raises(InferenceUnavailable, match="unreachable"):  # certificate not trusted: no plain fallback
            Gateway(_settings(tmp_path / "b", bad, pki, routes=[{"model": bad, "modalities": ["CT"]}])).start()
    finally:
        trusted.shutdown()
        rogue.shutdown()


def test_dcmtk_echoscu_and_storescu_over_tls_with_a_client_certificate(tmp_path, model, pki, shared_data):
    """dcmtk's own TLS clients (`+tls key cert`, `+cf ca`): accepted with the modality's certificate and an SR made;
    without a certificate (`+tla`) or over plain TCP, refused."""
    import subprocess

    from gateway_support import dcmtk_tool, write_all

    from serving.gateway.app import Gateway

    echoscu, storescu = dcmtk_tool("echoscu"), dcmtk_tool("storescu")
    if not echoscu or not storescu:
        pytest.skip("dcmtk not installed (apt-get install dcmtk)")
    folder = Path(pki["ca"]).parent
    tls = ["+tls", str(folder / "modality.key"), str(folder / "modality.crt"), "+cf", str(pki["ca"])]
    settings = _settings(tmp_path, model, pki)
    paths = write_all(study_from(ct_files(shared_data, 1)[0], 2, size=None), tmp_path / "study")

    def run(tool, *args, files=()):
        return subprocess.run([tool, *args, "-aet", "MODALITY1", "-aec", "REMEDIS", "127.0.0.1", str(settings.port), *files],
                              capture_output=True, text=True, timeout=60)

    with Gateway(settings) as gw:
        assert run(echoscu, *tls).returncode == 0
        stored = run(storescu, *tls, files=[str(p) for p in paths])
        assert stored.returncode == 0, stored.stderr
        _wait(lambda: gw.status()["processed"] == 2, 60, "the instances stored over TLS")
        assert run(echoscu, "+tla", "+cf", str(pki["ca"])).returncode != 0  # no client certificate
        assert run(echoscu).returncode != 0  # plain TCP to the TLS port
    assert len(list((tmp_path / "spool").rglob("sr-*.dcm"))) == 1
