"""Temperature scaling (Guo et al. 2017): one scalar T fitted on validation logits by minimising NLL.

It changes confidence, never the ranking, so AUROC and accuracy are untouched while calibration
(ECE) improves.

Example:
    >>> T = fit_temperature(val_logits, val_targets)
    >>> probs = (test_logits / T).softmax(1)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 200) -> float:
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


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, bins: int = 15) -> float:
    """ECE with equal-width confidence bins over the top-class probability."""
    conf, pred = probs.max(1)
    correct = (pred == targets).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.float().mean() * (conf[in_bin].mean() - correct[in_bin].mean()).abs()
    return float(ece)


def threshold_for_sensitivity(positive_probs, is_positive, sensitivity: float = 0.9) -> float:
    """Largest threshold on the positive-class probability whose sensitivity (TPR) is >= `sensitivity`.

    A prediction is positive when prob >= threshold. Chosen on validation; stored with the model so the
    service and the report use the same operating point.
    """
    import numpy as np

    p = np.asarray(positive_probs, dtype=np.float64)
    y = np.asarray(is_positive, dtype=bool)
    if y.sum() == 0:
        return 0.5
    pos = np.sort(p[y])[::-1]
    k = int(np.ceil(sensitivity * len(pos) - 1e-9))  # need at least k positives at or above the threshold
    return float(pos[max(k, 1) - 1])
