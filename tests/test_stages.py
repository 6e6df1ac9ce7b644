"""The stage API (`remedis.stages`): data preparation shared by `run`, `adapt` and `evaluate`."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from remedis.config import ConfigError, DataConfig
from remedis.data.manifest import Manifest, Record
from remedis.data.splits import carve_validation
from remedis.stages import budget_fraction, prepare_records


def _records(split_of=lambda i: "train" if i % 5 else "test", sites=("A",), n=100):
    return [Record(image=f"/x/{s}/{i}-{v}.png", label="ab"[i % 2], site=s, patient_id=f"{s}{i}", split=split_of(i))
            for s in sites for i in range(n) for v in range(2)]


def test_carve_validation_moves_whole_train_patients_only():
    records = _records()
    carved = carve_validation(records, 0.2, seed=0)
    assert [r.image for r in carved] == [r.image for r in records]
    assert [r.split for r in carved if r.split == "test"] == [r.split for r in records if r.split == "test"]
    val_patients = {r.patient_id for r in carved if r.split == "val"}
    train_patients = {r.patient_id for r in carved if r.split == "train"}
    assert val_patients and not val_patients & train_patients
    assert {r.label for r in carved if r.split == "val"} == {"a", "b"}  # stratified: both classes
    n_train_before = len({r.patient_id for r in records if r.split == "train"})
    assert len(val_patients) == pytest.approx(0.2 * n_train_before, abs=2)
    assert carve_validation(records, 0.2, seed=0) == carved  # seeded
    assert carve_validation(records, 0.2, seed=1) != carved


def test_prepare_records_carves_val_and_says_so():
    prepared = prepare_records(Manifest(_records()), DataConfig(), seed=0)
    assert {r.split for r in prepared.records} == {"train", "val", "test"}
    assert prepared.validation["A"].startswith("carved from train: 20% of the train patients")
    assert prepared.task.class_names == ["a", "b"] and prepared.task.positive_class == "b"


def test_prepare_records_keeps_manifest_splits_and_assigns_missing_ones():
    with_val = prepare_records(Manifest(_records(lambda i: ["train", "val", "test"][i % 3])), DataConfig(), seed=0)
    assert with_val.validation == {"A": "manifest"}
    none = prepare_records(Manifest(_records(lambda i: None, sites=("A", "B"))), DataConfig(), seed=0)
    assert none.validation["A"].startswith("assigned by patient (0.6/0.2/0.2")
    assert {r.split for r in none.records} == {"train", "val", "test"}


def test_prepare_records_checks_sites_labels_and_label_map():
    m = Manifest(_records())
    with pytest.raises(ConfigError, match="site 'Z' is not in"):
        prepare_records(m, DataConfig(), seed=0, sites=["Z"])
    with pytest.raises(ConfigError, match=r"data.label_map: label\(s\) \['c'\]"):
        prepare_records(m, DataConfig(label_map={"c": "a"}), seed=0)
    with pytest.raises(ConfigError, match="at least two classes"):
        prepare_records(m, DataConfig(label_map={"b": "a"}), seed=0)
    with pytest.raises(ConfigError, match="data.positive_label"):
        prepare_records(m, DataConfig(positive_label="c"), seed=0)


def test_a_run_config_applies_to_a_one_site_manifest():
    """`remedis adapt --config configs/breast_ultrasound.yaml` on the target site's own manifest: the config's
    split override for the source site and its label-map key for a label this site lacks are not errors."""
    records = [replace(r, label={"a": "benign", "b": "malignant"}[r.label]) for r in _records()]
    data = DataConfig(label_map={"benign": "not_malignant", "normal": "not_malignant"},
                      site_split_fractions={"BUS-BRA": [0.8, 0.1, 0.1]})
    prepared = prepare_records(Manifest(records), data, seed=0, sites=["A"])
    assert prepared.task.class_names == ["malignant", "not_malignant"]


def test_budget_fraction_is_one_definition():
    assert budget_fraction(0.1, 500) == 0.1
    assert budget_fraction(50, 500) == 0.1
    assert budget_fraction(900, 500) == 1.0


def test_multiclass_report_keys_per_class_auroc_by_class_name():
    from remedis.adapt.model import AdaptedModel
    from remedis.data.dataset import ImageCache
    from remedis.data.preprocess import Preprocessing
    from remedis.evaluate.evaluation import EvalInputs, evaluate_adapted
    from remedis.models.classifier import Classifier

    torch.manual_seed(0)
    names = ["akiec", "bcc", "mel", "nv"]
    model = AdaptedModel(Classifier("resnet18", 4, 1), names, Preprocessing(32, 1))
    rng = np.random.default_rng(0)
    records = [Record(image=f"/x/{i}.png", label=names[i % 4], site="S", patient_id=f"p{i}", split="test") for i in range(40)]
    test = ImageCache(records, torch.as_tensor(rng.random((40, 1, 32, 32)), dtype=torch.float16), model.preprocessing)
    entry = evaluate_adapted(model, EvalInputs(test=test, target_site="S", roles={"S": "target"}), n_boot=20, seed=0)
    per_class = entry["sites"]["S"]["per_class_auroc"]
    assert list(per_class) == names
    # one-vs-rest AUROC of each class, cross-checked against scikit-learn on the model's own probabilities
    from sklearn.metrics import roc_auc_score

    logits, _ = model.infer(test.pixels)
    probs = torch.as_tensor(logits).float().softmax(1).numpy()
    y = np.array([names.index(r.label) for r in records])
    for c, name in enumerate(names):
        assert per_class[name]["auroc"] == pytest.approx(roc_auc_score(y == c, probs[:, c]), abs=1e-6)


def test_no_val_or_test_image_of_any_site_reaches_simclr(tmp_path):
    """The SimCLR corpus of `remedis run` (in memory and as shards) is the train split of every site: a test
    patient's image never shapes the representation its model is measured with."""
    from remedis.commands.run import _pretraining_corpora, prepare
    from remedis.config import RunConfig

    cfg = RunConfig.from_yaml(None, ["data.synthetic.patients_per_site=12", "data.synthetic.image_size=32",
                                     "data.image_size=32", "data.stream=false"])
    data = prepare(cfg, tmp_path)
    train = [r for r in data.prepared.records if r.split == "train"]
    assert {r.split for r in data.prepared.records} == {"train", "val", "test"}
    _, corpus = _pretraining_corpora(data, tmp_path)
    assert {r.split for r in corpus.records} == {"train"} and len(corpus) == len(train)
    assert {r.site for r in corpus.records} == {r.site for r in data.prepared.records}
    streamed = replace(data, cfg=replace(data.cfg, data=replace(data.cfg.data, stream=True)))
    _, shards = _pretraining_corpora(streamed, tmp_path)
    assert shards.images == len(train)  # the shards hold exactly the train images
