"""The adapted model folder: what `adapt` writes and `evaluate` and the service read.

`model.safetensors` (backbone + head) and `meta.json` with the class names, the exact
preprocessing, the calibration temperature and provenance (backbone checkpoint hash, manifest hash,
config, versions). Loading it and calling `predict_files` gives the same numbers offline and in the
service, because both use this class and `remedis.data`'s preprocessing.

Example:
    >>> model = AdaptedModel.load("runs/quickstart/adapted/remedis@1.0")
    >>> model.predict_files(["a.png", "b.dcm"])["probs"]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from remedis.adapt.calibration import Calibration
from remedis.adapt.ood import OODDetector, remove_detector
from remedis.data.contract import InputContract
from remedis.data.preprocess import Preprocessing
from remedis.data.readers import read_image
from remedis.models.backbones import fold_std_conv
from remedis.models.checkpoint import CheckpointError, load_checkpoint, load_matching, save_checkpoint
from remedis.models.classifier import Classifier
from remedis.models.inference import run_batches
from remedis.models.layout import fast_bf16, memory_format


@dataclass
class AdaptedModel:
    """A classifier adapted to one site, complete enough to serve on its own: weights, classes, preprocessing,
    calibration, operating point, OOD detector, input contract and provenance."""

    classifier: Classifier
    class_names: list[str]
    preprocessing: Preprocessing
    temperature: float = 1.0
    positive_index: int = 1
    provenance: dict[str, Any] = field(default_factory=dict)
    threshold: float | None = None  # operating threshold on the positive-class probability (binary tasks)
    operating_point: dict[str, Any] = field(default_factory=dict)
    input_contract: InputContract | None = None  # what the model was trained on (checked before the OOD score)
    ood_detector: OODDetector | None = None  # feature-space detector, fitted on the site's train/val images

    def __post_init__(self) -> None:
        self.classifier.eval()
        self.device = torch.device("cpu")
        # bf16 autocast where the device has bf16 natively (2-3x on AVX-512 BF16 CPUs); fp32 elsewhere,
        # where emulated bf16 is 10-30x slower (`remedis.models.layout.fast_bf16`).
        self.autocast = fast_bf16(self.device)

    @property
    def architecture(self) -> str:
        """The network's architecture name (timm)."""
        return self.classifier.backbone_name

    @property
    def calibration(self) -> Calibration:
        """The model's `Calibration`: temperature, operating threshold (binary tasks) and positive class."""
        return Calibration(self.temperature, self.threshold if len(self.class_names) == 2 else None,
                           self.positive_index, self.operating_point)

    def to(self, device: str | torch.device) -> "AdaptedModel":
        """Move the model to `device`, in the memory layout and precision that device runs fastest."""
        self.device = torch.device(device)
        self.autocast = fast_bf16(self.device)
        self.classifier.to(self.device, memory_format=memory_format(self.classifier, self.device))
        return self

    def save(self, folder: str | Path) -> Path:
        """Write the model folder (weights, meta.json, OOD detector), atomically; returns the folder."""
        if getattr(self, "folded", False):
            raise ValueError("this AdaptedModel was loaded for inference (weight standardisation folded); save the trained one")
        meta = {
            "kind": "adapted_model",
            "architecture": self.architecture,
            "in_chans": self.preprocessing.in_chans,
            "class_names": self.class_names,
            "positive_index": self.positive_index,
            "preprocessing": self.preprocessing.to_dict(),
            "calibration": {"temperature": self.temperature, "threshold": self.threshold,
                            "operating_point": self.operating_point},
            "input_contract": self.input_contract.to_dict() if self.input_contract is not None else None,
            "provenance": self.provenance,
        }
        folder = save_checkpoint(folder, self.classifier.state_dict(), meta)
        if self.ood_detector is not None:
            self.ood_detector.save(folder)
        else:
            remove_detector(folder)  # a re-adapted folder never keeps a detector fitted for other weights
        return folder

    def missing_for_serving(self) -> list[str]:
        """What a deployable model folder lacks (empty when complete): the OOD detector, the input contract."""
        missing = []
        if self.ood_detector is None:
            missing.append("the OOD detector (ood.json + ood.safetensors)")
        if self.input_contract is None:
            missing.append("the input contract (meta.json 'input_contract')")
        return missing

    @classmethod
    def load(cls, folder: str | Path, fold: bool = True) -> "AdaptedModel":
        """Load for inference; `fold` bakes BiT weight standardisation into plain convs (faster, same outputs)."""
        state, meta = load_checkpoint(folder)
        if meta.get("kind") != "adapted_model":
            raise CheckpointError(f"{folder}: is a {meta.get('kind', 'unknown')!r} checkpoint, not an adapted model")
        pre = Preprocessing.from_dict(meta["preprocessing"])
        clf = Classifier(meta["architecture"], len(meta["class_names"]), pre.in_chans)
        load_matching(clf, state, str(folder))
        if fold:
            fold_std_conv(clf)
        cal = meta["calibration"]
        model = cls(clf, list(meta["class_names"]), pre, float(cal["temperature"]), int(meta.get("positive_index", 1)),
                    meta.get("provenance", {}), cal.get("threshold"), cal.get("operating_point", {}))
        if meta.get("input_contract"):
            model.input_contract = InputContract.from_dict(meta["input_contract"])
        model.ood_detector = OODDetector.load(folder)
        model.folded = fold
        return model

    def _run(self, x: torch.Tensor, fn) -> torch.Tensor:
        x = x.to(self.device).contiguous(memory_format=memory_format(self.classifier, self.device))
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return fn(x).float().cpu()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Uncalibrated logits for a normalised batch (N, C, S, S)."""
        return self._run(x, self.classifier)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embeddings of a normalised batch (N, C, S, S)."""
        return self._run(x, self.classifier.embed)

    def infer(self, pixels: torch.Tensor, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Uncalibrated logits (N, K) and pooled embeddings (N, D) of images in [0, 1] (N, 1, S, S), in one
        forward pass per batch: the path evaluation, OOD fitting and (with its own device handling) the
        service share, so their numbers agree.

        Args:
            pixels: resized images in [0, 1], as `ImageCache.pixels` holds them (not normalised).
            batch: images per forward pass.

        Example:
            >>> logits, emb = model.infer(cache.pixels)
        """
        k = len(self.class_names)
        if len(pixels) == 0:
            return np.empty((0, k)), np.empty((0, self.classifier.head.in_features))
        out = run_batches(self.classifier, self.classifier.logits_and_embedding, pixels, self.preprocessing, batch,
                          self.autocast, self.device)
        return out[:, :k].numpy().astype(np.float64), out[:, k:].numpy().astype(np.float64)

    def probs_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities: `Calibration.probs`, the same function the service applies."""
        return torch.as_tensor(self.calibration.probs(torch.as_tensor(logits).float().numpy()), dtype=torch.float32)

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Class index per row: the stored operating threshold for binary tasks, else argmax."""
        return self.calibration.decide(probs)

    def batch_from_images(self, images: list[np.ndarray]) -> torch.Tensor:
        """Preprocess decoded images (H, W[, 3]) in [0, 1] into one normalised batch."""
        return torch.stack([self.preprocessing(img) for img in images])

    def predict_images(self, images: list[np.ndarray], batch_size: int = 64) -> dict[str, np.ndarray]:
        """Logits and calibrated probabilities of decoded images, `batch_size` at a time."""
        logits = torch.cat([self.logits(self.batch_from_images(images[i:i + batch_size]))
                            for i in range(0, len(images), batch_size)]) if images else torch.empty(0, len(self.class_names))
        return {"logits": logits.numpy(), "probs": self.probs_from_logits(logits).numpy()}

    def predict_files(self, paths: list[str | Path], batch_size: int = 64) -> dict[str, np.ndarray]:
        """Logits and calibrated probabilities of image files, read as training read them."""
        return self.predict_images([read_image(p, **self.preprocessing.read_options()) for p in paths], batch_size)
