"""The DICOM gateway on loopback, without a PACS: pynetdicom and dicomweb-client as the clients, a
pynetdicom storage SCP as the destination where one is needed. (Against Orthanc and dcmtk:
tests/test_gateway_orthanc.py.)"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import ROOT
from gateway_support import (
    PLANTED,
    ct_files,
    current_sr_results,
    expected_probs,
    free_port,
    make_model,
    no_identifiers,
    sr_results,
    study_from,
    to_bytes,
    write_all,
)

pynetdicom = pytest.importorskip("pynetdicom")


@pytest.fixture(scope="module")
def model(tmp_path_factory, shared_data):
    return make_model(tmp_path_factory.mktemp("gw-model") / "model", ct_files(shared_data, 12))


def _settings(tmp: Path, model: Path, **over):
    from serving.gateway.settings import load_gateway_settings

    base = {"port": free_port(), "spool": str(tmp / "spool"), "quiet_seconds": 0.3, "allowed_aets": ["TESTSCU"],
            "routes": [{"model": str(model), "modalities": ["CT"]}], "stow": {"enabled": True, "port": free_port()},
            "retry": {"initial_s": 0.2, "max_s": 1.0}}
    return load_gateway_settings(None, {**base, **over})


def _assoc(port: int, aet: str = "TESTSCU", contexts=None):
    from pynetdicom import AE, StoragePresentationContexts
    from pynetdicom.sop_class import Verification

    from serving.gateway.send import tcp_nodelay

    tcp_nodelay()  # as dcmtk and Orthanc do: without it every C-STORE waits ~40 ms for a delayed ACK
    ae = AE(ae_title=aet)
    ae.requested_contexts = contexts or (StoragePresentationContexts[:126] + [])
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title="REMEDIS")


def _wait(predicate, timeout=60.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, theirs, ...), from /proc."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            out += [int(child), *_descendants(int(child))]
    return out


def _running(pid: int) -> bool:
    """Is `pid` a live process (not gone, not a zombie waiting to be reaped)?"""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _drained(gw) -> bool:
    """Nothing left to process or send: no instance queued, no result waiting in the outbox."""
    s = gw.status()
    return s["queued"] == 0 and s["results_unsent"] == 0


def test_sr_is_tid1500_reproducible_and_parsed_by_dcmtk(tmp_path, model, shared_data):
    from serving.gateway.inference import LocalInference
    from serving.gateway.report import NOT_FOR_DIAGNOSIS, build_sr, read_results, sr_header

    files = ct_files(shared_data, 2)
    local = LocalInference(model)
    answers = local.predict([f.read_bytes() for f in files])
    src = pydicom.dcmread(files[0], stop_before_pixels=True)
    sr = build_sr([src], answers[:1], local.info)
    again = build_sr([src], answers[:1], local.info)
    assert sr.SOPInstanceUID == again.SOPInstanceUID and sr.SeriesInstanceUID == again.SeriesInstanceUID
    assert sr.StudyInstanceUID == src.StudyInstanceUID and sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert sr.VerificationFlag == "UNVERIFIED" and "not for diagnostic use" in sr.SeriesDescription
    got = read_results(sr)[src.SOPInstanceUID]
    assert got["probabilities"] == pytest.approx(answers[0].probabilities, abs=1e-9)
    assert got["label"] == answers[0].label and got["ood"] == answers[0].ood
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    assert local.info.weights_sha256.encode() in buf.getvalue() and NOT_FOR_DIAGNOSIS.encode() in buf.getvalue()
    # Several images of one study: one measurement group each, each referencing its image.
    other = pydicom.dcmread(files[1], stop_before_pixels=True)
    other.StudyInstanceUID = src.StudyInstanceUID
    both = read_results(build_sr([src, other], answers, local.info))
    assert sorted(both) == sorted([src.SOPInstanceUID, other.SOPInstanceUID])
    # Groups assembled after construction (the fast path) give exactly highdicom's full construction.
    many = study_from(files[0], 4)
    fast, ref = (build_sr(many, answers[:1] * 4, local.info, assemble=a) for a in (True, False))
    assert fast.ContentSequence == ref.ContentSequence and fast.SOPInstanceUID == ref.SOPInstanceUID
    assert fast.CurrentRequestedProcedureEvidenceSequence == ref.CurrentRequestedProcedureEvidenceSequence
    # The gateway's writer (ambiguous VRs corrected once for the tree) gives exactly pydicom's bytes.
    from serving.gateway.dicom_bytes import encode

    for ds in (fast, pydicom.dcmread(files[0]), pydicom.dcmread(files[1], stop_before_pixels=True)):
        plain = io.BytesIO()
        ds.save_as(plain, enforce_file_format=True)
        assert encode(ds) == plain.getvalue()
    # What a series' history keeps of a header (sr_header) makes the same SR as the whole header.
    lean = build_sr([sr_header(ds) for ds in many], answers[:1] * 4, local.info)
    assert len(sr_header(many[0])) < len(many[0]) / 3
    clock = {"ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime", "ContributingEquipmentSequence"}
    assert {e.keyword for e in lean} == {e.keyword for e in fast} and "PatientName" in lean
    assert all(lean[e.tag] == e for e in fast if e.keyword not in clock)
    assert lean.ContributingEquipmentSequence[0] == fast.ContributingEquipmentSequence[0]  # the source's scanner
    # A header without the type 2 patient/study attributes (some converters leave them out) still makes an SR.
    bare = pydicom.dcmread(files[0], stop_before_pixels=True)
    for k in ("PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber", "ReferringPhysicianName"):
        if k in bare:
            delattr(bare, k)
    assert src.SOPInstanceUID in read_results(build_sr([bare], answers[:1], local.info))
    assert "PatientBirthDate" not in bare
    with pytest.raises(ValueError, match="one study"):
        build_sr([src, pydicom.dcmread(files[1], stop_before_pixels=True)], answers, local.info)
    if shutil.which("dsrdump"):
        path = tmp_path / "sr.dcm"
        sr.save_as(path, enforce_file_format=True)
        dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60)
        assert dump.returncode == 0 and "Probability of contrast" in dump.stdout, dump.stderr


def test_the_accepted_contexts_copy_per_association_with_their_own_lists():
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
    from pynetdicom.presentation import negotiate_as_acceptor

    from serving.gateway.contexts import shared_syntax_contexts

    ae = AE()
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    plain = ae.supported_contexts
    shared = shared_syntax_contexts(plain)
    copied = copy.deepcopy(shared)  # what pynetdicom does for each association
    fields = lambda c: (c.abstract_syntax, c.transfer_syntax, c.context_id, c.scu_role, c.scp_role, c.as_scu, c.as_scp)  # noqa: E731
    assert [fields(c) for c in copied] == [fields(c) for c in plain]
    copied[0].add_transfer_syntax("1.2.840.10008.1.2.4.999")
    assert "1.2.840.10008.1.2.4.999" not in shared[0].transfer_syntax + plain[0].transfer_syntax
    requestor = AE()
    for i, cx in enumerate(AllStoragePresentationContexts[:40]):
        requestor.add_requested_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES[i % 5:i % 5 + 2])
    requested = requestor.requested_contexts
    for k, cx in enumerate(requested):
        cx.context_id = 2 * k + 1
    got = [fields(c) + (c.result,) for c in negotiate_as_acceptor(requested, copy.deepcopy(shared))[0]]
    want = [fields(c) + (c.result,) for c in negotiate_as_acceptor(requested, copy.deepcopy(plain))[0]]
    assert got == want and len(got) == 40


def test_local_inference_equals_the_offline_model(model, shared_data):
    from remedis.adapt.model import AdaptedModel
    from serving.gateway.inference import LocalInference

    files = ct_files(shared_data, 4)
    got = LocalInference(model).predict([f.read_bytes() for f in files])
    offline = AdaptedModel.load(model).predict_files(files)["probs"]
    np.testing.assert_allclose([[g.probabilities[c] for c in ("no_contrast", "contrast")] for g in got], offline, atol=1e-5)
    bad = LocalInference(model).predict([b"not a dicom file at all"])
    assert bad[0].status == 415 or 400 <= bad[0].status < 500


def test_500_instances_in_one_and_in_parallel_associations_all_get_results(tmp_path, model, shared_data):
    from serving.gateway.app import Gateway

    source = ct_files(shared_data, 1)[0]
    one = study_from(source, 250, series=5)
    parallel = [study_from(source, 50, series=1) for _ in range(5)]
    with Gateway(_settings(tmp_path, model)) as gw:
        assert len(gw._workers.pids()) == gw.settings.workers == 2  # every batch worker up before any traffic
        assoc = _assoc(gw.settings.port)
        assert assoc.is_established
        statuses = [assoc.send_c_store(ds).Status for ds in one]
        assoc.release()

        def send(study):
            a = _assoc(gw.settings.port)
            try:
                return [a.send_c_store(ds).Status for ds in study]
            finally:
                a.release()

        with ThreadPoolExecutor(5) as pool:
            statuses += [s for r in pool.map(send, parallel) for s in r]
        assert statuses == [0] * 500
        _wait(lambda: gw.status()["processed"] == 500 and gw.status()["results_unsent"] == 0, 240, "500 results")
        refs = sr_results(Path(gw.settings.spool) / "results")
    sent = [ds.SOPInstanceUID for ds in one] + [ds.SOPInstanceUID for s in parallel for ds in s]
    assert sorted(refs) == sorted(sent) and all(len(v) == 1 for v in refs.values())
    # Identical pixels give identical answers, through every batch.
    assert len({round(v[0]["probabilities"]["contrast"], 6) for v in refs.values()}) == 1


def test_bad_input_is_refused_or_skipped_and_the_gateway_keeps_serving(tmp_path, model, shared_data):
    from pydicom.encaps import encapsulate
    from pydicom.uid import generate_uid
    from pynetdicom import build_context

    from serving.gateway.app import Gateway

    study = study_from(ct_files(shared_data, 1)[0], 3)
    no_pixels = copy.deepcopy(study[0])
    del no_pixels.PixelData
    mpeg = copy.deepcopy(study[1])  # a transfer syntax with no decoder here (MPEG-2 video)
    mpeg.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    mpeg.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
    mpeg["PixelData"].VR = "OB"
    mpeg.SOPInstanceUID = generate_uid()
    pdf = pydicom.Dataset()
    pdf.file_meta = pydicom.dataset.FileMetaDataset()
    pdf.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    pdf.SOPClassUID, pdf.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.104.1", generate_uid()
    pdf.StudyInstanceUID, pdf.SeriesInstanceUID, pdf.Modality = study[0].StudyInstanceUID, generate_uid(), "DOC"
    pdf.EncapsulatedDocument, pdf.MIMETypeOfEncapsulatedDocument = b"%PDF-1.4 planted", "application/pdf"
    pdf.PatientName = PLANTED["PatientName"]
    with Gateway(_settings(tmp_path, model)) as gw:
        contexts = [build_context(study[0].SOPClassUID), build_context(mpeg.SOPClassUID, "1.2.840.10008.1.2.4.100"),
                    build_context(pdf.SOPClassUID)]
        assoc = _assoc(gw.settings.port, contexts=contexts)
        assert assoc.is_established
        assert assoc.send_c_store(no_pixels).Status == 0xA900
        mpeg_path = tmp_path / "mpeg.dcm"
        mpeg.save_as(mpeg_path, enforce_file_format=True)
        assert assoc.send_c_store(mpeg_path).Status == 0x0000  # video: acknowledged and kept, not processed
        assert assoc.send_c_store(pdf).Status == 0x0000  # taken, never processed
        assert assoc.send_c_store(study[2]).Status == 0x0000
        assoc.release()
        # Not on the allow-list: refused at association.
        rejected = _assoc(gw.settings.port, aet="INTRUDER")
        assert rejected.is_rejected
        # STOW-RS: a truncated file and a non-DICOM part are refused by part, the good one stored.
        from dicomweb_client.api import DICOMwebClient

        buf = io.BytesIO()
        study[1].save_as(buf, enforce_file_format=True)
        import requests

        boundary = "remedis-test-boundary"
        parts = [buf.getvalue()[: len(buf.getvalue()) // 3], b"garbage", buf.getvalue()]
        body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n" for p in parts)
        body += f"--{boundary}--\r\n".encode()
        url = f"http://127.0.0.1:{gw.settings.stow.port}"
        r = requests.post(f"{url}/dicom-web/studies", data=body, timeout=30,
                          headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
        assert r.status_code == 202, r.text
        answer = r.json()
        assert len(answer["00081199"]["Value"]) == 1 and len(answer["00081198"]["Value"]) == 2
        r = requests.post(f"{url}/dicom-web/studies", data=b"{}", headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 415
        # Still serving: an echo and a good instance through dicomweb-client.
        echo = _assoc(gw.settings.port)
        assert echo.send_c_echo().Status == 0
        echo.release()
        extra = study_from(ct_files(shared_data, 1)[0], 1)[0]
        assert "FailedSOPSequence" not in DICOMwebClient(url=f"{url}/dicom-web").store_instances([extra])
        _wait(lambda: gw.status()["processed"] == 3, 60, "the good instances processed")
        status = gw.status()
        assert status["refused"] >= 3 and status["ignored"] == 1 and status["failed"] == 0 and status["not_processed"] == 1
        assert not no_identifiers(json.dumps(status))


def test_results_wait_while_the_destination_is_down(tmp_path, model, shared_data):
    """C-STORE SCU to a destination that is down: retried with back-off, delivered once it listens,
    each SR exactly once."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    from serving.gateway.app import Gateway

    dest_port = free_port()
    received: list[str] = []
    lock = threading.Lock()

    def on_store(event):
        with lock:
            received.append((event.dataset.SOPClassUID, event.dataset.SOPInstanceUID))
        return 0

    settings = _settings(tmp_path, model, destination={"kind": "dimse", "port": dest_port, "ae_title": "DEST"},
                         stow={"enabled": False}, secondary_capture=True)
    studies = [study_from(ct_files(shared_data, 1)[0], 2, planted=False) for _ in range(2)]
    with Gateway(settings) as gw:
        assert all(gw.accept(to_bytes(ds)) == 0 for study in studies for ds in study)
        # both studies processed (nothing queued) and their deliveries failing: every result waits in the outbox
        _wait(lambda: gw.status()["queued"] == 0 and gw.status()["processed"] == 4 and gw.status()["send_errors"] >= 4,
              30, "both studies processed and failed deliveries")
        assert gw.status()["results_unsent"] == 6  # 2 SRs + 4 captures
        ae = AE(ae_title="DEST")
        ae.supported_contexts = AllStoragePresentationContexts
        server = ae.start_server(("127.0.0.1", dest_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        try:
            # drained: nothing queued, nothing in the outbox; a duplicate could only come from there, so the
            # counts below are final
            _wait(lambda: _drained(gw), 30, "delivery")
        finally:
            server.shutdown()
        # Per study: one SR, and one Secondary Capture per image (the result burned in); each exactly once.
        assert len(received) == 6 and len(set(received)) == 6 and gw.status()["sent"] == 6
        classes = sorted(str(c) for c, _ in received)
        assert classes == ["1.2.840.10008.5.1.4.1.1.7"] * 4 + ["1.2.840.10008.5.1.4.1.1.88.34"] * 2
        # The loop guard: a capture sent back to the gateway is acknowledged and never processed.
        sc = next(p for p in (Path(gw.settings.spool) / "results").rglob("sc-*.dcm"))
        before = gw.status()
        assert gw.accept(sc.read_bytes()) == 0
        assert gw.status()["ignored"] == before["ignored"] + 1 and gw.status()["received"] == before["received"]


def test_a_registered_result_writer_is_written_and_kept_beside_the_delivered_sr(tmp_path, model, shared_data):
    """A new kind of result is one registered writer: the gateway writes it for every answered study, the
    sender delivers the DICOM results and keeps the media types the destination does not take."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    from serving.gateway.app import Gateway
    from serving.gateway.writers import WRITERS, Result, register_writer

    @register_writer
    class AnswersJson:
        name, media_type, suffix = "answers_json", "application/json", ".json"

        def enabled(self, settings):
            return True

        def write(self, study):
            body = {ds.SOPInstanceUID: a.to_dict() for ds, a in study.pairs}
            return [Result(f"answers-{study.route}.json", self.media_type, json.dumps(body).encode())]

    received: list[str] = []
    dest_port = free_port()
    ae = AE(ae_title="DEST")
    ae.supported_contexts = AllStoragePresentationContexts
    server = ae.start_server(("127.0.0.1", dest_port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, lambda e: received.append(e.dataset.SOPClassUID) or 0)])
    study = study_from(ct_files(shared_data, 1)[0], 2, planted=False)
    try:
        # workers 0: a writer registered at run time exists in this process only (a writer module imported by
        # serving/gateway/writers/__init__.py, as the docs say to add one, is registered in the workers too)
        settings = _settings(tmp_path, model, destination={"kind": "dimse", "port": dest_port, "ae_title": "DEST"},
                             stow={"enabled": False}, workers=0)
        with Gateway(settings) as gw:
            assert all(gw.accept(to_bytes(ds)) == 0 for ds in study)
            _wait(lambda: gw.status()["processed"] == 2 and _drained(gw), 60, "the study processed and delivered")
            assert gw.status()["sent"] == 1  # the SR; the JSON is not a DICOM result
    finally:
        server.shutdown()
        WRITERS.pop("answers_json")
    assert [str(c) for c in received] == ["1.2.840.10008.5.1.4.1.1.88.34"]
    kept = list((tmp_path / "spool" / "results").rglob("answers-0.json"))
    assert len(kept) == 1
    answers = json.loads(kept[0].read_text())
    assert set(answers) == {ds.SOPInstanceUID for ds in study}
    assert all(set(a) == {"probabilities", "label", "decision", "ood", "ood_score", "ood_reasons"} for a in answers.values())


def _serve(config: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "serving.gateway.cli", "serve", "--config", str(config)], cwd=ROOT,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def test_sigkill_mid_study_then_restart_every_instance_gets_exactly_one_sr(tmp_path, model, shared_data):
    import yaml

    port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "port": port, "spool": str(tmp_path / "spool"), "quiet_seconds": 1.0, "allowed_aets": ["TESTSCU"],
        "routes": [{"model": str(model), "modalities": ["CT"]}], "stow": {"enabled": False}}))
    log = tmp_path / "gateway.log"
    study = study_from(ct_files(shared_data, 1)[0], 12, series=2)
    paths = write_all(study, tmp_path / "study")

    def up():
        a = None
        for _ in range(300):
            a = _assoc(port)
            if a.is_established:
                return a
            time.sleep(0.1)
        raise AssertionError("gateway did not come up:\n" + log.read_text()[-3000:])

    proc = _serve(config, log)
    try:
        assoc = up()
        assert [assoc.send_c_store(pydicom.dcmread(p)).Status for p in paths[:7]] == [0] * 7
        started = _descendants(proc.pid)
        assert len(started) >= 3, started  # the fork server and the 2 batch workers (and a resource tracker)
        os.kill(proc.pid, signal.SIGKILL)  # mid-study, the gateway alone (as the OOM killer would): nothing flushed
        proc.wait(timeout=30)
        # Its workers notice and end (they would otherwise wait on their task queue forever, models loaded).
        _wait(lambda: not [p for p in started if _running(p)], 60, "the gateway's workers and fork server to end")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    proc = _serve(config, log)
    try:
        assoc = up()
        assert [assoc.send_c_store(pydicom.dcmread(p)).Status for p in paths[7:]] == [0] * 5
        assoc.release()
        spool = tmp_path / "spool"

        def done():
            refs = current_sr_results(spool / "results")
            return len(refs) == 12 and not list((spool / "work").iterdir()) and not list((spool / "incoming").iterdir())

        _wait(done, 120, "12 referenced instances")
        # A series that kept arriving after the restart gets an SR covering all of it that supersedes the first
        # one: the SRs in force reference each instance exactly once.
        refs = current_sr_results(spool / "results")
        assert sorted(refs) == sorted(ds.SOPInstanceUID for ds in study)
        assert all(len(v) == 1 for v in refs.values())
        expected = expected_probs(model, paths[:1])[0]
        assert refs[study[0].SOPInstanceUID][0]["probabilities"]["contrast"] == pytest.approx(expected[1], abs=1e-5)
        status = subprocess.run([sys.executable, "-m", "serving.gateway.cli", "status", "--config", str(config)],
                                capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert status.returncode == 0 and json.loads(status.stdout)["received"] == 12
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    text = log.read_text() + status.stdout
    assert not no_identifiers(text), "a planted identifier reached the log or status"
    assert "Traceback" not in text


def test_in_process_route_logs_every_answer_without_identifiers(tmp_path, model, shared_data, monkeypatch):
    """`monitor` in the gateway config: each answer of a route running the model in process goes to the prediction
    log, keyed by the HMAC of its SOP Instance UID, with the gateway as the caller and no patient identifier."""
    from remedis.monitor.keys import instance_key
    from remedis.monitor.store import PredictionStore
    from serving.gateway.app import Gateway

    secret = "gateway-log-secret-0123456789"
    monkeypatch.setenv("REMEDIS_MONITOR_SECRET", secret)
    db = tmp_path / "log.db"
    study = study_from(ct_files(shared_data, 1)[0], 3)  # planted identifiers in every header
    with Gateway(_settings(tmp_path, model, monitor={"store": f"sqlite:///{db}", "embeddings": True})) as gw:
        assoc = _assoc(gw.settings.port)
        assert all(assoc.send_c_store(ds).Status == 0x0000 for ds in study)
        assoc.release()
        store = PredictionStore(f"sqlite:///{db}")
        _wait(lambda: store.count() >= 3, what="three logged answers")
    rows = list(store.rows())
    store.close()
    assert sorted(r["key"] for r in rows) == sorted(instance_key(ds.SOPInstanceUID, secret.encode()) for ds in study)
    from serving.gateway.inference import LocalInference

    info = LocalInference(model).info
    for r in rows:
        assert r["caller"] == "gateway REMEDIS" and r["modality"] == "CT" and r["role"] == "primary"
        assert r["embedding"] is not None and r["weights_sha256"] == info.weights_sha256
        assert r["positive_class"] == info.class_names[info.positive_index]
    expected = expected_probs(model, write_all(study, tmp_path / "files"))
    got = {r["key"]: r["probabilities"]["contrast"] for r in rows}
    want = {instance_key(ds.SOPInstanceUID, secret.encode()): float(p[info.class_names.index("contrast")])
            for ds, p in zip(study, expected)}
    assert got == pytest.approx(want, abs=1e-5)
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("log.db*"))
    assert not [v for v in PLANTED.values() if v.split("^")[0].encode() in raw]
