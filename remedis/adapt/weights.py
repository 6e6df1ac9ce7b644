"""Weight-space ensembling: model soups and WiSE-FT. Both cost nothing at inference.

- Uniform soup (Wortsman et al. 2022): average the weights of fine-tuned members of one sweep.
- Greedy soup: add members in order of validation metric, keep each only if the soup improves.
- WiSE-FT (Wortsman et al. 2022): theta = (1 - alpha) * theta_init + alpha * theta_finetuned on the
  layers shared with the initial model (the backbone); alpha chosen on validation. It keeps some of the
  pretrained model's robustness to distribution shift, which is what a new site needs.

Example:
    >>> soup = uniform_soup([m1.state_dict(), m2.state_dict()])
    >>> wise = wise_ft(init_backbone_state, tuned.state_dict(), alpha=0.5, prefix="backbone.")
"""

from __future__ import annotations

from typing import Callable

import torch

State = dict[str, torch.Tensor]


def _mix(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    if not tensors[0].is_floating_point():  # integer buffers (e.g. BatchNorm step counters): keep the first
        return tensors[0].clone()
    out = torch.zeros_like(tensors[0], dtype=torch.float64)
    for t, w in zip(tensors, weights):
        out += w * t.double()
    return out.to(tensors[0].dtype)


def uniform_soup(states: list[State]) -> State:
    """The mean of several state dicts (a uniform model soup)."""
    if not states:
        raise ValueError("uniform_soup: no members")
    keys = list(states[0])
    for i, s in enumerate(states[1:], 1):
        if list(s) != keys:
            raise ValueError(f"uniform_soup: member {i} has different keys (not the same architecture)")
    w = [1.0 / len(states)] * len(states)
    return {k: _mix([s[k] for s in states], w) for k in keys}


def greedy_soup(states: list[State], metric: Callable[[State], float]) -> tuple[State, list[int]]:
    """Greedy soup: members sorted by their own metric; keep one only if the soup's metric does not drop.

    Returns the soup and the indices of the members it holds.
    """
    scores = [metric(s) for s in states]
    order = sorted(range(len(states)), key=lambda i: scores[i], reverse=True)
    chosen = [order[0]]
    best = scores[order[0]]
    for i in order[1:]:
        candidate = uniform_soup([states[j] for j in chosen + [i]])
        value = metric(candidate)
        if value >= best:
            chosen.append(i)
            best = value
    return uniform_soup([states[j] for j in chosen]), chosen


def wise_ft(init: State, tuned: State, alpha: float, prefix: str = "") -> State:
    """Interpolate `tuned` towards `init` on the keys they share (init keys are given without `prefix`).

    alpha = 1 returns the fine-tuned weights, alpha = 0 the initial ones (for the shared layers;
    layers only the fine-tuned model has, such as a new head, stay fine-tuned).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"wise_ft: alpha {alpha} is not in [0, 1]")
    out = {}
    for key, value in tuned.items():
        base = init.get(key[len(prefix):]) if key.startswith(prefix) else None
        out[key] = _mix([base, value], [1 - alpha, alpha]) if base is not None and base.shape == value.shape else value.clone()
    return out
