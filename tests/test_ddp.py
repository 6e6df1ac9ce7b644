"""Lightning DDP with 2 CPU processes (gloo): SimCLR gathers embeddings across processes, so one step on
a global batch split over two processes gives the same loss and weights as one process on that batch."""

import json
import subprocess
import sys

import numpy as np
from conftest import ROOT


def _run(mode: str, out) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_simclr_step.py"), mode, str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_two_process_ddp_matches_one_process_on_the_same_global_batch(tmp_path):
    single, ddp = _run("single", tmp_path / "single.json"), _run("ddp", tmp_path / "ddp.json")
    assert single["world_size"] == 1 and ddp["world_size"] == 2
    assert abs(single["loss"] - ddp["loss"]) < 1e-4, (single["loss"], ddp["loss"])
    assert single["max_change"] > 1e-4  # the step moved the weights
    np.testing.assert_allclose(ddp["grads"], single["grads"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(ddp["weights"], single["weights"], atol=1e-6)
    # and the gather matters: without it each process would see 4 images (fewer negatives, lower loss)
    assert single["loss"] > np.log(7) - 0.5
