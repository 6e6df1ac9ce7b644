"""The gateway against a real PACS (Orthanc) and dcmtk, run by tests/test_gateway_orthanc.py inside a
private network namespace (`unshare --net`), where only loopback exists: Orthanc 1.10 binds every
interface and has no option to bind loopback only.

Real CT DICOMs go into Orthanc over its REST API; Orthanc pushes them to the gateway (C-STORE); the SR
comes back into the same study in Orthanc, found with QIDO-RS and read with WADO-RS (dicomweb-client);
its probabilities equal the service code's answer for that file, and dcmtk's dsrdump parses it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gateway_support import (  # noqa: E402
    ct_files,
    dcmtk_tool,
    expected_probs,
    free_port,
    make_model,
    no_identifiers,
    study_from,
    to_bytes,
    write_all,
)

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


class Orthanc:
    def __init__(self, root: Path, gateway_port: int, tls: dict | None = None):
        """`tls`: {"key", "crt", "ca"} files for DICOM TLS (Orthanc's certificate and key, the trusted CA)."""
        self.root = root
        self.http, self.dicom = free_port(), free_port()
        root.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "remedis-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
            "HttpPort": self.http, "DicomPort": self.dicom, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "Plugins": [PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "DicomModalities": {"gw": ["REMEDIS", "127.0.0.1", gateway_port]}, "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False}
        if tls:
            config.update({"DicomTlsEnabled": True, "DicomTlsCertificate": str(tls["crt"]), "DicomTlsPrivateKey": str(tls["key"]),
                           "DicomTlsTrustedCertificates": str(tls["ca"]), "DicomTlsRemoteCertificateRequired": True,
                           "DicomModalities": {"gw": {"AET": "REMEDIS", "Host": "127.0.0.1", "Port": gateway_port,
                                                      "UseDicomTls": True}}})
        (root / "orthanc.json").write_text(json.dumps(config))
        self.url = f"http://127.0.0.1:{self.http}"
        self.proc = None

    def start(self) -> "Orthanc":
        self.log = open(self.root / "orthanc.log", "ab")
        self.proc = subprocess.Popen(["Orthanc", str(self.root / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT)
        for _ in range(200):
            try:
                if httpx.get(f"{self.url}/system", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("Orthanc did not start:\n" + (self.root / "orthanc.log").read_text()[-3000:])

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None

    def upload(self, path: Path) -> dict:
        r = httpx.post(f"{self.url}/instances", content=path.read_bytes(), timeout=30)
        r.raise_for_status()
        return r.json()

    def dicomweb(self):
        from dicomweb_client.api import DICOMwebClient

        return DICOMwebClient(url=f"{self.url}/dicom-web")

    def srs(self, study_uid: str) -> list[pydicom.Dataset]:
        """Every SR instance in the study, through QIDO-RS (series with Modality SR) and WADO-RS."""
        client = self.dicomweb()
        out = []
        for s in client.search_for_series(study_uid, search_filters={"Modality": "SR"}):
            series = s["0020000E"]["Value"][0]
            for inst in client.search_for_instances(study_uid, series):
                out.append(client.retrieve_instance(study_uid, series, inst["00080018"]["Value"][0]))
        return out


def wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def drained(gw) -> bool:
    """Nothing left to process or send: no instance queued, no result waiting in the outbox."""
    s = gw.status()
    return s["queued"] == 0 and s["results_unsent"] == 0


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from serving.gateway.app import Gateway
    from serving.gateway.settings import load_gateway_settings

    tmp = tmp_path_factory.mktemp("orthanc")
    model = make_model(tmp / "model", ct_files(SHARED, 12))
    gw_port = free_port()
    orthanc = Orthanc(tmp / "orthanc", gw_port).start()
    settings = load_gateway_settings(None, {
        "port": gw_port, "spool": str(tmp / "spool"), "quiet_seconds": 0.5, "allowed_aets": ["ORTHANC", "STORESCU"],
        "routes": [{"model": str(model), "modalities": ["CT"]}],
        "destination": {"kind": "dimse", "host": "127.0.0.1", "port": orthanc.dicom, "ae_title": "ORTHANC"},
        "retry": {"initial_s": 0.5, "max_s": 2}, "stow": {"enabled": True, "port": free_port()}})
    gateway = Gateway(settings).start()
    try:
        yield {"tmp": tmp, "model": model, "orthanc": orthanc, "gateway": gateway, "port": gw_port}
    finally:
        gateway.stop()
        orthanc.stop()


def test_orthanc_pushes_ct_and_finds_the_sr_in_the_same_study(env):
    orthanc, files = env["orthanc"], ct_files(SHARED, 3)
    ids = [orthanc.upload(f)["ID"] for f in files]
    r = httpx.post(f"{orthanc.url}/modalities/gw/store", json={"Resources": ids, "Synchronous": True}, timeout=120)
    assert r.status_code == 200, r.text
    expected = expected_probs(env["model"], files)
    for f, p in zip(files, expected):
        src = pydicom.dcmread(f, stop_before_pixels=True)
        srs = wait_for(lambda: env["orthanc"].srs(src.StudyInstanceUID), what="the SR in Orthanc")
        assert len(srs) == 1
        sr = srs[0]
        assert sr.StudyInstanceUID == src.StudyInstanceUID and sr.PatientID == src.PatientID
        from serving.gateway.report import read_results

        results = read_results(sr)
        assert list(results) == [src.SOPInstanceUID]  # references exactly the source instance
        got = results[src.SOPInstanceUID]["probabilities"]
        np.testing.assert_allclose([got["no_contrast"], got["contrast"]], p, atol=1e-5)
        out = env["tmp"] / f"{src.SOPInstanceUID}.sr.dcm"
        sr.save_as(out)
        dump = subprocess.run([dcmtk_tool("dsrdump"), str(out)], capture_output=True, text=True, timeout=60)
        assert dump.returncode == 0 and "Imaging Measurement Report" in dump.stdout, dump.stderr


@pytest.mark.skipif(dcmtk_tool("storescu") is None, reason="dcmtk not installed")
def test_storescu_into_the_gateway_and_an_sr_sent_back_is_skipped(env):
    study = study_from(ct_files(SHARED, 1)[0], 4)
    paths = write_all(study, env["tmp"] / "storescu")
    before = env["gateway"].status()
    proc = subprocess.run([dcmtk_tool("storescu"), "-aet", "STORESCU", "-aec", "REMEDIS", "127.0.0.1", str(env["port"]), *map(str, paths)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    srs = wait_for(lambda: env["orthanc"].srs(study[0].StudyInstanceUID), what="the storescu study's SR")
    from serving.gateway.report import read_results

    assert sorted(read_results(srs[0])) == sorted(ds.SOPInstanceUID for ds in study)
    # The loop guard: the SR itself sent to the gateway (dcmtk proposes SR classes only with -R) is taken
    # and never processed.
    sr_path = env["tmp"] / "loop.sr.dcm"
    srs[0].save_as(sr_path)
    proc = subprocess.run([dcmtk_tool("storescu"), "-R", "-aet", "STORESCU", "-aec", "REMEDIS", "127.0.0.1", str(env["port"]),
                           str(sr_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: env["gateway"].status()["ignored"] > before["ignored"], what="the SR to be skipped")
    wait_for(lambda: drained(env["gateway"]), what="the gateway to be idle")  # a second SR could only come from there
    assert len(env["orthanc"].srs(study[0].StudyInstanceUID)) == 1
    # A calling AE title not on the allow-list is refused at association.
    proc = subprocess.run([dcmtk_tool("storescu"), "-aet", "INTRUDER", "-aec", "REMEDIS", "127.0.0.1", str(env["port"]), str(paths[0])],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "reject" in (proc.stdout + proc.stderr).lower()


def test_stow_in_and_stow_out_to_orthanc(env, tmp_path):
    """DICOMweb both ways: STOW-RS into the gateway, results delivered by STOW-RS into Orthanc."""
    from dicomweb_client.api import DICOMwebClient

    from serving.gateway.app import Gateway
    from serving.gateway.settings import load_gateway_settings

    port, http = free_port(), free_port()
    settings = load_gateway_settings(None, {
        "port": port, "spool": str(tmp_path / "spool"), "quiet_seconds": 0.3,
        "routes": [{"model": str(env["model"]), "modalities": ["CT"]}],
        "destination": {"kind": "stow", "url": f"{env['orthanc'].url}/dicom-web"}, "stow": {"port": http}})
    with Gateway(settings) as gw:
        study = study_from(ct_files(SHARED, 2)[1], 3)
        answer = DICOMwebClient(url=f"http://127.0.0.1:{http}/dicom-web").store_instances(study)
        assert len(answer.ReferencedSOPSequence) == 3 and "FailedSOPSequence" not in answer
        srs = wait_for(lambda: env["orthanc"].srs(study[0].StudyInstanceUID), what="the STOW-RS study's SR")
        assert len(srs) == 1
        wait_for(lambda: gw.status()["sent"] >= 1, what="the sent counter")
        status = httpx.get(f"http://127.0.0.1:{http}/status").json()
        assert status["received"] == 3 and status["processed"] == 3 and not no_identifiers(json.dumps(status))


def test_results_wait_for_a_pacs_that_is_down_and_arrive_once(env, tmp_path):
    """The destination PACS is down when results are ready: retried with back-off, delivered when it comes
    up, none lost, none duplicated."""
    from serving.gateway.app import Gateway
    from serving.gateway.settings import load_gateway_settings

    pacs = Orthanc(tmp_path / "pacs2", free_port())  # configured, not started yet
    settings = load_gateway_settings(None, {
        "port": free_port(), "spool": str(tmp_path / "spool"), "quiet_seconds": 0.2,
        "routes": [{"model": str(env["model"]), "modalities": ["CT"]}],
        "destination": {"kind": "dimse", "port": pacs.dicom, "ae_title": "ORTHANC"},
        "retry": {"initial_s": 0.3, "max_s": 1.0}, "stow": {"enabled": False}})
    studies = [study_from(ct_files(SHARED, 1)[0], 2, planted=False) for _ in range(3)]
    with Gateway(settings) as gw:
        assert all(gw.accept(to_bytes(ds)) == 0 for study in studies for ds in study)
        wait_for(lambda: gw.status()["send_errors"] >= 3, what="failed deliveries")
        assert gw.status()["results_unsent"] == 3 and gw.status()["sent"] == 0
        pacs.start()
        try:
            # drained: nothing queued, nothing in the outbox; a duplicate could only come from there
            wait_for(lambda: drained(gw), timeout=60, what="delivery after the PACS came up")
            for study in studies:
                assert len(pacs.srs(study[0].StudyInstanceUID)) == 1
            stats = httpx.get(f"{pacs.url}/statistics").json()
            assert stats["CountInstances"] == 3  # the three SRs, nothing twice
            assert gw.status()["sent"] == 3
        finally:
            pacs.stop()


def test_orthanc_over_dicom_tls_both_ways(tmp_path):
    """Orthanc with DICOM TLS (its certificate trusted by the gateway, the gateway's by it, both required) pushes a
    study to the gateway and receives the SR over TLS."""
    trustme = pytest.importorskip("trustme")
    from serving.gateway.app import Gateway
    from serving.gateway.settings import load_gateway_settings

    ca = trustme.CA()
    files = {"ca": tmp_path / "ca.pem"}
    ca.cert_pem.write_to_path(files["ca"])
    for name in ("orthanc", "gateway"):
        cert = ca.issue_cert("127.0.0.1", common_name=name)
        for part, blob in (("key", cert.private_key_pem), ("crt", cert.cert_chain_pems[0])):
            files[f"{name}.{part}"] = tmp_path / f"{name}.{part}"
            blob.write_to_path(files[f"{name}.{part}"])
    gw_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", gw_port, tls={"key": files["orthanc.key"], "crt": files["orthanc.crt"],
                                                          "ca": files["ca"]}).start()
    settings = load_gateway_settings(None, {
        "port": gw_port, "spool": str(tmp_path / "spool"), "quiet_seconds": 0.5,
        "routes": [{"model": str(make_model(tmp_path / "model", ct_files(SHARED, 12))), "modalities": ["CT"]}],
        "tls": {"cert": str(files["gateway.crt"]), "key": str(files["gateway.key"]), "ca": str(files["ca"]),
                "require_client_cert": True},
        "callers": [{"ae_title": "ORTHANC", "hosts": ["127.0.0.1"], "subject_cn": "orthanc"}],
        "destination": {"kind": "dimse", "host": "127.0.0.1", "port": orthanc.dicom, "ae_title": "ORTHANC", "tls": True},
        "retry": {"initial_s": 0.5, "max_s": 2}, "stow": {"enabled": False}})
    try:
        with Gateway(settings) as gw:
            f = ct_files(SHARED, 1)[0]
            ident = orthanc.upload(f)["ID"]
            r = httpx.post(f"{orthanc.url}/modalities/gw/store", json={"Resources": [ident], "Synchronous": True}, timeout=120)
            assert r.status_code == 200, r.text
            src = pydicom.dcmread(f, stop_before_pixels=True)
            srs = wait_for(lambda: orthanc.srs(src.StudyInstanceUID), what="the SR in Orthanc over TLS")
            # Orthanc shows the SR as soon as it stored it; the gateway counts it once the C-STORE was answered
            wait_for(lambda: gw.status()["sent"] == 1, what="the SR counted as sent")
            assert len(srs) == 1
        events = [json.loads(x) for x in (tmp_path / "spool" / "audit.jsonl").read_text().splitlines()]
        accepted = [e for e in events if e["event"] == "association-accepted"]
        assert accepted and "client certificate orthanc" in accepted[0]["detail"]
        assert any(e["event"] == "result-sent" and "over TLS" in e["detail"] for e in events)
    finally:
        orthanc.stop()
