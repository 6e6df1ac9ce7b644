"""Streaming pretraining from litdata shards (issue 18): write once, quantised, reused; MICLe groups;
views a function of (seed, epoch, group); a run killed mid-epoch resumes to bit-identical weights."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from remedis.data.manifest import Record, read_manifest
from remedis.data.preprocess import Preprocessing
from remedis.data.readers import read_image
from remedis.data.shards import SIDECAR, ShardError, open_shards, source_bits, write_shards
from remedis.data.streaming import ShardDataset, ShardLoader, StreamingLabeled, StreamingTwoView, sample_pixels
from remedis.data.synthetic import SyntheticSpec, generate_synthetic
from remedis.training.transforms import SimCLRAugment

PRE = Preprocessing(24)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> list[Record]:
    """3 sites x 4 patients, 1-3 views each: site-A/B 8-bit PNG, site-C 12-bit DICOM."""
    manifest = generate_synthetic(tmp_path_factory.mktemp("synth"), SyntheticSpec(patients_per_site=4, image_size=32), seed=0)
    return read_manifest(manifest).records


@pytest.fixture(scope="module")
def singles(synth, tmp_path_factory):
    return write_shards(synth, PRE, tmp_path_factory.mktemp("shards") / "g1", num_workers=2)


def _by_hash(records) -> dict[str, Record]:
    return {hashlib.sha256(r.image.read_bytes()).hexdigest(): r for r in records}


def _raw(folder) -> list[dict]:
    ds = ShardDataset(folder, shuffle=False)
    return [ds[i] for i in range(len(ds))]


def _float_reference(path: Path, pre: Preprocessing) -> torch.Tensor:
    return pre.resize(read_image(path, **pre.read_options()))  # float32: what the quantised pixels approximate


def test_round_trip_within_quantisation_and_dtype_from_header(synth, singles):
    assert len(singles) == singles.images == len(synth) and not singles.failures
    assert sum(singles.meta["sites"].values()) == len(synth) and singles.sites == ["site-A", "site-B", "site-C"]
    by_hash = _by_hash(synth)
    seen = set()
    for sample in _raw(singles.folder):
        record = by_hash[sample["hashes"][0]]
        seen.add(record.image)
        deep = record.image.suffix == ".dcm"  # synthetic site-C: 12-bit DICOM
        assert sample["pixels"].dtype == (np.uint16 if deep else np.uint8)
        assert sample["pixels"].shape == (1, 1, 24, 24)
        err = (sample_pixels(sample)[0] - _float_reference(record.image, PRE)).abs().max().item()
        assert err <= (2 / 65535 if deep else 0.5 / 255 + 1e-6), (record.image.name, err)
        assert sample["label"] == record.label and sample["site"] == record.site
        assert sample["patient"] != record.patient_id and len(sample["patient"]) == 16
        assert sample["label_index"] == ["benign", "malignant"].index(record.label)
    assert len(seen) == len(synth)
    assert singles.meta["dtypes"] == {"uint8": sum(r.image.suffix == ".png" for r in synth),
                                      "uint16": sum(r.image.suffix == ".dcm" for r in synth)}


def test_ct_dicom_round_trips_within_one_grey_level(tmp_path):
    kit = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct-dicom" / "dicom"
    files = sorted(kit.glob("*.dcm"))[:3]
    if not files:
        from pydicom.data import get_testdata_file

        found = get_testdata_file("CT_small.dcm")
        if found is None:
            pytest.skip("no CT DICOM available")
        files = [Path(found)]
    records = [Record(f, "", "ct", f"patient-{i}") for i, f in enumerate(files)]
    pre = Preprocessing(32)
    shards = write_shards(records, pre, tmp_path / "ct")
    assert source_bits(files[0].read_bytes(), files[0].name) == 16
    by_hash = _by_hash(records)
    for sample in _raw(shards.folder):
        assert sample["pixels"].dtype == np.uint16
        ref = _float_reference(by_hash[sample["hashes"][0]].image, pre)
        assert (sample_pixels(sample)[0] - ref).abs().max().item() <= 2 / 65535


def test_same_inputs_reuse_the_folder_and_changes_are_refused(synth, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    records = []
    for r in synth[:5]:
        shutil.copy(r.image, src / r.image.name)
        records.append(dataclasses.replace(r, image=src / r.image.name))
    out = tmp_path / "shards"
    first = write_shards(records, PRE, out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = write_shards(records, PRE, out)
    assert again.reused and not first.reused and again.meta["content_key"] == first.meta["content_key"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps  # nothing rewritten

    os.utime(records[0].image, ns=(1, 1))  # touched, same bytes: reused after a content check
    assert write_shards(records, PRE, out).reused

    with pytest.raises(ShardError, match="preprocessing"):
        write_shards(records, Preprocessing(20), out)
    data = bytearray(records[1].image.read_bytes())
    shutil.copy(records[2].image, records[1].image)  # other pixels under the same name
    assert records[1].image.read_bytes() != bytes(data)
    with pytest.raises(ShardError, match="other source images"):
        write_shards(records, PRE, out)
    rewritten = write_shards(records, PRE, out, overwrite=True)
    assert not rewritten.reused and rewritten.meta["content_key"] != first.meta["content_key"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("chunk-")) == ["index.json", SIDECAR]
    assert not list(tmp_path.glob(".shards.writing-*"))
    with pytest.raises(ShardError, match="no readable remedis-shards.json"):
        open_shards(src)


def test_bad_files_are_skipped_with_reasons_and_no_patient_id_is_stored(synth, tmp_path):
    secret = "SECRET-PATIENT-4711"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / f"{secret}_a.png").write_bytes(b"this is not an image")
    (bad / f"{secret}_b.png").write_bytes(b"")
    (bad / f"{secret}_c.dcm").write_bytes(synth[-1].image.read_bytes()[:400] if synth[-1].image.suffix == ".dcm" else b"DICM")
    good = [dataclasses.replace(r, patient_id=f"{secret}-{i // 2}") for i, r in enumerate(synth[:4])]
    records = good + [Record(p, "benign", "site-X", secret) for p in sorted(bad.iterdir())]
    records.append(Record(bad / "missing.png", "benign", "site-X", secret))
    shards = write_shards(records, PRE, tmp_path / "shards", group_size=2)
    assert shards.images == 4 and len(shards.failures) == 4
    assert shards.meta["skipped"]["count"] == 4 and sum(shards.meta["skipped"]["reasons"].values()) == 4
    reasons = dict(shards.failures)
    assert reasons[f"{secret}_b.png"] == "empty file" and "cannot read file" in reasons["missing.png"]
    assert all(secret not in reason for reason in reasons.values())
    for path in (tmp_path / "shards").iterdir():
        data = path.read_bytes()
        assert secret.encode() not in data and b"SECRET" not in data, path.name


def test_micle_groups_hold_one_patient_and_views_depend_on_seed_epoch_group(synth, tmp_path):
    shards = write_shards(synth, PRE, tmp_path / "g3", group_size=3, seed=1)
    per_patient = {}
    for r in synth:
        per_patient.setdefault((r.site, r.patient_id), []).append(r)
    assert len(shards) == sum(-(-len(v) // 3) for v in per_patient.values())
    by_hash = _by_hash(synth)
    samples = _raw(shards.folder)
    for s in samples:
        owners = {(by_hash[h].site, by_hash[h].patient_id) for h in s["hashes"]}
        assert len(owners) == 1 and s["images"] == len(s["pixels"])
    multi = [s for s in samples if s["images"] >= 2]
    assert multi and shards.meta["multi_image_samples"] == len(multi)

    ds = StreamingTwoView(shards, SimCLRAugment(24, seed=0), seed=0)
    for s in multi:
        for epoch in range(4):
            i, j = ds.pick(s["group"], s["images"], epoch)
            assert i != j  # positives from two different images of the patient
    s = multi[0]
    a, b, c = ds.item(s, 0), ds.item(s, 0), ds.item(s, 1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (1, 24, 24) and not torch.equal(a[0], a[1])

    # through the loader: the first epoch is epoch 0, the second epoch 1, whatever the order
    class Keyed(StreamingTwoView):
        def item(self, sample, epoch):
            return sample["group"], super().item(sample, epoch)

    by_group = {x["group"]: x for x in samples}
    loader = ShardLoader(Keyed(shards, SimCLRAugment(24, seed=0), seed=0), 4, collate_fn=lambda batch: batch)
    orders = []
    for epoch in range(2):
        order = []
        for batch in loader:
            for group, views in batch:
                order.append(group)
                expected = ds.item(by_group[group], epoch)
                assert torch.equal(views[0], expected[0]) and torch.equal(views[1], expected[1])
        orders.append(order)
    assert sorted(orders[0]) == sorted(orders[1]) == sorted(by_group) and orders[0] != orders[1]


def test_one_process_epochs_shuffle_every_sample_and_drop_a_different_tail(synth, tmp_path):
    # litdata's local-folder default kept chunk stripes and trimmed each chunk's tail before shuffling:
    # with drop_last the same samples were never seen. Two chunks (two writers), batches of 4.
    records = synth[:22]
    shards = write_shards(records, PRE, tmp_path / "s", num_workers=2)

    class Groups(ShardDataset):
        def item(self, sample, epoch):
            return int(sample["group"])

    loader = ShardLoader(Groups(shards, seed=0), 4, drop_last=True)
    assert len(loader) == 22 // 4
    epochs = [[g for batch in loader for g in batch.tolist()] for _ in range(4)]
    for seen in epochs:
        assert len(seen) == 20 and len(set(seen)) == 20  # full batches only, no sample twice
    dropped = [frozenset(range(22)) - set(seen) for seen in epochs]
    assert len(set(dropped)) > 1 and set().union(*epochs) == set(range(22))
    assert len({tuple(seen) for seen in epochs}) == 4  # a new order every epoch


def test_labeled_stream_checks_classes_and_gives_targets(synth, singles):
    ds = StreamingLabeled(singles, ["benign", "malignant"], seed=0, shuffle=False)
    x, y = ds[0]
    assert x.shape == (1, 24, 24) and y.dtype == torch.long and int(y) == _raw(singles.folder)[0]["label_index"]
    assert torch.bincount(ds.targets()).tolist() == [sum(r.label == c for r in synth) for c in ("benign", "malignant")]
    with pytest.raises(ValueError, match="not among the model's classes"):
        StreamingLabeled(singles.folder, ["benign"])
    with pytest.raises(ValueError, match="write shards for this preprocessing"):
        StreamingLabeled(singles.folder, ["benign", "malignant"], preprocessing=Preprocessing(32))


def test_cli_shard_writes_then_reuses(synth, tmp_path, capsys):
    import argparse

    from remedis.commands.data import register
    from remedis.data.manifest import write_manifest

    manifest = write_manifest(synth[:6], tmp_path / "m.csv")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    for _ in range(2):
        args = parser.parse_args(["data", "shard", str(manifest), "-o", str(tmp_path / "s"), "--image-size", "24",
                                  "--group-size", "2"])
        assert args.func(args) == 0
    first, second = capsys.readouterr().out.strip().splitlines()
    assert "6 images, 0 skipped" in first and str(tmp_path / "s") in first and "(reused)" in second


def test_killed_mid_epoch_resumes_from_shards_to_identical_weights(synth, tmp_path, monkeypatch):
    from remedis.config import RunConfig
    from remedis.pretrain import jobs
    from remedis.training import EpochCheckpoint, quiet_lightning

    quiet_lightning()
    shards = write_shards(synth, PRE, tmp_path / "shards", group_size=2)
    cfg = RunConfig()
    sc = dataclasses.replace(cfg.pretrain.simclr, epochs=2, batch_size=4, max_steps_per_epoch=3, projection_dim=16)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone="resnet10t"),
                              data=dataclasses.replace(cfg.data, image_size=24),
                              pretrain=dataclasses.replace(cfg.pretrain, simclr=sc),
                              runtime=dataclasses.replace(cfg.runtime, precision="fp32", accelerator="cpu",
                                                          checkpoint_every_steps=1))

    def train(name: str) -> str:
        out = jobs.train_simclr(cfg, shards.folder, None, tmp_path / name / "backbones" / "remedis", None, progress=False,
                                stage_key="k")
        return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()

    class Killed(Exception):
        pass

    reference = train("reference")
    step_end, epoch_end = EpochCheckpoint.on_train_batch_end, EpochCheckpoint.on_train_epoch_end

    def kill_after_step(self, trainer, *args):
        step_end(self, trainer, *args)
        if trainer.global_step == 2:  # mid-epoch 0, right after the step-2 state was written
            raise Killed

    def kill_after_epoch(self, trainer, module):
        epoch_end(self, trainer, module)
        if trainer.current_epoch == 0:  # the end-of-epoch state of a cut-short (max_steps_per_epoch) epoch
            raise Killed

    for name, hook, fn in (("mid", "on_train_batch_end", kill_after_step), ("end", "on_train_epoch_end", kill_after_epoch)):
        monkeypatch.setattr(EpochCheckpoint, hook, fn)
        with pytest.raises(Killed):
            train(name)
        assert list((tmp_path / name / "backbones").glob(".remedis-*.resume.ckpt"))
        monkeypatch.undo()
        assert train(name) == reference, name
        assert not list((tmp_path / name / "backbones").glob(".remedis-*.resume.ckpt"))
