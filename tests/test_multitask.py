"""The multi-task supervised upstream (issue 20): a head per task on one backbone, tasks mixed by their
weights, per-task validation metrics, grey and colour together, resume to identical weights, and the
`remedis pretrain supervised --config` command over several manifests."""

from __future__ import annotations

import csv
import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from remedis.config import RunConfig
from remedis.data import ImageCache, Preprocessing, Record
from remedis.pretrain.multitask import MultiTaskClassifier, MultiTaskDataset, MultiTaskModule, TaskMixSampler, UpstreamTask

SIZE = 16


def _images(kind: str, n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Easy synthetic tasks: grey binary (a bright centre), colour 3-class (the dominant channel),
    grey multi-label (left half bright: a; right half bright: b)."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    if kind == "grey":
        y = rng.integers(0, 2, n)
        x = torch.rand(n, 1, SIZE, SIZE, generator=g) * 0.4
        x[:, :, 4:12, 4:12] += torch.as_tensor(y, dtype=torch.float32)[:, None, None, None] * 0.5
        return x, [["normal", "lesion"][k] for k in y]
    if kind == "colour":
        y = rng.integers(0, 3, n)
        x = torch.rand(n, 3, SIZE, SIZE, generator=g) * 0.4
        x[torch.arange(n), torch.as_tensor(y)] += 0.5
        return x, [["red", "green", "blue"][k] for k in y]
    y = rng.integers(1, 4, n)  # 1: a, 2: b, 3: a|b
    x = torch.rand(n, 1, SIZE, SIZE, generator=g) * 0.4
    x[:, :, :, :8] += torch.as_tensor(y & 1, dtype=torch.float32)[:, None, None, None] * 0.5
    x[:, :, :, 8:] += torch.as_tensor(y >> 1 & 1, dtype=torch.float32)[:, None, None, None] * 0.5
    return x, [{1: "a", 2: "b", 3: "a|b"}[int(k)] for k in y]


def _cache(kind: str, n: int, seed: int, in_chans: int = 3) -> ImageCache:
    x, labels = _images(kind, n, seed)
    recs = [Record(Path(f"{kind}{seed}-{i}.png"), lab, kind, f"{kind}-p{seed}-{i}") for i, lab in enumerate(labels)]
    return ImageCache(recs, x.half(), Preprocessing(SIZE, in_chans=in_chans, channels=x.shape[1]))


TASKS = [UpstreamTask("grey", ["lesion", "normal"], 0), UpstreamTask("colour", ["blue", "green", "red"], 2, weight=2.0),
         UpstreamTask("multi", ["a", "b"], 1, multi_label=True)]


def test_a_head_per_task_on_one_backbone():
    model = MultiTaskClassifier("test_resnet", TASKS, in_chans=3)
    assert {k: v.out_features for k, v in model.heads.items()} == {"grey": 2, "colour": 3, "multi": 2}
    x, task = torch.rand(5, 3, SIZE, SIZE), torch.tensor([1, 1, 0, 1, 1])
    model.eval()
    out = model(x, task)
    assert set(out) == {0, 1} and out[0].shape == (1, 2) and out[1].shape == (4, 3)  # absent task 2: no entry
    assert torch.allclose(out[1], model.heads["colour"](model.embed(x[task == 1])), atol=1e-5)


def test_mixing_weights_are_honoured_and_epochs_reproducible():
    sizes, weights = [400, 20, 80], [1.0, 2.0, 1.0]
    sampler = TaskMixSampler(sizes, weights, seed=3, length=8000)
    keys = list(sampler)
    g = np.array([k for k, _ in keys])
    task = np.searchsorted(np.cumsum(sizes), g, side="right")
    share = np.bincount(task, minlength=3) / len(g)
    assert np.allclose(share, [0.25, 0.5, 0.25], atol=0.02), share  # 3 sigma is about 0.017
    counts = np.bincount(g[task == 1] - 400, minlength=20)  # every image of a task before any repeat
    assert counts.max() - counts.min() <= 1
    assert keys == list(TaskMixSampler(sizes, weights, seed=3, length=8000))
    sampler.set_epoch(1)
    again = list(sampler)
    assert all(e == 1 for _, e in again) and [k for k, _ in again] != [k for k, _ in keys]
    assert len(TaskMixSampler(sizes, weights)) == 500  # default epoch: all images once on average
    with pytest.raises(ValueError, match="weights"):
        TaskMixSampler([10, 10], [1.0, 0.0])


def test_task_losses_equal_the_single_task_losses():
    module = MultiTaskModule(MultiTaskClassifier("test_resnet", TASKS), TASKS,
                             [torch.tensor([3.0, 0.6]), None, None])
    torch.manual_seed(0)
    task = torch.tensor([0, 0, 1, 2, 0, 1, 2, 2])
    target = torch.zeros(8, 3)
    y0, y1 = torch.tensor([1, 0, 1]), torch.tensor([2, 0])
    target[task == 0, y0], target[task == 1, y1] = 1.0, 1.0
    target[task == 2, :2] = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    logits = {0: torch.randn(3, 2), 1: torch.randn(2, 3), 2: torch.randn(3, 2)}
    got = module.task_losses(logits, target, task)
    # each task's summed loss is its count times the loss a single-task run would report (weighted mean)
    assert torch.allclose(got[0], 3 * F.cross_entropy(logits[0], y0, weight=torch.tensor([3.0, 0.6])))
    assert torch.allclose(got[1], 2 * F.cross_entropy(logits[1], y1))
    assert torch.allclose(got[2], 3 * F.binary_cross_entropy_with_logits(logits[2], target[task == 2, :2]))


def test_grey_and_colour_tasks_train_one_backbone_with_per_task_metrics(tmp_path):
    from remedis.models.checkpoint import load_checkpoint
    from remedis.pretrain.jobs import train_multitask

    cfg = _cfg(epochs=4)
    train = [_cache("grey", 160, 0), _cache("colour", 120, 1), _cache("multi", 120, 2)]
    val = [_cache("grey", 60, 10), _cache("colour", 60, 11), _cache("multi", 60, 12)]
    ds = MultiTaskDataset(train, TASKS)
    x, row, t = ds[len(train[0]) + 5]  # a colour image: 3 channels, one-hot over its 3 classes
    assert x.shape == (3, SIZE, SIZE) and t == 1 and row.sum() == 1 and row.shape == (3,)
    x, row, t = ds[0]  # a grey image repeated to the backbone's 3 channels
    assert x.shape == (3, SIZE, SIZE) and torch.equal(x[0], x[1]) and t == 0

    folder = train_multitask(cfg, TASKS, train, val, tmp_path / "backbones" / "supervised", progress=False)
    state, meta = load_checkpoint(folder)
    assert meta["in_chans"] == 3 and next(v for v in state.values() if v.ndim == 4).shape[1] == 3
    (stage,) = meta["stage_history"]
    assert stage["multitask"] and [t["name"] for t in stage["tasks"]] == ["grey", "colour", "multi"]
    assert [t["channels"] for t in stage["tasks"]] == [1, 3, 1]
    # a site adapting it decodes colour (the first task is grey: the backbone must not record grey decoding)
    assert meta["preprocessing"]["channels"] == 3 and meta["preprocessing"]["in_chans"] == 3
    assert [t["weight"] for t in stage["tasks"]] == [1.0, 2.0, 1.0]
    epochs = stage["epochs"]
    assert len(epochs) == 4 and all(set(e["tasks"]) == {"grey", "colour", "multi"} for e in epochs)
    best = max(epochs, key=lambda e: e["val_auroc"])
    assert best["val_auroc"] == pytest.approx(np.mean([v["val_auroc"] for v in best["tasks"].values()]))
    # easy tasks: each head learns its own task through the shared backbone
    assert all(v["val_auroc"] > 0.75 for v in best["tasks"].values()), best  # chance: 0.5
    seen = [epochs[-1]["tasks"][n]["train_samples_seen"] for n in ("grey", "colour", "multi")]
    assert seen[1] / sum(seen) == pytest.approx(0.5, abs=0.06)  # weight 2 of 4


def _cfg(epochs: int) -> RunConfig:
    cfg = RunConfig()
    cfg.data.image_size, cfg.model.backbone, cfg.model.in_chans = SIZE, "test_resnet", 3
    cfg.runtime.precision, cfg.runtime.threads = "fp32", 1
    sc = cfg.pretrain.supervised
    sc.epochs, sc.batch_size, sc.lr = epochs, 32, 3e-3
    return cfg


def _write_kit(root: Path, kind: str, sites: list[str], n: int) -> Path:
    rows = []
    for s, site in enumerate(sites):
        x, labels = _images(kind, n, seed=s + 5)
        for i, (img, lab) in enumerate(zip(x, labels)):
            arr = (img.clamp(0, 1) * 255).byte()
            path = root / kind / site / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr[0].numpy() if arr.shape[0] == 1 else arr.permute(1, 2, 0).numpy()).save(path)
            rows.append({"image": str(path.relative_to(root / kind)), "label": lab, "site": site, "patient_id": f"{site}-{i // 2}"})
    manifest = root / kind / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "label", "site", "patient_id"])
        w.writeheader()
        w.writerows(rows)
    return manifest


def _config(tmp_path: Path, epochs: int = 4) -> Path:
    grey = _write_kit(tmp_path, "grey", ["ward-1", "ward-2"], 60)
    colour = _write_kit(tmp_path, "colour", ["derm-1"], 90)
    cfg = tmp_path / "foundation.yaml"
    cfg.write_text(f"""
seed: 0
data: {{image_size: {SIZE}}}
model: {{backbone: test_resnet, in_chans: 3}}
pretrain:
  supervised:
    epochs: {epochs}
    batch_size: 16
    tasks:
      - {{name: ward, manifest: {grey}, sites: [ward-1], label_map: {{normal: normal, lesion: lesion}}, positive_label: lesion}}
      - {{name: derm, manifest: {colour}, weight: 2}}
runtime: {{precision: fp32, threads: 1}}
""")
    return cfg


def _pretrain(cfg: Path, out: Path, *extra: str) -> int:
    """The command in this process. The config pins one torch thread, so runs here and in a subprocess do
    the same arithmetic (a different thread count changes float sums, and the resume test compares bits);
    this process's thread count is restored afterwards."""
    from remedis.cli import main

    threads = torch.get_num_threads()
    try:
        return main(["pretrain", "supervised", "--config", str(cfg), "-o", str(out), "--quiet", *extra])
    finally:
        torch.set_num_threads(threads)


def _pretrain_process(cfg: Path, out: Path, script: Path | None = None) -> subprocess.CompletedProcess:
    """The command in a fresh process (`script`: a wrapper that runs it). Every run whose weights are
    compared runs in its own process: state an earlier test left in this one could change the arithmetic."""
    head = [str(script)] if script else ["-m", "remedis.cli"]
    return subprocess.run([sys.executable, *head, "pretrain", "supervised", "--config", str(cfg), "-o", str(out)],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run of the command and its config."""
    root = tmp_path_factory.mktemp("multitask")
    cfg = _config(root)
    done = _pretrain_process(cfg, root / "reference")
    assert done.returncode == 0, done.stderr[-3000:]
    return cfg, root / "reference"


def _digest(run: Path) -> str:
    return hashlib.sha256((run / "backbones" / "supervised" / "model.safetensors").read_bytes()).hexdigest()


def test_pretrain_command_trains_on_every_task_and_records_them(reference, tmp_path, capsys):
    cfg, out = reference
    root = cfg.parent
    meta = json.loads((out / "backbones" / "supervised" / "meta.json").read_text())
    tasks = {t["name"]: t for t in meta["stage_history"][0]["tasks"]}
    assert tasks["ward"]["sites"] == ["ward-1"] and tasks["derm"]["sites"] == ["derm-1"]  # ward-2 was not given
    assert tasks["ward"]["channels"] == 1 and tasks["derm"]["channels"] == 3 and meta["in_chans"] == 3
    assert meta["preprocessing"]["channels"] == 3  # `remedis adapt` from it keeps a colour site's colour
    assert tasks["ward"]["manifest_sha256"] == hashlib.sha256((root / "grey" / "manifest.csv").read_bytes()).hexdigest()
    assert tasks["derm"]["class_names"] == ["blue", "green", "red"] and tasks["derm"]["weight"] == 2.0
    assert tasks["ward"]["train_images"] + tasks["ward"]["val_images"] < 60  # its test split is held out
    capsys.readouterr()
    assert _pretrain(cfg, out) == 0
    said = capsys.readouterr().out
    assert "2 tasks" in said and "ward" in said and "derm" in said and "reused" in said
    assert _pretrain(cfg, tmp_path / "other", str(root / "grey" / "manifest.csv")) == 2
    assert "give no MANIFEST" in capsys.readouterr().err


KILL_AT_EPOCH = """
import os, signal, sys

import lightning as L

import remedis.training as training

make_trainer = training.make_trainer


class Die(L.Callback):  # SIGKILL at the start of the third epoch: the second's resume state is on disk
    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == 2:
            os.kill(os.getpid(), signal.SIGKILL)


def dying_trainer(*args, **kwargs):
    trainer = make_trainer(*args, **kwargs)
    trainer.callbacks.append(Die())
    return trainer


training.make_trainer = dying_trainer  # before remedis.pretrain.jobs imports it
from remedis.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
"""


def test_killed_multitask_stage_resumes_to_identical_weights(reference, tmp_path):
    """SIGKILLed mid-stage (the process kills itself at a fixed epoch, so the test does not race a fast,
    or a slowed-down, training loop), then rerun: it resumes, to the same weights bit for bit."""
    cfg, ref = reference
    resumed = tmp_path / "resumed"
    script = tmp_path / "die.py"
    script.write_text(KILL_AT_EPOCH)
    killed = _pretrain_process(cfg, resumed, script)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    backbones = resumed / "backbones"
    assert list(backbones.glob(".supervised-*.resume.ckpt")) and not (backbones / "supervised" / "model.safetensors").exists()
    again = _pretrain_process(cfg, resumed)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr  # it resumed, not started over
    assert _digest(resumed) == _digest(ref)
    assert not list(backbones.glob(".supervised-*.resume.ckpt"))  # removed once the stage finished


def test_foundation_config_names_every_kit_and_keeps_the_targets_out(shared_data):
    from conftest import ROOT

    from remedis.data.manifest import read_manifest
    from remedis.stages import prepare_records

    cfg = RunConfig.from_yaml(ROOT / "configs" / "foundation.yaml")
    tasks = cfg.pretrain.supervised.tasks
    assert [t.name for t in tasks] == ["breast_ultrasound", "chest_xray", "dermoscopy", "ct_contrast"] and cfg.model.in_chans == 3
    held_out = {"BUSI", "NIH", "rosendahl"}
    for t in tasks:
        manifest = read_manifest(shared_data / Path(t.manifest).relative_to("../shared/data"), check_files=False)
        data = cfg.data.__class__(**{**cfg.data.__dict__, "label_map": t.label_map, "positive_label": t.positive_label})
        prepared = prepare_records(manifest, data, cfg.seed, sites=t.sites or None)
        sites = {r.site for r in prepared.records}
        assert not sites & held_out, (t.name, sites)
        assert prepared.task.positive_class == t.positive_label and len(prepared.task.class_names) >= 2


def test_remedis_run_refuses_tasks_instead_of_ignoring_them(tmp_path, capsys):
    from remedis.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("pretrain: {supervised: {tasks: [{name: a, manifest: a.csv}]}}\n")
    assert main(["run", str(cfg), "-o", str(tmp_path / "out"), "--no-build"]) == 2
    assert "remedis pretrain supervised" in capsys.readouterr().err
