"""A config's label map on a manifest that `remedis run` wrote (labels mapped already): `remedis evaluate
--config C --manifest RUN/manifest.csv` must read it as the run did (issue 29)."""

from __future__ import annotations

from pathlib import Path

import pytest

from remedis.config import ConfigError, DataConfig
from remedis.data.manifest import Manifest, Record
from remedis.stages import prepare_records

MAP = {"benign": "not_malignant", "normal": "not_malignant"}


def _manifest(labels: list[str]) -> Manifest:
    return Manifest([Record(Path(f"/x/{i}.png"), lab, "BUSI", f"p{i}") for i, lab in enumerate(labels)])


def test_the_run_manifest_with_mapped_labels_reads_like_the_original():
    data = DataConfig(label_map=MAP, positive_label="malignant")
    original = prepare_records(_manifest(["benign", "normal", "malignant"] * 10), data, 0)
    written = prepare_records(original.manifest, data, 0)  # the run's manifest: labels already mapped
    assert written.task == original.task and written.task.class_names == ["malignant", "not_malignant"]
    assert [r.label for r in written.records] == [r.label for r in original.records]


def test_a_map_that_names_nothing_in_the_manifest_still_fails_with_its_labels():
    data = DataConfig(label_map=MAP, positive_label="malignant")
    with pytest.raises(ConfigError, match=r"data.label_map: label\(s\) \['benign', 'normal'\] do not occur"):
        prepare_records(_manifest(["cat", "dog", "malignant"] * 5), data, 0)
