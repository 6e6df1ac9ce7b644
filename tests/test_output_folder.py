"""A job that cannot write its results fails before any work, with the folder and the reason."""

import subprocess
import sys

import pytest

from remedis.stages import check_output_folder


def test_unwritable_and_full_output_folders_fail_early(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=r"output folder .*file/run: cannot write there"):
        check_output_folder(blocker / "run")
    with pytest.raises(ValueError, match=r"MiB free on its disk"):
        check_output_folder(tmp_path / "run", min_free_bytes=2**62)
    assert check_output_folder(tmp_path / "run").is_dir()
    assert not list((tmp_path / "run").iterdir())  # the write probe leaves nothing behind


def test_cli_reports_an_unwritable_output_in_one_line(tmp_path):
    from conftest import ROOT

    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "remedis.cli", "run", str(ROOT / "configs" / "smoke.yaml"),
                           "-o", str(blocker / "run"), "--no-build", "--quiet"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("remedis: error: output folder") and "Traceback" not in proc.stderr
