"""Only training is distributed: ranks from the launchers' environment, the primary prepares data first
while the others wait for its marker, and `remedis pretrain simclr` on 2 CPU ranks (Lightning's own
launcher, gloo) prepares once, trains on both ranks and reports once."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT

from remedis import distributed
from remedis.data.synthetic import SyntheticSpec, generate_synthetic
from remedis.models.checkpoint import load_checkpoint

LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE",
               "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID")


@pytest.fixture
def launch(monkeypatch):
    """Set a launcher's environment variables (all others cleared)."""
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)

    def set_env(**env: int) -> None:
        for name, value in env.items():
            monkeypatch.setenv(name, str(value))

    return set_env


def test_ranks_from_each_launcher(launch):
    assert (distributed.rank(), distributed.world_size(), distributed.is_primary()) == (0, 1, True)
    launch(RANK=3, LOCAL_RANK=1, WORLD_SIZE=8, GROUP_RANK=1)  # torchrun
    assert (distributed.rank(), distributed.local_rank(), distributed.world_size()) == (3, 1, 8)
    assert not distributed.is_primary()


def test_lightning_launcher_and_slurm(launch):
    launch(LOCAL_RANK=1, NODE_RANK=0, WORLD_SIZE=2)  # a child of Lightning's launcher
    assert (distributed.rank(), distributed.is_primary()) == (1, False)
    launch(LOCAL_RANK=0, NODE_RANK=1)  # the first process on the second node: never the primary
    assert distributed.rank() >= 1 and not distributed.is_primary()
    launch(LOCAL_RANK=0, NODE_RANK=0, SLURM_NTASKS=4, SLURM_PROCID=2)  # srun decides
    assert distributed.rank() == 2


def test_primary_does_the_work_once(launch, tmp_path):
    marker = tmp_path / "prep" / ".done"
    with distributed.primary_first(marker) as mine:
        assert mine
    assert json.loads(marker.read_text())["rank"] == 0
    with distributed.primary_first(marker) as mine:  # done already: nobody repeats it
        assert not mine
    failing = tmp_path / "other" / ".done"
    with pytest.raises(RuntimeError, match="disk full"):
        with distributed.primary_first(failing):
            raise RuntimeError("disk full")
    assert not failing.exists() and "disk full" in failing.with_name(".done.failed").read_text()


def test_other_ranks_wait_for_the_marker(launch, tmp_path):
    launch(RANK=1, WORLD_SIZE=2)
    marker = tmp_path / ".done"
    threading.Timer(0.2, lambda: marker.write_text("{}")).start()
    start = time.monotonic()
    with distributed.primary_first(marker, poll=0.02) as mine:
        assert not mine
    assert time.monotonic() - start >= 0.15
    with pytest.raises(distributed.PrimaryWaitError, match=r"waited 0 s for .*never\.done.*shares"):
        with distributed.primary_first(tmp_path / "never.done", timeout=0.1, poll=0.02):
            pass


def test_waiting_ranks_stop_when_the_primary_fails(launch, tmp_path):
    launch(RANK=1, WORLD_SIZE=2)
    marker = tmp_path / ".done"
    failed = tmp_path / ".done.failed"
    failed.write_text("an earlier launch's failure")  # stale: not this launch's
    os.utime(failed, ns=(1, 1))
    threading.Timer(0.2, lambda: failed.write_text("ManifestError: all.csv: row 7: empty 'site'")).start()
    with pytest.raises(distributed.PrimaryWaitError, match="rank 0 failed.*row 7"):
        with distributed.primary_first(marker, timeout=10, poll=0.02):
            pass


def test_pretrain_simclr_on_two_cpu_ranks(tmp_path):
    manifest = generate_synthetic(tmp_path / "data", SyntheticSpec(patients_per_site=8, max_images_per_patient=2,
                                                                   image_size=16))
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(REMEDIS_PROGRESS_SECONDS="0", OMP_NUM_THREADS="1")
    sets = ["data.image_size=16", "pretrain.simclr.epochs=1", "pretrain.simclr.max_steps_per_epoch=2",
            "pretrain.simclr.batch_size=2", "runtime.devices=2", "runtime.accelerator=cpu", "runtime.precision=fp32",
            "runtime.threads=1"]
    cmd = [sys.executable, "-m", "remedis.cli", "pretrain", "simclr", str(manifest), "--output", str(out)]
    proc = subprocess.run(cmd + [a for s in sets for a in ("--set", s)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = proc.stdout + proc.stderr
    assert logs.count("[pretrain data] preparing") == 1  # rank 0 prepared ...
    assert logs.count("simclr shards:") == 1 and logs.count("wrote ") == 1  # ... and wrote the shards once,
    assert "images decoded" not in logs  # which both ranks stream (no rank decodes the corpus into memory)
    assert len(list((out / "prepared").iterdir())) == 1
    steps = re.findall(r"simclr epoch 1/1 step \d+/(\d+) \(", logs)  # a line per step at interval 0 ...
    assert steps and len(steps) == int(steps[0])  # ... from rank 0 only
    assert proc.stdout.count("simclr backbone:") == 1  # the summary, from rank 0 only
    state, meta = load_checkpoint(out / "backbones" / "remedis")
    assert meta["kind"] == "backbone" and meta["stage_history"][-1]["stage"] == "simclr" and state
    assert not [p.name for p in (out / "backbones").iterdir() if p.name.startswith(".")]  # no temp folders left
    assert logs.count("SimCLR: NT-Xent") == 1  # the backbone folder is written by rank 0 alone


def test_pretrain_supervised_then_simclr_in_one_process(tmp_path, capsys):
    from remedis.cli import main

    manifest = generate_synthetic(tmp_path / "data", SyntheticSpec(patients_per_site=4, max_images_per_patient=2,
                                                                   image_size=16))
    out = tmp_path / "central"
    sets = ["data.image_size=16", "runtime.accelerator=cpu", "runtime.precision=fp32", "pretrain.supervised.epochs=1",
            "pretrain.supervised.max_steps_per_epoch=1", "pretrain.simclr.epochs=1", "pretrain.simclr.max_steps_per_epoch=1",
            "pretrain.simclr.batch_size=4"]
    common = ["--output", str(out), "--quiet", *[a for s in sets for a in ("--set", s)]]
    assert main(["pretrain", "supervised", str(manifest), "--site", "site-A", *common]) == 0
    assert main(["pretrain", "simclr", str(manifest), "--init", str(out), *common]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"supervised backbone: {out / 'backbones' / 'supervised'} (resnet18, ")
    assert "of site-A, 1 epoch" in printed[0]
    assert printed[1].startswith(f"simclr backbone: {out / 'backbones' / 'remedis'} (") and "NT-Xent" in printed[1]
    _, meta = load_checkpoint(out / "backbones" / "remedis")
    assert [h["stage"] for h in meta["stage_history"]] == ["supervised", "simclr"]
    assert main(["pretrain", "simclr", str(manifest), "--init", str(out), *common]) == 0  # finished: reused
    assert "finished earlier, reused" in capsys.readouterr().out
