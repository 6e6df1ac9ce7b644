"""Progress off a terminal: plain lines at an interval, naming the stage, step and percentage, never a
file path or a patient identifier; Lightning's bar only on a terminal."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from remedis import progress
from remedis.config import RuntimeConfig
from remedis.data.dataset import load_images
from remedis.data.manifest import read_manifest
from remedis.data.preprocess import Preprocessing
from remedis.data.synthetic import SiteSpec, SyntheticSpec, generate_synthetic
from remedis.training import make_trainer


class FakeClock:
    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_format_line_and_duration():
    line = progress.format_line("simclr", 120, 400, 85.2, epoch=3, epochs=20, fraction=0.115,
                                metrics={"nt_xent": 4.2134}, eta=372)
    assert line == "simclr epoch 3/20 step 120/400 (12%) 85 img/s nt_xent 4.21 eta 6m"
    assert progress.format_line("decode", 5, None, 2.5) == "decode 5 2.5 img/s"  # unknown total: no percentage
    assert [progress.format_duration(s) for s in (45, 372, 3900)] == ["45s", "6m", "1h05m"]


def test_loop_lines_at_the_interval_then_a_last_line():
    lines: list[str] = []
    with progress.Progress("shards", total=100, unit="img", interval=30, bar=False, write=lines.append,
                           clock=FakeClock(10)) as p:  # every call advances 10 s
        for _ in range(10):
            p.update(10)
    assert lines[0].startswith("shards 30/100 (30%)") and "img/s" in lines[0] and "eta" in lines[0]
    assert len(lines) == 4 and lines[-1].startswith("shards 100/100 (100%)") and "done in" in lines[-1]
    quiet: list[str] = []
    with progress.Progress("shards", total=3, interval=30, bar=False, write=quiet.append) as p:
        p.update(3)
    assert quiet == []  # a short loop says nothing


def test_reporter_takes_absolute_counts():
    lines: list[str] = []
    report = progress.reporter("shards", "group", interval=0, bar=False, write=lines.append)
    for done in (2, 5, 5, 8):
        report(done, 8)
    assert lines[0].startswith("shards 2/8 (25%)") and "group/s" in lines[0]
    assert lines[-1].startswith("shards 8/8 (100%)") and "done in" in lines[-1]


def test_emit_without_logging_goes_to_stderr(capsys):
    level = progress.log.level
    progress.log.setLevel(logging.WARNING)
    try:
        progress.emit("decode 1/2 (50%)")
    finally:
        progress.log.setLevel(level)
    assert capsys.readouterr().err == "remedis: decode 1/2 (50%)\n"


def test_decoding_piped_shows_lines_without_paths_or_patients(tmp_path, monkeypatch):
    sites = (SiteSpec("site-A", speckle=0.2, gain=1.0, blur=0.5, resolution=1.0, gamma=1.0),)
    manifest = read_manifest(generate_synthetic(tmp_path, SyntheticSpec(sites=sites, patients_per_site=4,
                                                                        max_images_per_patient=1, image_size=16)))
    lines: list[str] = []
    monkeypatch.setattr(progress, "emit", lines.append)
    monkeypatch.setattr(progress, "interactive", lambda: False)  # as in a cluster log, even under a terminal
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")
    cache = load_images(manifest.records, Preprocessing(16))
    n = len(manifest.records)
    assert len(cache) == n and len(lines) == n + 1  # a line per image at interval 0, then the last one
    assert lines[0].startswith(f"decode 1/{n} (") and "%)" in lines[0] and "img/s" in lines[0]
    assert lines[-1].startswith(f"decode {n}/{n} (100%)")
    private = {str(tmp_path), *(r.image.name for r in manifest.records), *(r.patient_id for r in manifest.records)}
    assert not [(p, line) for line in lines for p in private if p in line]


class Toy(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _callbacks(trainer, name):
    return [c for c in trainer.callbacks if type(c).__name__ == name]


def test_training_lines_off_a_terminal(monkeypatch):
    monkeypatch.setattr(progress, "interactive", lambda: False)
    runtime = RuntimeConfig(precision="fp32", accelerator="cpu")
    trainer = make_trainer(runtime, epochs=2, progress=True, stage="toy")
    assert trainer.progress_bar_callback is None  # no bar of carriage returns in a log file
    (log_cb,) = _callbacks(trainer, "ProgressLog")
    lines: list[str] = []
    log_cb.write, log_cb.clock, log_cb.interval = lines.append, FakeClock(10), 30
    loader = DataLoader(TensorDataset(torch.randn(32, 4)), batch_size=8)  # 4 steps of 8 images per epoch
    trainer.fit(Toy(), loader)
    assert len(lines) >= 3, lines
    first = lines[0]
    assert first.startswith("toy epoch 1/2 step 3/4 (38%)") and "img/s" in first and "loss" in first and "eta" in first
    assert any(line.startswith("toy epoch 2/2 step") for line in lines)
    assert lines[-1].startswith("toy done: 8 steps in")


def test_bar_on_a_terminal(monkeypatch):
    monkeypatch.setattr(progress, "interactive", lambda: True)
    runtime = RuntimeConfig(precision="fp32", accelerator="cpu")
    on_tty = make_trainer(runtime, epochs=1, progress=True)
    assert on_tty.progress_bar_callback is not None and not _callbacks(on_tty, "ProgressLog")
    quiet = make_trainer(runtime, epochs=1, progress=False)  # --quiet: no bar, the 30-s lines remain
    assert quiet.progress_bar_callback is None and _callbacks(quiet, "ProgressLog")


def test_interval_from_the_environment(monkeypatch):
    monkeypatch.setenv(progress.INTERVAL_ENV, "0.05")
    assert progress.progress_interval() == 0.05
    monkeypatch.setenv(progress.INTERVAL_ENV, "soon")
    with pytest.raises(ValueError, match="REMEDIS_PROGRESS_SECONDS"):
        progress.progress_interval()
