"""Temperature scaling (Guo et al. 2017): one scalar T fitted on validation logits by minimising NLL.

It changes confidence, never the ranking, so AUROC and accuracy are untouched while calibration
(ECE) improves.

Example:
    >>> T = fit_temperature(val_logits, val_targets)
    >>> probs = (test_logits / T).softmax(1)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 200) -> float:
    """The temperature minimising validation negative log-likelihood (LBFGS on log T)."""
    logits = logits.detach().double()
    targets = targets.detach().long()
    if len(logits) == 0:
        return 1.0
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)  # optimise log T: T stays positive
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.exp().item())
    return min(max(t, 0.05), 20.0)  # clamp: a degenerate validation split must not yield absurd T


@dataclass
class Calibration:
    """What turns a model's logits into the answer it gives: the temperature, and for binary tasks the
    operating threshold on the positive-class probability (chosen on validation). The one place the
    decision is made: `AdaptedModel`, evaluation and the service all call `probs` and `decide`.

    Args:
        temperature: T of temperature scaling (probabilities are softmax(logits / T)).
        threshold: operating threshold on the positive-class probability (binary tasks), or None (argmax).
        positive_index: index of the positive class (binary tasks).
        operating_point: how the threshold was chosen (e.g. {"sensitivity": 0.9, "chosen_on": "validation"}).

    Example:
        >>> cal = Calibration(temperature=1.5, threshold=0.3, positive_index=1)
        >>> cal.decide(cal.probs(np.array([[0.0, 0.2]])))
        array([1])
    """

    temperature: float = 1.0
    threshold: float | None = None
    positive_index: int = 1
    operating_point: dict[str, Any] = field(default_factory=dict)

    def probs(self, logits) -> np.ndarray:
        """Calibrated probabilities (N, K) of uncalibrated logits (N, K)."""
        z = np.asarray(logits, dtype=np.float64) / self.temperature
        z = z - z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)

    def decide(self, probs) -> np.ndarray:
        """Class index per row: the operating threshold for binary tasks, else argmax."""
        probs = np.asarray(probs)
        if self.threshold is not None and probs.shape[1] == 2:
            positive = probs[:, self.positive_index] >= self.threshold
            return np.where(positive, self.positive_index, 1 - self.positive_index)
        return probs.argmax(1)

    def to_dict(self) -> dict[str, Any]:
        """The calibration as meta.json stores it."""
        return {"temperature": float(self.temperature), "threshold": self.threshold,
                "operating_point": dict(self.operating_point)}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "Calibration":
        """From an adapted model folder's `meta.json` (its `calibration` and `positive_index`)."""
        cal = meta.get("calibration") or {}
        threshold = cal.get("threshold")
        if threshold is None and isinstance(cal.get("operating_point"), dict):
            threshold = cal["operating_point"].get("threshold")
        if len(meta.get("class_names", [])) != 2:
            threshold = None
        return cls(float(cal.get("temperature", 1.0)), None if threshold is None else float(threshold),
                   int(meta.get("positive_index", 1)), dict(cal.get("operating_point") or {}))
