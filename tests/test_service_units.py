"""The service's parts without a server: settings, upload checks, the request guard (through an
in-process ASGI call), the model runtime against `AdaptedModel`, and the exported model card."""

from __future__ import annotations

import asyncio
import io
import json
import zipfile

import numpy as np
import pytest
import torch

from remedis.config import ConfigError
from serving.inputs import UploadError, check_upload, decode, expand_zip, safe_reason, sniff
from serving.settings import AuthSettings, LimitSettings, ServeSettings, load_settings, read_api_key


def _png_bytes(h: int, w: int, value: int | None = None) -> bytes:
    from PIL import Image

    arr = np.full((h, w), value, np.uint8) if value is not None else (np.random.default_rng(0).random((h, w)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _dicom_bytes(tmp_path, **header) -> bytes:
    import pydicom

    from remedis.data.synthetic import write_dicom

    path = tmp_path / "x.dcm"
    write_dicom(path, (np.random.default_rng(0).random((16, 16)) * 4000).astype(np.uint16), "P-1", "site-A")
    if header:
        import warnings

        ds = pydicom.dcmread(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deliberately invalid values (a name in Modality)
            for k, v in header.items():
                setattr(ds, k, v)
        ds.save_as(path)
    return path.read_bytes()


def test_default_settings_file_loads_and_unknown_keys_are_named(tmp_path):
    s = load_settings()
    assert s == ServeSettings().validate()  # the shipped YAML says exactly the defaults
    bad = tmp_path / "s.yaml"
    bad.write_text("batching: {max_batch_sise: 4}\n")
    with pytest.raises(ConfigError, match=r"batching.max_batch_sise.*did you mean 'batching.max_batch_size'"):
        load_settings(bad)
    bad.write_text("precision: fp8\n")
    with pytest.raises(ConfigError, match="precision"):
        load_settings(bad)
    bad.write_text("batching: {enabled: false}\n")
    assert load_settings(bad).max_batch_size == 1
    bad.write_text("batching: {coalesce_in_flight: -1}\n")
    with pytest.raises(ConfigError, match="batching.coalesce_in_flight"):
        load_settings(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.yaml")


def test_api_key_comes_from_env_or_file_and_is_never_in_the_error(tmp_path, monkeypatch):
    monkeypatch.setenv("K_ENV", "zq7x")
    with pytest.raises(ConfigError) as err:
        read_api_key(AuthSettings(enabled=True, key_env="K_ENV"))
    assert "K_ENV" in str(err.value) and "zq7x" not in str(err.value)
    monkeypatch.setenv("K_ENV", "k" * 20)
    assert read_api_key(AuthSettings(enabled=True, key_env="K_ENV")) == "k" * 20
    f = tmp_path / "key"
    f.write_text("f" * 24 + "\n")
    assert read_api_key(AuthSettings(enabled=True, key_file=str(f))) == "f" * 24


def test_format_is_sniffed_from_bytes_and_declared_type_is_checked(tmp_path):
    lim = LimitSettings()
    png, dcm = _png_bytes(8, 8), _dicom_bytes(tmp_path)
    assert sniff(png) == "png" and sniff(dcm) == "dicom" and sniff(b"\xff\xd8\xff\xe0junk") == "jpeg"
    assert sniff(b"II*\x00rest") == "tiff" and sniff(b"PK\x03\x04") == "zip" and sniff(b"hello") is None
    assert check_upload(png, "image/png", lim).format == "png"
    assert check_upload(png, None, lim).format == "png"
    assert check_upload(png, "application/octet-stream", lim).format == "png"
    up = check_upload(dcm, "application/dicom", lim)
    assert up.format == "dicom" and up.modality == "US" and (up.rows, up.columns) == (16, 16)
    for data, declared, status in ((png, "image/jpeg", 415), (dcm, "image/png", 415), (png, "text/html", 415),
                                   (b"GIF89a....", "image/gif", 415), (b"", "image/png", 400)):
        with pytest.raises(UploadError) as err:
            check_upload(data, declared, lim)
        assert err.value.status == status
    assert check_upload(_dicom_bytes(tmp_path, Modality="Doe^John 1961"), None, lim).modality is None  # not a code string
    # DICOM without the Part-10 preamble: accepted on the declared type, then the reader decides.
    raw = dcm[132:]
    assert check_upload(raw, "application/dicom", lim).format == "dicom"


def test_pixel_and_size_limits_are_checked_on_the_header_before_decoding(tmp_path):
    lim = LimitSettings(max_pixels=10_000, max_upload_bytes=50_000)
    with pytest.raises(UploadError, match=r"200x200 pixels.*10000") as err:
        check_upload(_png_bytes(200, 200, value=0), "image/png", lim)
    assert err.value.status == 413
    # A DICOM header claiming 30000 x 30000 is refused without touching its (tiny) pixel data.
    with pytest.raises(UploadError, match="30000x30000") as err:
        check_upload(_dicom_bytes(tmp_path, Rows=30000, Columns=30000), None, lim)
    assert err.value.status == 413
    with pytest.raises(UploadError, match="50000") as err:
        check_upload(b"\x89PNG\r\n\x1a\n" + b"\0" * 60_000, "image/png", lim)
    assert err.value.status == 413


def test_decode_errors_are_422_and_carry_no_decoder_details(tmp_path):
    lim = LimitSettings()
    dcm = _dicom_bytes(tmp_path, PatientName="Quixote^Dulcinea")
    with pytest.raises(UploadError) as err:
        decode(check_upload(dcm[:-200], None, lim))
    assert err.value.status == 422 and "Quixote" not in err.value.reason and "(" not in err.value.reason
    from remedis.data.readers import ImageReadError

    assert safe_reason(ImageReadError("/tmp/Doe_John.dcm: not a readable DICOM file (ValueError: tag 19610203)")) \
        == "not a readable DICOM file"
    pixels = decode(check_upload(dcm, None, lim))
    assert pixels.shape == (16, 16) and pixels.dtype == np.float32


def test_zip_expansion_guards_count_and_size():
    def z(members: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in members.items():
                zf.writestr(name, data)
        return buf.getvalue()

    lim = LimitSettings(max_batch_files=3, max_zip_bytes=1_000_000, max_upload_bytes=100_000)
    got = expand_zip(z({"a/1.png": b"one", "__MACOSX/._1.png": b"x", "a/.DS_Store": b"x", "2.dcm": b"two"}), lim)
    assert got == [b"one", b"two"]
    for members, status in (({f"{i}.png": b"x" for i in range(4)}, 413), ({"big.png": b"\0" * 2_000_000}, 413), ({}, 400)):
        with pytest.raises(UploadError) as err:
            expand_zip(z(members), lim)
        assert err.value.status == status
    with pytest.raises(UploadError) as err:
        expand_zip(b"PK\x03\x04 truncated", lim)
    assert err.value.status == 422
    # A member larger than one upload is cut at the limit (check_upload then refuses it with 413).
    assert len(expand_zip(z({"a.png": b"\0" * 200_000}), lim)[0]) == 100_001


def _asgi(settings: ServeSettings, method: str, path: str, headers: dict[str, str] | None = None,
          content: bytes | None = None, chunked: bool = False):
    """One request through RequestGuard in front of a tiny app that echoes the body length."""
    import httpx

    from serving.guard import RequestGuard

    async def app(scope, receive, send):
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": str(len(body)).encode()})

    guard = RequestGuard(app, settings=settings, upload_paths={"/predict"})

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guard), base_url="http://t") as c:
            if chunked:
                async def gen():
                    for _ in range(4):
                        yield content
                return await c.request(method, path, headers=headers, content=gen())
            return await c.request(method, path, headers=headers, content=content)

    return asyncio.run(go())


def test_guard_checks_key_type_and_size_before_the_app(monkeypatch):
    monkeypatch.setenv("REMEDIS_UNIT_KEY", "u" * 32)
    s = ServeSettings(auth=AuthSettings(enabled=True, key_env="REMEDIS_UNIT_KEY"), limits=LimitSettings(max_request_bytes=1000))
    mp = {"content-type": "multipart/form-data; boundary=x"}
    assert _asgi(s, "POST", "/predict", mp, b"x").status_code == 401
    assert _asgi(s, "POST", "/predict", {**mp, "x-api-key": "u" * 31 + "v"}, b"x").status_code == 401
    assert _asgi(s, "POST", "/predict", {**mp, "x-api-key": "u" * 32}, b"x").text == "1"
    assert _asgi(s, "POST", "/predict", {**mp, "authorization": "Bearer " + "u" * 32}, b"x").text == "1"
    for open_path in ("/healthz", "/readyz", "/metrics"):
        assert _asgi(s, "GET", open_path).status_code == 200
    key = {"x-api-key": "u" * 32}
    r = _asgi(s, "POST", "/predict", {**key, "content-type": "application/json"}, b"{}")
    assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]
    r = _asgi(s, "POST", "/predict", {**key, **mp}, b"x" * 1001)
    assert r.status_code == 413 and "1001" in r.json()["error"]
    r = _asgi(s, "POST", "/predict", {**key, **mp}, b"x" * 300, chunked=True)  # 1,200 bytes, no Content-Length
    assert r.status_code == 413
    assert _asgi(s, "POST", "/predict", {**key, **mp}, b"x" * 200, chunked=True).text == "800"
    open_settings = ServeSettings()
    assert _asgi(open_settings, "POST", "/predict", mp, b"abc").text == "3"  # auth off by default


def test_runtime_forward_equals_adapted_model_logits_and_embedding():
    from remedis.adapt.model import AdaptedModel
    from remedis.data.preprocess import Preprocessing
    from remedis.models import Classifier
    from serving.runtime import ModelRuntime

    torch.manual_seed(0)
    model = AdaptedModel(Classifier("resnetv2_18_bit", 3, in_chans=1), ["a", "b", "c"], Preprocessing(image_size=32))
    x = torch.randn(3, 1, 32, 32)
    logits, emb = model.logits(x).numpy(), model.embed(x).numpy()
    rt = ModelRuntime(model, "cpu")
    got_logits, got_emb = rt.split(rt.forward(x.numpy()))
    assert np.array_equal(got_logits, logits) and np.array_equal(got_emb, emb)
    single = np.concatenate([rt.forward(x[i:i + 1].numpy()) for i in range(3)])
    # A batch answers like single images (fp32 convolutions pick other algorithms per batch size: ~1e-5)
    assert np.abs(single - rt.forward(x.numpy())).max() < 5e-5
    fp32 = ModelRuntime(model, "cpu", precision="fp32").forward(x.numpy())
    model.autocast = False
    assert np.allclose(fp32[:, :3], model.logits(x).numpy(), atol=1e-6)


def test_model_card_carries_task_operating_point_ood_and_report_summary(tmp_path):
    from remedis.adapt.model import AdaptedModel
    from remedis.adapt.ood import OODDetector
    from remedis.data.preprocess import Preprocessing
    from remedis.export import model_card
    from remedis.models import Classifier

    model = AdaptedModel(Classifier("resnetv2_18_bit", 2, in_chans=1), ["benign", "malignant"], Preprocessing(image_size=32),
                         temperature=1.3, provenance={"target_site": "site-B", "manifest_sha256": "m" * 64})
    folder = model.save(tmp_path / "m")
    meta = json.loads((folder / "meta.json").read_text())
    meta["calibration"]["threshold"] = 0.31
    (folder / "meta.json").write_text(json.dumps(meta))
    OODDetector("energy", 2.5).save(folder)
    report = {"schema_version": 2, "task": {"class_names": ["benign", "malignant"]},
              "sites": {"site-A": {"role": "source"}, "site-B": {"role": "target"}},
              "models": [{"name": "m", "train_images": 40, "operating_point": {"threshold": 0.31},
                          "sites": {"site-B": {"auroc": 0.8, "auroc_ci": [0.7, 0.9], "ece": 0.05,
                                               "calibration": {"ece": 0.05, "brier": 0.2, "reliability": [[0.1, 0.2]] * 10}}},
                          "ood": {"detector": {"method": "energy", "threshold": 2.5}, "summary": {"far": {"energy": 0.9}}}}]}
    card = model_card(folder, report, "m")
    assert card["task"] == "binary classification: malignant vs benign" and card["temperature"] == 1.3
    assert card["operating_point"]["threshold"] == 0.31
    assert card["ood_detector"] == {"method": "energy", "threshold": 2.5, "accept_rate": 0.95}
    assert card["training_sites"]["target_site"] == "site-B" and card["training_sites"]["report"]["site-A"] == "source"
    assert card["report"]["metrics"]["site-B"] == {"auroc": 0.8, "auroc_ci": [0.7, 0.9], "ece": 0.05, "brier": 0.2}
    assert card["report"]["ood"]["summary"] == {"far": {"energy": 0.9}} and card["manifest_sha256"] == "m" * 64


def test_gpu_request_without_a_gpu_falls_back_to_cpu():
    from serving.runtime import pick_device

    if torch.cuda.is_available():
        assert pick_device(1).type == "cuda"
    else:
        assert pick_device(1).type == "cpu"
    assert pick_device(0).type == "cpu"


def test_model_hop_resends_only_after_a_dropped_connection():
    import logging

    import aiohttp

    from serving.hop import call_resending, dropped_connection

    log = logging.getLogger("test")
    failures = [aiohttp.ClientConnectionError("Connector is closed."), aiohttp.ServerDisconnectedError(),
                RuntimeError("Session is closed")]
    calls = []

    async def flaky():
        calls.append(1)
        if len(calls) <= 2:
            raise failures[len(calls) - 1]
        return "answer"

    assert asyncio.run(call_resending(flaky, log)) == "answer" and len(calls) == 3
    calls.clear()
    failures[:] = [failures[2]] * 3  # still failing after the last attempt: the error surfaces

    async def always_down():
        calls.append(1)
        raise failures[0]

    with pytest.raises(RuntimeError, match="Session is closed"):
        asyncio.run(call_resending(always_down, log))
    assert len(calls) == 3

    # an answer from the model worker (a shed request, a model error) is never resent
    shed = aiohttp.ClientResponseError(None, (), status=503)
    assert not dropped_connection(shed) and not dropped_connection(ValueError("bad input"))
    assert not dropped_connection(RuntimeError("CUDA out of memory"))
    calls.clear()

    async def model_error():
        calls.append(1)
        raise ValueError("model failed")

    with pytest.raises(ValueError):
        asyncio.run(call_resending(model_error, log))
    assert len(calls) == 1


def test_coalescer_routes_rows_back_to_their_callers_and_merges_waiting_requests():
    from serving.coalesce import Coalescer

    sizes = []

    async def model(x):  # row i -> its sum: any mix-up of rows between callers changes an answer
        sizes.append(len(x))
        await asyncio.sleep(0.02)
        return x.reshape(len(x), -1).sum(1, keepdims=True)

    async def main():
        co = Coalescer(model, max_batch_size=8, max_in_flight=1)
        rng = np.random.default_rng(0)
        xs = [rng.standard_normal((int(rng.integers(1, 4)), 1, 2, 2)) for _ in range(30)]
        outs = await asyncio.gather(*(co.submit(x) for x in xs))
        for x, out in zip(xs, outs):
            np.testing.assert_allclose(out[:, 0], x.reshape(len(x), -1).sum(1))
        return co, xs

    co, xs = asyncio.run(main())
    assert sum(sizes) == sum(len(x) for x in xs)
    assert max(sizes) <= 8 and co.calls == len(sizes) < len(xs) / 2  # merged, never above the cap
    assert sizes[0] == len(xs[0])  # the first request went at once, alone


def test_coalescer_sends_an_idle_request_at_once_and_an_oversize_one_alone():
    from serving.coalesce import Coalescer

    sizes = []

    async def model(x):
        sizes.append(len(x))
        return x[:, :1, 0, 0]

    async def main():
        co = Coalescer(model, max_batch_size=4, max_in_flight=2)
        a = await asyncio.wait_for(co.submit(np.ones((1, 1, 1, 1))), 1.0)
        b = await co.submit(np.full((6, 1, 1, 1), 2.0))
        return a, b

    a, b = asyncio.run(main())
    assert sizes == [1, 6] and a.tolist() == [[1.0]] and b.tolist() == [[2.0]] * 6


def test_coalescer_fails_every_request_of_a_failed_call_and_then_recovers():
    from serving.coalesce import Coalescer

    state = {"fail": True}

    async def model(x):
        await asyncio.sleep(0.01)
        if state["fail"]:
            raise RuntimeError("model worker gone")
        return x[:, :1, 0, 0]

    async def main():
        co = Coalescer(model, max_batch_size=32, max_in_flight=1)
        results = await asyncio.gather(*(co.submit(np.ones((1, 1, 1, 1))) for _ in range(5)), return_exceptions=True)
        state["fail"] = False
        after = await co.submit(np.full((2, 1, 1, 1), 3.0))
        return results, after, co

    results, after, co = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) for r in results)
    assert after.tolist() == [[3.0], [3.0]] and co._in_flight == 0


# ---- the input contract and the answer (serving.answer), in-process -----------------------------------

@pytest.fixture(scope="module")
def us_contract(tmp_path_factory):
    """An input contract fitted on small synthetic ultrasound (PNG sites and DICOM Modality US) at 32 px,
    and one of its held-out PNGs."""
    from remedis.data.contract import InputContract, describe_file
    from remedis.data.dataset import load_images
    from remedis.data.manifest import read_manifest
    from remedis.data.preprocess import Preprocessing
    from remedis.data.synthetic import SyntheticSpec, generate_synthetic

    m = read_manifest(generate_synthetic(tmp_path_factory.mktemp("synth"), SyntheticSpec(patients_per_site=15, image_size=48), seed=0))
    pre = Preprocessing(image_size=32)
    train = load_images(m.select(split="train"), pre)
    contract = InputContract.fit([describe_file(r.image) for r in train.records], train.pixels)
    png = next(r.image for r in m.select(split="test") if r.image.suffix == ".png")
    return contract, pre, png


def test_upload_carries_the_header_facts_the_contract_checks(tmp_path):
    from PIL import Image

    lim = LimitSettings()
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((12, 10, 3)) * 255).astype(np.uint8)).save(buf, format="JPEG")
    up = check_upload(buf.getvalue(), "image/jpeg", lim)
    assert up.source.channels == 3 and up.source.photometric == "RGB" and (up.rows, up.columns) == (12, 10)
    assert up.modality is None
    up = check_upload(_dicom_bytes(tmp_path), None, lim)
    assert (up.source.modality, up.source.photometric, up.source.channels) == ("US", "MONOCHROME2", 1)
    assert check_upload(_png_bytes(9, 7), None, lim).source.channels == 1
    with pytest.raises(UploadError) as err:  # a broken header leaves the facts unknown; decoding refuses it
        decode(check_upload(b"\x89PNG\r\n\x1a\n" + b"\0" * 40, None, lim))
    assert err.value.status == 422


def test_answer_uses_the_models_calibration_and_combines_contract_and_detector(us_contract):
    from pydicom.data import get_testdata_file

    from remedis.adapt.calibration import Calibration
    from remedis.adapt.model import AdaptedModel
    from remedis.adapt.ood import OODDetector
    from remedis.models import Classifier
    from serving.answer import answers, prepare

    contract, pre, png = us_contract
    torch.manual_seed(0)
    model = AdaptedModel(Classifier("resnetv2_18_bit", 2, in_chans=1), ["benign", "malignant"], pre, temperature=1.7,
                         threshold=0.4)
    lim = LimitSettings()
    x_png, r_png = prepare(check_upload(png.read_bytes(), "image/png", lim), pre, contract)
    x_ct, r_ct = prepare(check_upload(open(get_testdata_file("CT_small.dcm"), "rb").read(), None, lim), pre, contract)
    assert r_png == [] and r_ct[0] == "modality CT, model trained on US"
    x = torch.from_numpy(np.stack([x_png, x_ct]))
    logits, emb = model.logits(x).numpy(), model.embed(x).numpy()
    out = np.concatenate([logits, emb], 1)
    cal = Calibration.from_meta({"class_names": model.class_names, "calibration": {"temperature": 1.7, "threshold": 0.4}})
    energy = OODDetector("energy", 1e6)  # accepts everything: the contract alone flags the CT slice
    got = answers(out, model.class_names, cal, energy, [r_png, r_ct], contract=True)
    probs = model.probs_from_logits(torch.from_numpy(logits)).numpy()
    for a, p, label in zip(got, probs, model.decide(probs)):
        assert np.allclose([a.probabilities[c] for c in model.class_names], p, atol=1e-6)
        assert a.label == model.class_names[label] and a.decision == "operating_point"
        assert isinstance(a.ood_score, float)
    assert got[0].ood is False and got[0].ood_reasons == []
    assert got[1].ood is True and got[1].ood_reasons == r_ct
    # The detector's own flag is a reason too; without contract and detector nothing is claimed.
    strict = OODDetector("energy", -1e6)
    flagged = answers(out, model.class_names, cal, strict, [r_png, r_ct], contract=True)
    assert flagged[0].ood is True and flagged[0].ood_reasons[0].startswith("feature score ")
    assert flagged[0].ood_reasons[0].endswith("above threshold -1e+06")
    bare = answers(out, model.class_names, cal)
    assert [a.ood for a in bare] == [None, None] and bare[0].ood_reasons == [] and bare[0].ood_score is None
    contract_only = answers(out, model.class_names, cal, None, [r_png, r_ct], contract=True)
    assert [a.ood for a in contract_only] == [False, True] and contract_only[0].ood_score is None


def test_expected_modalities_come_from_the_config_else_the_contract(tmp_path, us_contract):
    from serving.answer import modality_warnings

    contract = us_contract[0]
    ct = check_upload(_dicom_bytes(tmp_path, Modality="CT"), None, LimitSettings())
    us = check_upload(_dicom_bytes(tmp_path), None, LimitSettings())
    assert modality_warnings(ct, {"US"}, None, reject=False) == ["DICOM modality CT is not one this model expects (US)"]
    assert modality_warnings(ct, set(), contract, reject=False) == []  # the contract's mismatch is an ood reason
    assert modality_warnings(us, set(), contract, reject=True) == []
    for configured, c in (({"US"}, None), (set(), contract), ({"US", "MR"}, contract)):
        with pytest.raises(UploadError, match="DICOM modality CT is not one this model expects") as err:
            modality_warnings(ct, configured, c, reject=True)
        assert err.value.status == 422
    assert modality_warnings(ct, {"CT"}, contract, reject=True) == []  # the configured list wins
    assert modality_warnings(ct, set(), None, reject=True) == []  # nothing expected: nothing refused
