"""From a checked upload to the answer's numbers: the input contract on the resized pixels, then the
model's own calibration and decision, and the OOD verdict that combines the contract with the detector.

Kept apart from `serving.service` (which needs a running BentoML) so the logic is tested in-process,
and so the service stays thin: decode and check here, the network in `serving.runtime`.

Example:
    >>> x, reasons = prepare(check_upload(data, "application/dicom", limits), preprocessing, contract)
    >>> answers(model_output, class_names, calibration, detector, [reasons], contract is not None)[0].ood_reasons
    ['modality CT, model trained on US']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from remedis.adapt.calibration import Calibration
from remedis.data.contract import InputContract, as_grey_source, stored_grey
from remedis.data.preprocess import Preprocessing
from serving.inputs import Upload, UploadError, decode


@dataclass
class Answer:
    """One image's answer, shared by the service (its JSON) and the gateway (its SR and captures).

    Args:
        probabilities: calibrated probability per class, in the model's class order.
        label: the decision: at the stored operating point (binary) or the most probable class.
        decision: "operating_point" or "argmax", how `label` was chosen.
        ood: True when the input broke the contract or the detector flagged it, False when checked and
            neither, None when the model has neither a contract nor a detector.
        ood_score: the detector's score (higher = more out of distribution), or None.
        ood_reasons: why it is out of distribution (the contract's reasons, the detector's threshold).
        frames: of a multi-frame instance, the 1-based frames read (None: a single image).
        frame: of those, the frame whose answer this is (the highest probability of the positive class).

    Example:
        >>> a = Answer({"benign": 0.3, "malignant": 0.7}, "malignant", "operating_point", False, 1.2, [])
        >>> Answer.from_dict(a.to_dict()) == a
        True
    """

    probabilities: dict[str, float]
    label: str
    decision: str = "argmax"
    ood: bool | None = None
    ood_score: float | None = None
    ood_reasons: list[str] = field(default_factory=list)
    frames: list[int] | None = None
    frame: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The answer's JSON fields (the service's response body for one image; frames only for a multi-frame one)."""
        out = {"probabilities": dict(self.probabilities), "label": self.label, "decision": self.decision,
               "ood": self.ood, "ood_score": self.ood_score, "ood_reasons": list(self.ood_reasons)}
        if self.frames is not None:
            out.update(frames=list(self.frames), frame=self.frame)
        return out

    def log_fields(self) -> dict[str, Any]:
        """The prediction log's columns of this answer (remedis.monitor.store)."""
        return {"probabilities": {k: float(v) for k, v in self.probabilities.items()}, "label": self.label,
                "decision": self.decision, "ood": self.ood,
                "ood_score": None if self.ood_score is None else float(self.ood_score), "ood_reasons": list(self.ood_reasons)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Answer:
        """An answer from the service's JSON (extra fields such as `format` or `warnings` are ignored)."""
        return cls({str(k): float(v) for k, v in d["probabilities"].items()}, str(d["label"]), str(d.get("decision", "argmax")),
                   d.get("ood"), None if d.get("ood_score") is None else float(d["ood_score"]), list(d.get("ood_reasons") or []),
                   None if d.get("frames") is None else [int(x) for x in d["frames"]],
                   None if d.get("frame") is None else int(d["frame"]))


@dataclass(frozen=True)
class Refusal:
    """An image the model did not answer: the client's mistake (4xx status) and a reason safe to return."""

    reason: str
    status: int = 422

    def to_dict(self) -> dict[str, Any]:
        """The JSON of a refused image in a batch answer."""
        return {"error": self.reason, "status": self.status}


def prepare(up: Upload, preprocessing: Preprocessing, contract: InputContract | None) -> tuple[np.ndarray, list[str]]:
    """Decode an upload for the model and check it against the input contract.

    Args:
        up: a checked upload (`serving.inputs.check_upload`), with its header facts in `up.source`.
        preprocessing: the model's `Preprocessing` (resize, then normalise: what training did).
        contract: the model's input contract, or None (nothing checked).

    Returns:
        The normalised pixels (C, S, S) for the model, and the contract's reasons ([]: conforms).

    Raises:
        UploadError: the bytes do not decode (4xx).

    Example:
        >>> x, reasons = prepare(check_upload(png_bytes, "image/png", LimitSettings()), Preprocessing(64), None)
        >>> x.shape, reasons
        ((1, 64, 64), [])
    """
    source = up.source
    if preprocessing.channels == 1 and source is not None and source.channels == 3 and stored_grey(decode(up, 3)):
        source = as_grey_source(source)  # grey content stored as RGB / YBR (most ultrasound): read and checked as grey
    resized = preprocessing.resize(decode(up, preprocessing.channels))
    reasons = contract.check(source, resized) if contract is not None else []
    return preprocessing.normalize(resized).numpy(), reasons


def modality_warnings(up: Upload, configured: set[str], contract: InputContract | None, reject: bool) -> list[str]:
    """The service's own modality expectation: the configured `modalities`, else the contract's.

    A DICOM whose modality is not expected is refused (422) with `reject` (`reject_other_modalities`);
    otherwise a configured list adds a warning, and the contract's mismatch is left to `ood_reasons`.

    Args:
        up: a checked upload.
        configured: the serving config's `modalities` (upper case; empty: take the contract's).
        contract: the model's input contract, or None.
        reject: refuse a mismatch instead of answering it.

    Example:
        >>> modality_warnings(ct_upload, {"US"}, None, reject=False)
        ['DICOM modality CT is not one this model expects (US)']
    """
    expected = configured or set(contract.modalities if contract is not None else [])
    if not up.modality or not expected or up.modality in expected:
        return []
    msg = f"DICOM modality {up.modality} is not one this model expects ({', '.join(sorted(expected))})"
    if reject:
        raise UploadError(422, msg)
    return [msg] if configured else []


def _num(v: float) -> str:
    """A score as five significant digits."""
    return f"{v:.5g}"


def answers(out: np.ndarray, class_names: list[str], calibration: Calibration, detector=None,
            contract_reasons: list[list[str]] | None = None, contract: bool = False) -> list[Answer]:
    """The answer for each image of a model output.

    `ood` is True when the input broke the contract or the detector's score is above its threshold,
    False when checked and neither, None when the model has neither a contract nor a detector.

    Args:
        out: (N, classes + embedding) `[logits | embedding]` rows (`serving.runtime.ModelRuntime.forward`).
        class_names: the model's classes, in logit order.
        calibration: the model's `Calibration` (temperature, operating threshold): probabilities and label.
        detector: the model's `OODDetector`, or None.
        contract_reasons: each image's input-contract reasons (None: none).
        contract: whether the model has an input contract (the inputs were checked against it).

    Example:
        >>> answers(np.array([[0.0, 2.0, 0.5]]), ["benign", "malignant"], Calibration(1.0))[0].label
        'malignant'
    """
    k = len(class_names)
    logits, emb = out[:, :k], out[:, k:]
    probs = calibration.probs(logits)
    labels = calibration.decide(probs)
    scores = detector.score(logits, emb) if detector is not None else None
    checked = detector is not None or contract
    result = []
    for i in range(len(out)):
        reasons = list(contract_reasons[i]) if contract_reasons is not None else []
        if scores is not None and scores[i] > detector.threshold:
            reasons.append(f"feature score {_num(scores[i])} above threshold {_num(detector.threshold)}")
        result.append(Answer(
            probabilities={c: float(p) for c, p in zip(class_names, probs[i])},
            label=class_names[int(labels[i])],
            decision="operating_point" if calibration.threshold is not None else "argmax",
            ood=bool(reasons) if checked else None,
            ood_score=None if scores is None else float(scores[i]),
            ood_reasons=reasons,
        ))
    return result
