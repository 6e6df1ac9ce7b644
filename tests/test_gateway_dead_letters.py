"""Nothing blocks a gateway result forever (issue 30): header values outside the standard's defined terms
still give an SR, a batch the service rejects as a client error goes to failed/ in one try, a batch that keeps
failing goes there after `retry.max_attempts`, and the SR's finding is what the model decided."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
from gateway_support import ct_files, free_port, make_model, sr_results, study_from, to_bytes, wait_until

pytest.importorskip("pynetdicom")


@pytest.fixture(scope="module")
def model(tmp_path_factory, shared_data):
    return make_model(tmp_path_factory.mktemp("gw-dead") / "model", ct_files(shared_data, 12))


def _settings(tmp: Path, model: str, **over):
    from serving.gateway.settings import load_gateway_settings

    base = {"port": free_port(), "spool": str(tmp / "spool"), "quiet_seconds": 0.2, "allowed_aets": ["TESTSCU"],
            "routes": [{"model": model, "modalities": ["CT"]}], "stow": {"enabled": False},
            "retry": {"initial_s": 0.1, "max_s": 0.2, "max_attempts": 2}}
    return load_gateway_settings(None, {**base, **over})


_wait = wait_until  # poll with a deadline (tests/gateway_support.py)


def test_odd_headers_give_an_sr_whose_finding_is_the_decision(tmp_path, model, shared_data):
    from serving.gateway.app import Gateway
    from serving.gateway.report import CODE_NOT_VALID, build_sr, read_results

    study = study_from(ct_files(shared_data, 1)[0], 2, planted=False, size=None)  # full slices: in distribution
    for ds in study:
        ds.PatientSex, ds.PatientBirthDate, ds.StudyTime = "U", "19700000", "250000"  # all outside the standard
    with Gateway(_settings(tmp_path, str(model), uid_root="1.2.826.0.1.3680043.10.999.")) as gw:
        assert all(gw.accept(to_bytes(ds)) == 0 for ds in study)
        _wait(lambda: gw.status()["processed"] == 2 and gw.status()["queued"] == 0, 60, "the study processed")
        status = gw.status()
    assert status["failed"] == 0 and status["sanitised_values"] == 6
    results = sr_results(Path(tmp_path / "spool"))
    assert sorted(results) == sorted(ds.SOPInstanceUID for ds in study)
    srs = [pydicom.dcmread(p) for p in Path(tmp_path / "spool").rglob("sr-*.dcm")]
    assert len(srs) == 1 and srs[0].PatientSex == "" and srs[0].PatientBirthDate == ""
    assert srs[0].SOPInstanceUID.startswith("1.2.826.0.1.3680043.10.999.")  # the organisation's uid_root
    from serving.gateway.settings import ConfigError

    with pytest.raises(ConfigError, match="uid_root"):
        _settings(tmp_path, str(model), uid_root="1.2.x")
    assert srs[0].CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99REMEDIS"
    for (r,) in results.values():
        assert r["ood"] is False and r["valid"] and r["finding"] == r["label"]  # the decided class, not the positive one
    # An OOD image: the finding says the result is not valid, no decision is stated, the probabilities stay.
    from serving.answer import Answer
    from serving.gateway.inference import LocalInference

    local = LocalInference(model)
    answer = local.predict([to_bytes(study[0])])[0]
    flagged = Answer.from_dict({**answer.to_dict(), "ood": True, "ood_reasons": ["modality MR, model trained on CT"]})
    got = read_results(build_sr([study[0]], [flagged], local.info))[study[0].SOPInstanceUID]
    assert got["finding"] == CODE_NOT_VALID.meaning and not got["valid"] and got["label"] is None
    assert got["ood"] is True and got["probabilities"] == pytest.approx(answer.probabilities)


class _Service(BaseHTTPRequestHandler):
    """A stand-in for the inference service on loopback: its metadata, then a fixed answer to predictions."""

    mode = "413"
    calls = 0

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path.endswith("/metadata"):
            body = {"model": {"name": "stand-in", "version": "1"}, "class_names": ["contrast", "no_contrast"],
                    "positive_class": "contrast", "weights_sha256": "0" * 64}
            code = 200
        else:
            type(self).calls += 1
            code, body = (413, {"error": "too large"}) if self.mode == "413" else (200, {"unexpected": True})
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.mark.parametrize("mode, calls", [("413", 1), ("broken", 2)])
def test_a_rejected_or_failing_batch_goes_to_failed_with_its_reason(tmp_path, shared_data, mode, calls):
    from serving.gateway.app import Gateway

    handler = type("Handler", (_Service,), {"mode": mode, "calls": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        study = study_from(ct_files(shared_data, 1)[0], 3, planted=False)
        with Gateway(_settings(tmp_path, f"http://127.0.0.1:{server.server_address[1]}")) as gw:
            assert all(gw.accept(to_bytes(ds)) == 0 for ds in study)
            _wait(lambda: gw.status()["failed_batches"] == 1, 60, "the batch given up")
            status = gw.status()
    finally:
        server.shutdown()
    assert status["failed"] == 3 and status["queued"] == 0 and status["processed"] == 0
    assert handler.calls == calls  # 413: one try; an error: retry.max_attempts tries
    reasons = next(Path(tmp_path / "spool" / "failed").rglob("reasons.tsv")).read_text().splitlines()
    assert len(reasons) == 3
    expected = "the service answered 413 (Request Entity Too Large)" if mode == "413" else "processing failed 2 times (KeyError)"
    assert all(line.split("\t")[1] == expected for line in reasons)


def test_a_worker_that_dies_turns_healthz_to_503(tmp_path, model):
    """A worker thread ended by an unexpected error (a bug) makes the gateway unhealthy: /healthz answers 503
    with the reason (no identifier), status says so; until then it answers 200."""
    import httpx

    from serving.gateway.app import Gateway

    settings = _settings(tmp_path, str(model), stow={"enabled": True, "port": free_port()})
    with Gateway(settings) as gw:
        url = f"http://127.0.0.1:{settings.stow.port}/healthz"
        _wait(lambda: httpx.get(url, timeout=5).status_code == 200, 20, "the status server")

        def broken():
            raise RuntimeError("a bug in the spool")

        gw.spool.pending_batches = broken  # the work loop's next pass raises outside its per-batch guard
        assert gw.died.wait(20)
        r = httpx.get(url, timeout=5)
        assert r.status_code == 503 and r.json() == {"ok": False, "reason": "work_loop died (RuntimeError)"}
        assert gw.status()["healthy"] is False


def test_the_disk_watermark_refuses_stores_and_old_results_are_purged(tmp_path, model, shared_data):
    import os

    from serving.gateway.app import Gateway
    from serving.gateway.codes import STATUS_OUT_OF_RESOURCES, Refused

    ds = study_from(ct_files(shared_data, 1)[0], 1, planted=False)[0]
    settings = _settings(tmp_path, str(model), spool_min_free_mb=2**40)  # more than any disk: every store refused
    with Gateway(settings) as gw:
        with pytest.raises(Refused) as refused:
            gw.accept(to_bytes(ds))
        assert refused.value.status == STATUS_OUT_OF_RESOURCES and "MB free" in refused.value.reason
        spool = gw.spool
        old, new = spool.dir("results") / "old-batch", spool.dir("failed") / "new-batch"
        for d in (old, new):
            d.mkdir()
            (d / "sr.dcm").write_bytes(b"x")
        month = time.time() - 31 * 86400
        os.utime(old, (month, month))
        assert spool.purge(30 * 86400) == 1 and not old.exists() and new.exists()


def test_a_video_instance_is_acknowledged_kept_and_counted_not_processed(tmp_path, model, shared_data):
    """Video transfer syntaxes (MPEG-2/4, HEVC) are acknowledged with success and kept, never refused (a refusal
    fails the PACS's forwarding job and it retries forever)."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import MPEG4HP41

    from serving.gateway.app import Gateway

    ds = study_from(ct_files(shared_data, 1)[0], 1, planted=False)[0]
    ds.file_meta.TransferSyntaxUID = MPEG4HP41
    ds.PixelData = encapsulate([b"\x00\x00\x00\x01\x67" + bytes(64)])  # an H.264 stream's first bytes
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    with Gateway(_settings(tmp_path, str(model))) as gw:
        assert gw.accept(to_bytes(ds)) == 0
        status = gw.status()
    assert status["not_processed"] == 1 and status["refused"] == 0 and status["received"] == 0
    kept = list((tmp_path / "spool" / "unprocessed").rglob("*.dcm"))
    assert len(kept) == 1 and pydicom.dcmread(kept[0]).file_meta.TransferSyntaxUID == MPEG4HP41
    assert "video transfer syntax" in next((tmp_path / "spool" / "unprocessed").rglob("*.reason.txt")).read_text()


def test_a_cine_loop_gives_one_sr_that_references_the_frames_read(tmp_path, model, shared_data):
    """A 20-frame instance: `frames.max_frames` of them read (evenly spaced), one SR group whose result is the
    frame with the highest positive probability, referencing the frames read (Referenced Frame Number)."""
    import numpy as np

    from serving.gateway.app import Gateway
    from serving.gateway.frames import split_frames
    from serving.gateway.inference import LocalInference

    ds = study_from(ct_files(shared_data, 1)[0], 1, planted=False, size=None)[0]
    base = ds.pixel_array.astype(np.int32)
    frames = np.stack([np.clip(base * (0.6 + 0.04 * i), 0, np.iinfo(ds.pixel_array.dtype).max) for i in range(20)])
    ds.PixelData = frames.astype(ds.pixel_array.dtype).tobytes()
    ds.NumberOfFrames = 20
    settings = _settings(tmp_path, str(model), frames={"mode": "all", "max_frames": 8})
    with Gateway(settings) as gw:
        assert gw.accept(to_bytes(ds)) == 0
        _wait(lambda: gw.status()["processed"] == 1 and gw.status()["queued"] == 0, 60, "the cine processed")
        assert gw.status()["failed"] == 0
    (result,) = sr_results(tmp_path / "spool")[ds.SOPInstanceUID]
    assert result["frames"] == [1, 4, 6, 9, 12, 15, 17, 20]  # round(linspace(0, 19, 8)) + 1
    local = LocalInference(model)
    positive = local.info.class_names[local.info.positive_index]
    per_frame = local.predict(split_frames(pydicom.dcmread(to_bytes_file(ds, tmp_path)), result["frames"]))
    best = max(per_frame, key=lambda a: a.probabilities[positive])
    assert result["probabilities"] == pytest.approx(best.probabilities, abs=1e-6)


def to_bytes_file(ds, folder: Path) -> Path:
    path = folder / "cine.dcm"
    path.write_bytes(to_bytes(ds))
    return path


def test_a_series_that_grows_gets_an_sr_that_supersedes_the_first(tmp_path, model, shared_data):
    from serving.gateway.app import Gateway
    from serving.gateway.report import read_results

    study = study_from(ct_files(shared_data, 1)[0], 3, planted=False, size=None)
    with Gateway(_settings(tmp_path, str(model))) as gw:
        assert all(gw.accept(to_bytes(ds)) == 0 for ds in study[:2])
        _wait(lambda: gw.status()["processed"] == 2 and gw.status()["queued"] == 0, 60, "the first two instances")
        assert gw.accept(to_bytes(study[2])) == 0  # a late instance of the same series
        _wait(lambda: gw.status()["processed"] == 3 and gw.status()["queued"] == 0, 60, "the late instance")
    srs = sorted((pydicom.dcmread(p) for p in (tmp_path / "spool").rglob("sr-*.dcm")), key=lambda d: int(d.InstanceNumber))
    assert [int(d.InstanceNumber) for d in srs] == [1, 2] and srs[0].SeriesInstanceUID == srs[1].SeriesInstanceUID
    first, second = srs
    assert sorted(read_results(first)) == sorted(ds.SOPInstanceUID for ds in study[:2])
    assert sorted(read_results(second)) == sorted(ds.SOPInstanceUID for ds in study)  # the whole series
    ref = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == first.SOPInstanceUID and "PredecessorDocumentsSequence" not in first


def test_a_study_trigger_gives_one_sr_for_every_series_of_the_study(tmp_path, model, shared_data):
    from serving.gateway.app import Gateway

    study = study_from(ct_files(shared_data, 1)[0], 4, series=2, planted=False, size=None)
    with Gateway(_settings(tmp_path, str(model), trigger="study")) as gw:
        assert all(gw.accept(to_bytes(ds)) == 0 for ds in study)
        _wait(lambda: gw.status()["processed"] == 4 and gw.status()["queued"] == 0, 60, "the study processed")
    srs = list((tmp_path / "spool").rglob("sr-*.dcm"))
    assert len(srs) == 1 and len({ds.SeriesInstanceUID for ds in study}) == 2
    assert sorted(sr_results(tmp_path / "spool")) == sorted(ds.SOPInstanceUID for ds in study)
