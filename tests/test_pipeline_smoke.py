"""The whole path on a tiny config: data -> pretrain -> adapt -> evaluate -> bento -> HTTP."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT

SMOKE = ROOT / "configs" / "smoke.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    env = {**os.environ, "BENTOML_HOME": str(out / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    proc = subprocess.run([sys.executable, "-m", "remedis.cli", "run", str(SMOKE), "--output", str(out / "run"), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"out": out / "run", "env": env, "stdout": proc.stdout, "stderr": proc.stderr}


def test_report_has_a_number_for_every_site_and_model(run):
    report = json.loads((run["out"] / "report.json").read_text())
    assert isinstance(report["schema_version"], int) and report["schema_version"] >= 1
    assert set(report["sites"]) == {"site-A", "site-B", "site-C"}
    assert {s["role"] for s in report["sites"].values()} == {"source", "target", "ood"}
    names = {m["name"] for m in report["models"]}
    assert names == {"remedis@0.1", "remedis@1", "supervised@0.1", "supervised@1"}
    for m in report["models"]:
        for site in report["sites"]:
            met = m["sites"][site]
            assert 0.0 <= met["auroc"] <= 1.0 and 0.0 <= met["accuracy"] <= 1.0
            assert met["n_images"] > 0
    small = next(m for m in report["models"] if m["name"] == "remedis@0.1")
    full = next(m for m in report["models"] if m["name"] == "remedis@1")
    assert small["train_images"] < full["train_images"]
    # default recipe (full fine-tuning, one sweep member): the steps exist, and "final" is the reported model
    assert set(full["recipe_ablation"]) == {"best_member", "soup", "final"}
    assert abs(full["recipe_ablation"]["final"]["auroc"] - full["sites"]["site-B"]["auroc"]) < 1e-9
    html = (run["out"] / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html and "http" not in html.split("<body>")[1]
    assert "wall time" in run["stdout"] and "bento:" in run["stdout"]


def test_run_folder_holds_the_design_artifacts(run):
    out = run["out"]
    for ckpt in ("backbones/supervised", "backbones/remedis", "adapted/remedis@1"):
        meta = json.loads((out / ckpt / "meta.json").read_text())
        assert (out / ckpt / "model.safetensors").is_file()
        assert len(meta["weights_sha256"]) == 64 and meta["versions"]["torch"]
    remedis_meta = json.loads((out / "backbones/remedis/meta.json").read_text())
    assert [s["stage"] for s in remedis_meta["stage_history"]] == ["supervised", "simclr"]
    # No patient identifier in the report.
    pids = {line.split(",")[3] for line in (out / "manifest.csv").read_text().splitlines()[1:]}
    text = (out / "report.json").read_text() + (out / "report.html").read_text()
    assert not [p for p in pids if p in text]


def test_bento_serves_png_and_dicom_like_offline(run):
    import bentoml

    from remedis.adapt.model import AdaptedModel

    bento = next(line.split()[1] for line in run["stdout"].splitlines() if line.startswith("bento:"))
    port = _free_port()
    server = subprocess.Popen(["bentoml", "serve", bento, "--port", str(port), "--host", "127.0.0.1"],
                              env={**run["env"], "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = None
        deadline = time.time() + 120
        while time.time() < deadline:
            if server.poll() is not None:
                pytest.fail(f"bentoml serve exited: {server.stdout.read()[-3000:]}")
            try:
                client = bentoml.SyncHTTPClient(f"http://127.0.0.1:{port}", timeout=30)
                if client.is_ready():
                    break
            except Exception:
                client = None
            time.sleep(1)
        assert client is not None and client.is_ready(), "service did not become ready"
        offline = AdaptedModel.load(run["out"] / "adapted" / "remedis@1")
        images = run["out"].parent / "run" / "data" / "images"
        png = sorted((images / "site-B").glob("*.png"))[0]
        dcm = sorted((images / "site-C").glob("*.dcm"))[0]
        for path in (png, dcm):
            answer = client.predict(image=path)
            expected = offline.predict_files([path])["probs"][0]
            got = np.array([answer["probabilities"][c] for c in offline.class_names])
            assert np.allclose(got, expected, atol=1e-5), (path.name, got, expected)
            assert abs(got.sum() - 1) < 1e-5 and answer["label"] in offline.class_names
        bad = run["out"].parent / "not-an-image.png"
        bad.write_bytes(b"this is not an image")
        with pytest.raises(bentoml.exceptions.BentoMLException) as err:
            client.predict(image=bad)
        assert getattr(err.value, "error_code", None) is not None and 400 <= int(err.value.error_code) < 500
        card = client.metadata()
        assert card["class_names"] == offline.class_names and card["report"]["metrics"]["site-B"]["auroc"] is not None
        client.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def test_same_config_and_seed_give_the_same_metrics(run, tmp_path):
    env = run["env"]
    proc = subprocess.run([sys.executable, "-m", "remedis.cli", "run", str(SMOKE), "--output", str(tmp_path / "again"),
                           "--quiet", "--no-build"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads((run["out"] / "report.json").read_text())
    second = json.loads((tmp_path / "again" / "report.json").read_text())
    assert [m["sites"] for m in first["models"]] == [m["sites"] for m in second["models"]]


def test_cli_reports_bad_config_key_without_traceback(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("adapt:\n  epocs: 3\n")
    proc = subprocess.run([sys.executable, "-m", "remedis.cli", "run", str(cfg), "--output", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown config key 'adapt.epocs'" in proc.stderr and "Traceback" not in proc.stderr
