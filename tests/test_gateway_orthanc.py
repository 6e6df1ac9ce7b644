"""The gateway against a real PACS (Orthanc, Debian) and dcmtk: tests/netns/orthanc_gateway.py run inside a
private network namespace, where only loopback exists (Orthanc 1.10 binds every interface).

Needs root (for `unshare --net`), Orthanc with its DICOMweb plugin, dcmtk and ../shared/data; `make test`
installs the Debian packages when it runs as root. Skips with the reason otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from gateway_support import dcmtk_tool

INNER = Path(__file__).resolve().parent / "netns" / "orthanc_gateway.py"
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "unshare --net needs root"
    for tool in ("unshare", "ip", "Orthanc", "dsrdump", "storescu"):
        if (dcmtk_tool(tool) if tool in ("dsrdump", "storescu") else shutil.which(tool)) is None:
            return f"{tool} not found (apt-get install orthanc orthanc-dicomweb dcmtk)"
    if not PLUGIN.is_file():
        return f"{PLUGIN} not found (apt-get install orthanc-dicomweb)"
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True)
    if probe.returncode != 0:
        return "unshare --net is not permitted here"
    return None


def test_gateway_with_orthanc_and_dcmtk_in_a_private_network(shared_data):
    reason = _missing()
    if reason:
        pytest.skip(reason)
    inner = f"ip link set lo up && exec {sys.executable} -m pytest -q -p no:cacheprovider -rA {INNER}"
    proc = subprocess.run(["unshare", "--net", "sh", "-c", inner], cwd=ROOT, capture_output=True, text=True, timeout=900)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-3000:]
    assert "5 passed" in proc.stdout, proc.stdout[-3000:]
