"""The inference service end to end: a real small model exported with `remedis export`, served by
`bentoml serve` (once for the module), called over HTTP with `bentoml.SyncHTTPClient` and httpx.

The server runs with the API key on, low size/pixel limits (so the bad-input cases stay tiny), an
operating threshold, a real OOD detector and an input contract (fitted on small synthetic ultrasound) in
the model folder; every served number is checked against the offline model (`AdaptedModel`,
`OODDetector`, `InputContract`) on the same files.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT

httpx = pytest.importorskip("httpx")

KEY = "test-" + secrets.token_hex(16)
MONITOR_SECRET = "monitor-" + secrets.token_hex(16)
PLANTED = {"PatientName": "Quixote^Dulcinea", "PatientID": "PID-93417", "PatientBirthDate": "19610203",
           "AccessionNumber": "ACC-55123"}


def _png(path: Path, arr: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(arr).save(path)
    return path


def _dicom(path: Path, arr: np.ndarray, modality: str = "US", **tags) -> Path:
    import pydicom

    from remedis.data.synthetic import write_dicom

    write_dicom(path, arr, patient_id="P-x", site="site-A", modality=modality)
    if tags:
        ds = pydicom.dcmread(path)
        for k, v in tags.items():
            setattr(ds, k, v)
        ds.save_as(path)
    return path


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    from remedis.adapt.model import AdaptedModel
    from remedis.adapt.ood import OODDetector, fit_ood_detector
    from remedis.data.contract import InputContract, describe_file
    from remedis.data.dataset import load_images
    from remedis.data.manifest import read_manifest
    from remedis.data.preprocess import Preprocessing
    from remedis.data.readers import read_image
    from remedis.data.synthetic import SyntheticSpec, generate_synthetic
    from remedis.models import Classifier
    from serving.local import LocalServer

    tmp = tmp_path_factory.mktemp("service")
    torch.manual_seed(0)
    pre = Preprocessing(image_size=32)
    model = AdaptedModel(Classifier("resnetv2_18_bit", 2, in_chans=1), ["benign", "malignant"], pre, temperature=1.7)

    # "Training" images: small synthetic ultrasound (PNG sites, and a DICOM site with Modality US).
    # Their input contract goes into the folder the way `adapt` stores it; the test images are held out.
    manifest = read_manifest(generate_synthetic(tmp / "synth", SyntheticSpec(patients_per_site=12, image_size=40), seed=0))
    train = load_images(manifest.select(split="train"), pre)
    model.input_contract = InputContract.fit([describe_file(r.image) for r in train.records], train.pixels)
    folder = model.save(tmp / "adapted")
    held_out = [r.image for r in manifest.select(split="test")]
    pngs, dcms = [p for p in held_out if p.suffix == ".png"], [p for p in held_out if p.suffix == ".dcm"]
    files = [f for pair in zip(pngs[:4], dcms[:4]) for f in pair]  # png, dcm, png, ...

    # A real OOD detector (kNN on embeddings of the train images, threshold on validation ones) and an
    # operating threshold, stored in the folder the way `adapt` stores them.
    val = load_images(manifest.select(split="val"), pre)
    emb_train = model.embed(pre.normalize(train.pixels.float())).numpy()
    x_val = pre.normalize(val.pixels.float())
    det = fit_ood_detector("knn", emb_train, np.arange(len(emb_train)) % 2, model.logits(x_val).numpy(),
                           model.embed(x_val).numpy(), k=3)
    det.save(folder)
    x = model.batch_from_images([read_image(f) for f in files])
    p_pos = model.probs_from_logits(model.logits(x)).numpy()[:, 1]
    threshold = float(np.median(p_pos))  # half the images each side: argmax would differ from it
    meta = json.loads((folder / "meta.json").read_text())
    meta["calibration"]["threshold"] = threshold
    (folder / "meta.json").write_text(json.dumps(meta))

    home = tmp / "bentoml"
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    proc = subprocess.run([sys.executable, "-m", "remedis.cli", "export", "--model", str(folder), "--name", "svc-test"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tag = proc.stdout.split("model:")[1].split()[0]

    config = tmp / "serving.yaml"
    config.write_text("""
modalities: [US]
batching: {max_batch_size: 8, max_latency_ms: 30000}
limits: {max_upload_bytes: 300000, max_request_bytes: 3000000, max_pixels: 250000, max_batch_files: 10}
auth: {enabled: true, key_env: REMEDIS_TEST_API_KEY}
monitor: {store: "sqlite:///%s", embeddings: true, gauges: {every_s: 1, window: 1d, reference_since: "2000-01-01",
          reference_until: "2000-01-02"}}
shadow: {model: "%s"}
""" % (tmp / "predictions.db", tag))
    # A second server of the same model over HTTPS, for test_the_service_serves_https...: started beside the main one
    # (a server's start is mostly single-threaded imports, so two overlap on two cores).
    https = _https_server(tag, home, tmp / "tls")
    starting = ThreadPoolExecutor(1).submit(https[0].start) if https else None
    server = LocalServer(tag, home, config, env={"REMEDIS_TEST_API_KEY": KEY, "REMEDIS_MONITOR_SECRET": MONITOR_SECRET})
    try:
        server.start()
        offline = AdaptedModel.load(folder)
        yield {"url": server.url, "server": server, "files": files, "offline": offline, "tmp": tmp, "tag": tag,
               "detector": OODDetector.load(folder), "threshold": threshold, "folder": folder,
               "contract": model.input_contract, "https": (https, starting)}
    finally:
        _CLIENT.close()  # its keep-alive connections would hold the server's graceful shutdown
        server.stop()
        if https:
            starting.exception(timeout=240)  # started or failed (the HTTPS test reports which): then stopped
            https[0].stop()


def _https_server(tag: str, home: Path, folder: Path):
    """(a LocalServer over HTTPS with a trustme CA's certificate, the CA file, a rogue CA's file), or None without trustme."""
    try:
        import trustme
    except ImportError:
        return None
    from serving.local import LocalServer

    folder.mkdir()
    ca, rogue = trustme.CA(), trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca.cert_pem.write_to_path(folder / "ca.pem")
    rogue.cert_pem.write_to_path(folder / "rogue.pem")
    cert.private_key_pem.write_to_path(folder / "svc.key")
    cert.cert_chain_pems[0].write_to_path(folder / "svc.crt")
    config = folder / "serving.yaml"
    config.write_text(f"tls: {{cert: {folder / 'svc.crt'}, key: {folder / 'svc.key'}}}\n"
                      "auth: {enabled: true, key_env: REMEDIS_TEST_API_KEY}\n")
    server = LocalServer(tag, home, config, env={"REMEDIS_TEST_API_KEY": KEY}, https_ca=folder / "ca.pem",
                         startup_timeout=180)
    return server, folder / "ca.pem", folder / "rogue.pem"


# One pooled keep-alive client for the module's calls (httpx.post builds a client, and its TLS context, per call:
# most of the client side's CPU, which shares the 2 cores with the server under test).
_CLIENT = httpx.Client(timeout=60, limits=httpx.Limits(max_connections=32, max_keepalive_connections=32))


def _post(svc, route: str, files=None, headers=None, **kw) -> httpx.Response:
    headers = {"X-API-Key": KEY} if headers is None else headers
    return _CLIENT.post(f"{svc['url']}/{route}", files=files, headers=headers, **kw)


def _file(path: Path, ctype: str | None = None):
    ctype = ctype or ("image/png" if path.suffix == ".png" else "application/dicom")
    return ("upload" + path.suffix, path.read_bytes(), ctype)


def _expected(svc, path: Path) -> dict:
    m = svc["offline"]
    from remedis.data.contract import describe_file
    from remedis.data.readers import read_image

    offline = m.predict_files([path])
    probs, logits = offline["probs"][0], offline["logits"]
    emb = m.embed(m.batch_from_images([read_image(path)])).numpy()
    score = float(svc["detector"].score(logits, emb)[0])
    contract = svc["contract"].check(describe_file(path), m.preprocessing.resize(read_image(path)))
    above = score > svc["detector"].threshold
    return {"probs": probs, "label": m.class_names[int(probs[1] >= svc["threshold"])], "ood_score": score,
            "ood": above or bool(contract), "contract_reasons": contract, "above": above, "embedding": emb[0]}


def test_served_predictions_equal_offline(svc):
    import bentoml

    client = bentoml.SyncHTTPClient(svc["url"], token=KEY, timeout=60)
    labels = set()
    for path in svc["files"]:
        got = client.predict(image=path)
        exp = _expected(svc, path)
        probs = np.array([got["probabilities"][c] for c in svc["offline"].class_names])
        assert np.allclose(probs, exp["probs"], atol=1e-5), (path.name, probs, exp["probs"])
        assert got["label"] == exp["label"] and got["decision"] == "operating_point"
        assert got["ood"] == exp["ood"] and got["ood_score"] == pytest.approx(exp["ood_score"], rel=1e-4, abs=1e-5)
        feature = [r for r in got["ood_reasons"] if r.startswith("feature score ")]
        assert got["ood_reasons"] == exp["contract_reasons"] + feature and len(feature) == exp["above"]
        assert got["model"] == {"name": "svc-test", "version": svc["tag"].split(":")[1]}
        assert got["format"] == ("png" if path.suffix == ".png" else "dicom")
        labels.add(got["label"])
    assert labels == {"benign", "malignant"}  # the stored threshold, not argmax, decided
    client.close()


def test_held_out_png_conforms_and_a_ct_slice_is_flagged_with_its_reason(svc):
    """The model was trained on (synthetic) ultrasound: a held-out PNG of its sites is answered without
    reasons and with a numeric feature score; a real CT slice (pydicom's CT_small.dcm, Modality CT) is
    flagged by the input contract whatever its feature score, alone and inside a batch, and the answer
    carries no identifier from its header."""
    from pydicom.data import get_testdata_file

    png = next(p for p in svc["files"] if p.suffix == ".png" and not _expected(svc, p)["ood"])
    r = _post(svc, "predict", files={"image": _file(png)})
    assert r.status_code == 200, r.text
    assert r.json()["ood"] is False and r.json()["ood_reasons"] == [] and isinstance(r.json()["ood_score"], float)

    ct = Path(get_testdata_file("CT_small.dcm"))
    r = _post(svc, "predict", files={"image": ("slice.dcm", ct.read_bytes(), "application/dicom")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ood"] is True and body["ood_reasons"][0] == "modality CT, model trained on US"
    assert isinstance(body["ood_score"], float) and body["modality"] == "CT"
    import pydicom

    name = str(pydicom.dcmread(ct).PatientName)
    assert name and all(part not in r.text for part in name.split("^") if part)
    r = _post(svc, "predict_batch", files=[("images", ("slice.dcm", ct.read_bytes(), "application/dicom")), ("images", _file(png))])
    assert r.status_code == 200, r.text
    first, second = r.json()["results"]
    assert first["ood"] is True and "modality CT" in first["ood_reasons"][0]
    assert second["ood"] is False and second["ood_reasons"] == []


def test_embed_equals_offline_embedding(svc):
    path = svc["files"][1]
    r = _post(svc, "embed", files={"image": _file(path)})
    assert r.status_code == 200, r.text
    got = np.array(r.json()["embedding"])
    exp = _expected(svc, path)["embedding"]
    assert r.json()["dim"] == exp.shape[0] == got.shape[0]
    assert np.allclose(got, exp, atol=1e-5)


def test_predict_batch_files_and_zip_match_single_answers(svc):
    paths = (svc["files"] * 2)[:9]  # 9 good + 1 bad: two forward chunks at max_batch_size 8
    singles = [_post(svc, "predict", files={"image": _file(p)}).json() for p in svc["files"]] * 2
    bad = ("bad.png", b"not an image at all", "image/png")
    r = _post(svc, "predict_batch", files=[("images", _file(p)) for p in paths[:2]] + [("images", bad)]
              + [("images", _file(p)) for p in paths[2:]])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == 10 and body["errors"] == 1
    assert body["results"][2]["status"] == 415 and "format" in body["results"][2]["error"]
    good = [res for res in body["results"] if "error" not in res]
    for res, single in zip(good, singles):
        for c in ("benign", "malignant"):
            assert res["probabilities"][c] == pytest.approx(single["probabilities"][c], abs=1e-5)
        assert res["label"] == single["label"]

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i, p in enumerate(paths[:5]):
            zf.writestr(f"study/{i}{p.suffix}", p.read_bytes())
        zf.writestr("__MACOSX/._junk", b"junk")
    r = _post(svc, "predict_batch", files={"images": ("scans.zip", buf.getvalue(), "application/zip")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == 5 and body["errors"] == 0
    for res, single in zip(body["results"], singles):
        assert res["probabilities"]["malignant"] == pytest.approx(single["probabilities"]["malignant"], abs=1e-5)


def test_metadata_is_the_model_card(svc):
    r = _post(svc, "metadata", json={})
    assert r.status_code == 200, r.text
    card = r.json()
    assert card["class_names"] == ["benign", "malignant"] and card["task"].startswith("binary classification")
    assert card["temperature"] == pytest.approx(1.7)
    assert card["operating_threshold"] == pytest.approx(svc["threshold"])
    assert card["ood_detector"]["method"] == "knn"
    assert card["ood_detector"]["threshold"] == pytest.approx(svc["detector"].threshold)
    assert card["input_contract"]["modalities"] == ["US"] and card["input_contract"]["channels"] == [1]
    assert card["input_contract"]["n_images"] == svc["contract"].n_images
    assert len(card["weights_sha256"]) == 64
    assert card["serving"]["auth"] == {"enabled": True, "header": "X-API-Key"}
    from remedis.models.layout import fast_bf16

    # resources: CPU by default; precision auto: bf16 where the CPU has it natively, else fp32
    assert card["serving"]["runtime"] == {"device": "cpu", "precision": "bfloat16" if fast_bf16("cpu") else "fp32"}
    assert card["serving"]["batching"]["max_batch_size"] == 8
    assert KEY not in r.text and "REMEDIS_TEST_API_KEY" not in r.text


def _bad_cases(svc) -> list[tuple[str, dict, int, str]]:
    tmp = svc["tmp"]
    rng = np.random.default_rng(1)
    dcm = svc["files"][1].read_bytes()
    nopix = tmp / "nopix.dcm"
    _dicom(nopix, np.zeros((8, 8), np.uint16))
    import pydicom

    ds = pydicom.dcmread(nopix)
    del ds.PixelData
    ds.save_as(nopix)
    big = _png(tmp / "big.png", np.zeros((600, 600), np.uint8))  # 360,000 pixels > 250,000
    heavy = _png(tmp / "heavy.png", (rng.random((400, 400)) * 255).astype(np.uint8))  # > 300,000 bytes? see assert
    assert len(heavy.read_bytes()) > 300_000 - 150_000  # noise PNG barely compresses
    return [
        ("non-image bytes", {"image": ("x.png", b"hello, this is text" * 10, "image/png")}, 415, "format"),
        ("truncated DICOM", {"image": ("x.dcm", dcm[: len(dcm) - 1200], "application/dicom")}, 422, "DICOM"),
        ("DICOM without pixels", {"image": ("x.dcm", nopix.read_bytes(), "application/dicom")}, 422, "no pixel data"),
        ("too many pixels", {"image": ("x.png", big.read_bytes(), "image/png")}, 413, "pixels"),
        ("empty upload", {"image": ("x.png", b"", "image/png")}, 400, "empty"),
        ("declared type contradicts bytes", {"image": ("x.png", dcm, "image/png")}, 415, "does not match"),
        ("unaccepted content type", {"image": ("x.txt", svc["files"][0].read_bytes(), "text/plain")}, 415, "text/plain"),
        ("missing field", {"picture": ("x.png", svc["files"][0].read_bytes(), "image/png")}, 400, "image"),
    ]


def test_bad_input_gets_4xx_json_naming_the_problem(svc):
    for name, files, status, words in _bad_cases(svc):
        r = _post(svc, "predict", files=files)
        assert r.status_code == status, (name, r.status_code, r.text)
        assert words.lower() in r.json()["error"].lower(), (name, r.text)
    # Oversize file (handler limit) and oversize request (refused before the body is read).
    noise = np.random.default_rng(2).integers(0, 255, 320_000, dtype=np.uint8).tobytes()
    r = _post(svc, "predict", files={"image": ("x.png", b"\x89PNG\r\n\x1a\n" + noise, "image/png")})
    assert r.status_code == 413 and "300000" in r.json()["error"]
    r = _post(svc, "predict", files={"image": ("x.png", b"\x89PNG\r\n\x1a\n" + noise * 10, "image/png")})
    assert r.status_code == 413 and "request body" in r.json()["error"]
    # Wrong request content type (JSON that would make BentoML fetch a URL) and a text value in a file field.
    r = _post(svc, "predict", json={"image": "http://127.0.0.1:1/x.png"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]
    r = _post(svc, "predict", data={"image": "http://127.0.0.1:1/x.png"}, files={"other": ("a", b"a", "text/plain")})
    assert r.status_code == 400 and "file upload" in r.json()["error"]
    # Too many files in one batch call, and a zip bomb.
    files = [("images", _file(svc["files"][0]))] * 11
    assert _post(svc, "predict_batch", files=files).status_code == 413
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.png", b"\0" * 50_000_000)
    r = _post(svc, "predict_batch", files={"images": ("z.zip", buf.getvalue(), "application/zip")})
    assert r.status_code == 200 and r.json()["results"][0]["status"] == 413
    # The worker is still healthy and answers correctly.
    ok = _post(svc, "predict", files={"image": _file(svc["files"][0])})
    assert ok.status_code == 200 and "probabilities" in ok.json()


def test_api_key_is_required_but_health_and_metrics_stay_open(svc):
    files = {"image": _file(svc["files"][0])}
    assert _post(svc, "predict", files=files, headers={}).status_code == 401
    r = _post(svc, "predict", files=files, headers={"X-API-Key": KEY[:-1] + "x"})
    assert r.status_code == 401 and "API key" in r.json()["error"]
    assert _post(svc, "metadata", json={}, headers={}).status_code == 401
    assert _post(svc, "predict", files=files, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    for route in ("healthz", "readyz", "livez", "metrics"):
        assert httpx.get(f"{svc['url']}/{route}", timeout=30).status_code == 200, route
    assert "bentoml_service_request_total" in httpx.get(f"{svc['url']}/metrics", timeout=30).text
    assert KEY not in svc["server"].log_text()


def test_modality_mismatch_is_reported_not_refused(svc):
    ct = _dicom(svc["tmp"] / "ct.dcm", (np.random.default_rng(3).random((40, 40)) * 4000).astype(np.uint16), modality="CT")
    r = _post(svc, "predict", files={"image": _file(ct)})
    assert r.status_code == 200, r.text
    assert r.json()["modality"] == "CT" and "CT" in r.json()["warnings"][0]  # the configured `modalities: [US]`
    assert r.json()["ood"] is True and "modality CT, model trained on US" in r.json()["ood_reasons"]


def _logged(svc, keys: list[str], timeout: float = 30.0, role: str = "primary") -> list[dict]:
    """The prediction log's rows of `role` for `keys`, polled until every key has one (the writers commit every
    0.5 s; the primary's and the shadow's rows come from two writers, in either order)."""
    from remedis.monitor.store import PredictionStore

    store = PredictionStore(f"sqlite:///{svc['tmp'] / 'predictions.db'}")
    deadline = time.time() + timeout
    try:
        while True:
            rows = [r for r in store.rows(role=role) if r["key"] in set(keys)]
            if len({r["key"] for r in rows}) == len(set(keys)) or time.time() > deadline:
                return rows
            time.sleep(0.1)
    finally:
        store.close()


def test_every_answer_is_logged_with_a_key_and_labels_join_it_later(svc):
    from remedis.monitor.keys import instance_key

    phi = _dicom(svc["tmp"] / "phi-log.dcm", (np.random.default_rng(5).random((40, 40)) * 4000).astype(np.uint16), **PLANTED)
    png = svc["files"][0]
    one = _post(svc, "predict", files={"image": _file(phi)}).json()
    batch = _post(svc, "predict_batch", files=[("images", _file(png)), ("images", _file(phi))]).json()
    keys = [one["key"], *(r["key"] for r in batch["results"])]
    # A DICOM image is keyed by its SOP Instance UID (the same instance twice: one key), a PNG by its bytes.
    import pydicom

    assert one["key"] == batch["results"][1]["key"] == instance_key(pydicom.dcmread(phi).SOPInstanceUID, MONITOR_SECRET.encode())
    assert batch["results"][0]["key"].startswith("b-")
    rows = _logged(svc, keys)
    assert len(rows) >= 3
    mine = [r for r in rows if r["key"] == one["key"] and r["role"] == "primary"][0]
    # The same version runs in shadow here: its logged answers, read with its own runtime, equal the primary's.
    shadow = _logged(svc, keys, timeout=60, role="shadow")
    assert {r["key"] for r in shadow} == set(keys) and all(r["role"] == "shadow" for r in shadow)
    assert shadow[0]["probabilities"] == pytest.approx(
        [r for r in rows if r["key"] == shadow[0]["key"] and r["role"] == "primary"][0]["probabilities"], abs=1e-5)
    assert mine["modality"] == "US" and mine["rows"] == 40 and mine["columns"] == 40 and mine["role"] == "primary"
    assert mine["model_name"] == "svc-test" and len(mine["weights_sha256"]) == 64 and mine["caller"] == "api-key"
    assert mine["probabilities"] == pytest.approx(one["probabilities"], abs=1e-6) and mine["label"] == one["label"]
    assert mine["ood"] == one["ood"] and mine["ood_reasons"] == one["ood_reasons"]
    assert mine["embedding"] is not None and mine["embedding"].dtype == np.float16 and mine["truth"] is None
    # No planted identifier anywhere in the store's file.
    raw = (svc["tmp"] / "predictions.db").read_bytes() + b"".join(
        p.read_bytes() for p in svc["tmp"].glob("predictions.db-*") if p.is_file())
    for value in PLANTED.values():
        for part in re.split(r"\^", value):
            assert part.encode() not in raw, part
    # Feedback: a wrong label and an unknown key are refused whole; the right ones join.
    assert _post(svc, "feedback", json={"labels": [{"key": one["key"], "label": "cancer"}]}).status_code == 422
    r = _post(svc, "feedback", json={"labels": [{"key": one["key"], "label": "malignant"}, {"key": "i-" + "0" * 32, "label": "benign"}]})
    assert r.status_code == 404 and "1 key(s)" in r.json()["error"]
    assert _post(svc, "feedback", json={"labels": [{"key": one["key"], "label": "malignant"}]}, headers={}).status_code == 401
    r = _post(svc, "feedback", json={"labels": [{"key": one["key"], "label": "malignant"}], "source": "pathology"})
    assert r.status_code == 200 and r.json() == {"attached": 1}
    assert {r["truth"] for r in _logged(svc, [one["key"]])} == {"malignant"}


def test_metrics_carry_the_monitoring_gauges_of_the_latest_window(svc):
    """monitor.gauges: the API worker recomputes the latest window from the log (every second here) and /metrics
    shows it (the figures against a reference are checked in tests/test_monitor_report.py; this log's reference
    period, in 2000, is empty, so only the volume and the refresh time are set)."""
    png = svc["files"][0]
    assert _post(svc, "predict", files={"image": _file(png)}).status_code == 200
    from gateway_support import wait_until

    pattern = re.compile(r'^remedis_monitor_images\{model="svc-test:[^"]+"\} ([0-9.e+]+)$', re.M)
    scraped: list[str] = []

    def counted() -> bool:
        scraped.append(httpx.get(f"{svc['url']}/metrics", timeout=30).text)
        m = pattern.search(scraped[-1])
        return bool(m) and float(m.group(1)) >= 1

    wait_until(counted, timeout=60, what="remedis_monitor_images counting an answer", every=0.2)
    seen = scraped[-1]
    assert re.search(r'^remedis_monitor_refreshed_timestamp_seconds\{model="svc-test:[^"]+"\} [0-9.e+]+$', seen, re.M)
    assert 'remedis_monitor_alarm{figure="ood_rate"' in seen or 'remedis_monitor_alarm{model=' in seen


def test_no_patient_identifier_in_responses_or_logs(svc):
    phi = _dicom(svc["tmp"] / "phi.dcm", (np.random.default_rng(4).random((40, 40)) * 4000).astype(np.uint16), **PLANTED)
    broken = phi.read_bytes()[:-900]
    texts = []
    for route, files in (("predict", {"image": ("Quixote_PID-93417.dcm", phi.read_bytes(), "application/dicom")}),
                         ("embed", {"image": _file(phi)}),
                         ("predict", {"image": ("Quixote_PID-93417.dcm", broken, "application/dicom")}),
                         ("predict_batch", [("images", _file(phi)), ("images", ("x.dcm", broken, "application/dicom"))])):
        r = _post(svc, route, files=files)
        assert r.status_code < 500
        texts.append(r.text)
    log = svc["server"].log_text()
    for value in PLANTED.values():
        for part in re.split(r"\^", value):
            assert part not in log and all(part not in t for t in texts), part


def test_concurrent_requests_are_batched_and_answer_like_sequential(svc):
    paths = svc["files"]
    sequential = {p: _post(svc, "predict", files={"image": _file(p)}).json() for p in paths}
    before = _batch_stats(svc)
    errors: list[str] = []
    lock = threading.Lock()

    def call(i: int):
        p = paths[i % len(paths)]
        r = _post(svc, "predict", files={"image": _file(p)})
        if r.status_code != 200:
            with lock:
                errors.append(f"{r.status_code} {r.text[:200]}")
            return
        got, exp = r.json(), sequential[p]
        for c in ("benign", "malignant"):
            if abs(got["probabilities"][c] - exp["probabilities"][c]) > 1e-5 or got["label"] != exp["label"]:
                with lock:
                    errors.append(f"{p.name}: {got['probabilities']} != {exp['probabilities']}")

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(call, range(64)))
    assert not errors, errors[:5]
    after = _batch_stats(svc)
    calls, images = after[0] - before[0], after[1] - before[1]
    assert images >= 64 and calls < images, (calls, images)  # some forward passes served several requests


def _batch_stats(svc) -> tuple[float, float]:
    text = httpx.get(f"{svc['url']}/metrics", timeout=30).text
    # (forward passes, images): the model worker's own histogram (BentoML's adaptive_batch_size counts
    # calls, and the API worker coalesces several requests into one call)
    count = sum(float(m) for m in re.findall(r'^remedis_forward_batch_images_count(?:\{[^}]*\})? ([0-9.e+]+)', text, re.M))
    total = sum(float(m) for m in re.findall(r'^remedis_forward_batch_images_sum(?:\{[^}]*\})? ([0-9.e+]+)', text, re.M))
    return count, total


def test_load_mixed_requests_lose_nothing_and_never_5xx(svc):
    """Bounded load on loopback: mixed good and bad requests from 16 clients; every request is
    answered, none with a 5xx. 1,000 requests as issue 7 asks (REMEDIS_LOAD_REQUESTS lowers it for
    quick local runs)."""
    n = int(os.environ.get("REMEDIS_LOAD_REQUESTS", "1000"))
    good = [(p, _file(p)) for p in svc["files"]]
    bad = [("x.png", b"garbage" * 20, "image/png"), ("x.dcm", svc["files"][1].read_bytes()[:-1000], "application/dicom")]
    statuses: list[int] = []
    lock = threading.Lock()

    def call(i: int):
        if i % 5 == 4:
            files = {"image": bad[i % 2]}
        else:
            files = {"image": good[i % len(good)][1]}
        route = "embed" if i % 7 == 3 else "predict"
        try:
            code = _post(svc, route, files=files).status_code
        except httpx.HTTPError as exc:
            code = -1
            print("lost:", type(exc).__name__)
        with lock:
            statuses.append(code)

    psutil = pytest.importorskip("psutil")

    def server_rss() -> int:  # the whole `bentoml serve` tree: API and model workers
        root = psutil.Process(svc["server"].proc.pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])

    latencies: list[float] = []

    def timed(i: int):
        t0 = time.perf_counter()
        call(i)
        with lock:
            latencies.append(time.perf_counter() - t0)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(timed, range(n // 2)))
        warm = server_rss()
        list(pool.map(timed, range(n // 2, n)))
    grown = server_rss() - warm
    assert len(statuses) == n and -1 not in statuses
    assert not [s for s in statuses if s >= 500], sorted(set(statuses))
    assert statuses.count(200) == sum(1 for i in range(n) if i % 5 != 4)
    # memory flat over the second half (no per-request leak), and a bounded tail latency
    assert grown < max(0.15 * warm, 64 * 1024**2), (warm, grown)
    p99 = float(np.percentile(latencies, 99))
    print(f"load: {n} requests, p50 {np.percentile(latencies, 50):.3f} s, p99 {p99:.3f} s, "
          f"server RSS {warm / 1024**2:.0f} MiB -> +{grown / 1024**2:.1f} MiB")
    assert p99 < 30.0


def test_corrupt_model_fails_readiness_with_a_clear_log_line(svc, tmp_path):
    """A model whose weights no longer match their recorded hash is refused at start: the service never
    reports ready (so no traffic reaches it) and the log says why."""
    import shutil

    from serving.local import LocalServer

    home = tmp_path / "bentoml"
    shutil.copytree(svc["tmp"] / "bentoml" / "models", home / "models")
    name, version = svc["tag"].split(":")
    weights = home / "models" / name / version / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64] ^= 0xFF
    weights.write_bytes(bytes(data))
    server = LocalServer(svc["tag"], home, startup_timeout=45, fail_on=("hash does not match",))
    with pytest.raises(RuntimeError) as failure:
        server.start()
    server.stop()
    assert "hash does not match meta.json" in str(failure.value) + server.log_text()


def test_the_gateway_gets_its_answers_from_the_service_with_its_key(svc, tmp_path, monkeypatch):
    """The DICOM gateway's recommended set-up: the deployed service runs the model, the gateway calls
    `predict_batch` with the API key and writes the service's answer into the SR."""
    import pydicom

    from serving.answer import Refusal
    from serving.gateway.app import Gateway
    from serving.gateway.inference import InferenceUnavailable, ServiceInference
    from serving.gateway.report import read_results
    from serving.gateway.settings import load_gateway_settings

    dcms = [f for f in svc["files"] if f.suffix == ".dcm"]
    monkeypatch.setenv("REMEDIS_TEST_API_KEY", KEY)
    model = ServiceInference(svc["url"], "REMEDIS_TEST_API_KEY")
    meta = json.loads((svc["folder"] / "meta.json").read_text())
    assert model.info.class_names == ["benign", "malignant"] and model.info.weights_sha256 == meta["weights_sha256"]
    got = model.predict([f.read_bytes() for f in dcms] + [b"not an image"])
    assert isinstance(got[-1], Refusal) and got[-1].status in (415, 422)
    for f, answer in zip(dcms, got):
        assert answer.probabilities["malignant"] == pytest.approx(float(_expected(svc, f)["probs"][1]), abs=1e-5)
    model.close()
    monkeypatch.setenv("REMEDIS_TEST_API_KEY", "wrong-key-0123456789")
    with pytest.raises(InferenceUnavailable, match="API key"):
        ServiceInference(svc["url"], "REMEDIS_TEST_API_KEY")
    monkeypatch.setenv("REMEDIS_TEST_API_KEY", KEY)

    from gateway_support import free_port

    settings = load_gateway_settings(None, {
        "port": free_port(), "spool": str(tmp_path / "spool"), "quiet_seconds": 0.2, "stow": {"enabled": False},
        "routes": [{"model": svc["url"], "api_key_env": "REMEDIS_TEST_API_KEY", "modalities": ["US"]}]})
    with Gateway(settings) as gw:
        for f in dcms:
            assert gw.accept(f.read_bytes()) == 0
        deadline = time.time() + 60
        while (gw.status()["processed"] < len(dcms) or gw.status()["results_unsent"]) and time.time() < deadline:
            time.sleep(0.1)  # processed, then moved from the outbox to results/ (no destination configured)
        assert gw.status()["processed"] == len(dcms) and gw.status()["results_unsent"] == 0
    results = {}
    for p in (tmp_path / "spool" / "results").rglob("*.dcm"):
        results.update(read_results(pydicom.dcmread(p)))
    for f, answer in zip(dcms, got):
        uid = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
        assert results[uid]["probabilities"]["malignant"] == pytest.approx(answer.probabilities["malignant"], abs=1e-6)
        assert results[uid]["label"] == answer.label and results[uid]["ood"] == answer.ood


def test_the_service_serves_https_and_the_gateway_verifies_its_certificate(svc, monkeypatch):
    """`tls` in the serving config: the service answers over HTTPS only (BentoML's TLS), and the gateway's hop to
    it verifies the certificate against the site's CA; a certificate from another CA is never used."""
    from serving.gateway.inference import InferenceUnavailable, ServiceInference

    https, starting = svc["https"]
    if https is None:
        pytest.skip("trustme is not installed (pip install -e '.[dev]')")
    server, ca_file, rogue_file = https
    starting.result(timeout=180)
    png = next(f for f in svc["files"] if f.suffix == ".png")
    r = httpx.post(f"{server.url}/predict", files={"image": _file(png)}, headers={"X-API-Key": KEY}, timeout=60,
                   verify=str(ca_file))
    assert r.status_code == 200 and r.json()["probabilities"]["malignant"] == pytest.approx(
        float(_expected(svc, png)["probs"][1]), abs=1e-5)
    with pytest.raises(httpx.HTTPError):  # plain HTTP to the HTTPS port
        httpx.get(f"http://127.0.0.1:{server.port}/readyz", timeout=3)
    monkeypatch.setenv("REMEDIS_TEST_API_KEY", KEY)
    verified = ServiceInference(server.url, "REMEDIS_TEST_API_KEY", ca=str(ca_file))
    assert verified.info.class_names == ["benign", "malignant"]
    verified.close()
    with pytest.raises(InferenceUnavailable, match="unreachable"):
        ServiceInference(server.url, "REMEDIS_TEST_API_KEY", ca=str(rogue_file))
