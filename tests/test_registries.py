"""The registries where new kinds arrive: a new OOD score or image format is one registered class, and
everything that consults the registry takes it (the config, the detector, the reports; the readers, the
contract, the index). The gateway's result writers are exercised end to end in test_gateway.py."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from remedis.adapt.ood import OODDetector, all_scores, fit_ood_detector
from remedis.config import ConfigError, EvaluateConfig
from remedis.data.contract import describe_file
from remedis.data.formats import FORMATS, SourceInfo, format_of, register_format
from remedis.data.formats.base import ImageReadError, code, source_bytes, to_unit
from remedis.data.index import index_folder
from remedis.data.readers import read_image
from remedis.ood_scores import SCORES, LogitScore, get_score, register_score, score_names


@pytest.fixture
def entropy_score():
    """A score registered the way a new file would register it: the softmax entropy (higher = less sure)."""

    @register_score
    class Entropy(LogitScore):
        name = "entropy"

        def score(self, state, logits, embeddings):
            z = np.asarray(logits, dtype=np.float64)
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            return -(p * np.log(np.maximum(p, 1e-300))).sum(1)

    yield Entropy
    SCORES.pop("entropy")


def test_a_registered_ood_score_reaches_the_config_the_detector_and_the_report(entropy_score, tmp_path):
    assert score_names()[-1] == "entropy" and "entropy" in score_names()
    assert EvaluateConfig(ood_method="entropy").ood_method == "entropy"  # the config checks names against the registry
    with pytest.raises(ConfigError, match="evaluate.ood_method: expected one of msp, max_logit, energy, mahalanobis, knn, entropy"):
        EvaluateConfig(ood_method="entropie")
    rng = np.random.default_rng(0)
    sure, unsure = np.array([[8.0, -8.0]] * 20), rng.normal(0, 0.1, (20, 2))
    det = fit_ood_detector("entropy", rng.normal(size=(30, 4)), np.arange(30) % 2, sure, rng.normal(size=(20, 4)))
    assert det.is_ood(unsure, None).all() and not det.is_ood(sure, None).any()  # it separates what it should
    (tmp_path / "m").mkdir()
    det.save(tmp_path / "m")
    loaded = OODDetector.load(tmp_path / "m")
    assert loaded.method == "entropy" and loaded.threshold == det.threshold
    scores = all_scores(unsure, rng.normal(size=(20, 4)), rng.normal(size=(30, 4)), np.arange(30) % 2)
    assert list(scores)[-1] == "entropy"  # the report's per-method tables list it
    with pytest.raises(ValueError, match="registered twice"):
        register_score(entropy_score)


def test_unknown_score_names_the_registered_ones():
    with pytest.raises(ValueError, match="OOD method 'gram' is unknown .choose one of msp, max_logit, energy, mahalanobis, knn"):
        get_score("gram")


@pytest.fixture
def npy_format():
    """A format registered the way a new file would register it: NumPy .npy arrays (2-D, any dtype)."""

    @register_format
    class Npy:
        name = "npy"
        suffixes = (".npy",)
        fallback = False

        def claims(self, name, head):
            return head.startswith(b"\x93NUMPY") or name.lower().endswith(".npy")

        def kind(self, head):
            return "npy" if head.startswith(b"\x93NUMPY") else None

        def _array(self, source, name):
            try:
                return np.load(io.BytesIO(source_bytes(source)), allow_pickle=False)
            except ValueError as exc:
                raise ImageReadError(f"{name}: not a readable .npy array ({exc})") from None

        def read(self, source, name, *, window, frame, channels, limit):
            arr = to_unit(self._array(source, name), name)
            return np.repeat(arr[..., None], 3, axis=-1) if channels == 3 else arr

        def describe(self, source, name, hint=None, tags=(), require_pixels=False):
            arr = self._array(source, name)
            return SourceInfo("npy", code(hint), "MONOCHROME2", 1, arr.shape[0], arr.shape[1], 1)

        def bits(self, source, name):
            return 16

    yield Npy
    FORMATS.pop("npy")


def test_a_registered_image_format_is_read_described_and_indexed(npy_format, tmp_path):
    arr = np.arange(12 * 10, dtype=np.uint16).reshape(12, 10)
    folder = tmp_path / "site" / "benign"
    folder.mkdir(parents=True)
    np.save(folder / "a.npy", arr)
    # registered after the raster fallback, still asked before it
    assert format_of("x.npy", (folder / "a.npy").read_bytes()[:132]).name == "npy"
    assert np.allclose(read_image(folder / "a.npy"), arr / arr.max())
    assert read_image(folder / "a.npy", channels=3).shape == (12, 10, 3)
    assert describe_file(folder / "a.npy", modality_hint="MR") == SourceInfo("npy", "MR", "MONOCHROME2", 1, 12, 10, 1)
    result = index_folder(tmp_path / "site", b"s" * 32)
    assert [(Path(r.image).name, r.label, r.meta["modality"]) for r in result.records] == [("a.npy", "benign", "NPY")]
    (folder / "b.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ImageReadError, match="b.npy: not a readable .npy array"):
        read_image(folder / "b.npy")

