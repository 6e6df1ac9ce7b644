"""Representation shift: linear CKA (Kornblith et al. 2019) between layers of two networks, and the
distance between sites in embedding space.

CKA compares two representations of the same images; 1 = identical up to an orthogonal transform and
isotropic scaling. Comparing the backbone checkpoint with the adapted model's backbone layer by layer
shows where adaptation changed the network (typically the last stages).

Example:
    >>> feats_before = layer_features(backbone_before, x)      # {layer: (N, C)}
    >>> feats_after = layer_features(adapted.classifier.backbone, x)
    >>> cka_matrix(feats_before, feats_after)                   # (L, L) heatmap
"""

from __future__ import annotations

import numpy as np
import torch


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of (N, Dx) and (N, Dy) features of the same N images: ||Yc^T Xc||_F^2 /
    (||Xc^T Xc||_F ||Yc^T Yc||_F), columns centred. The feature-space form costs O(N D^2), not O(N^2)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ValueError(f"linear_cka: need two 2-D arrays with the same number of rows, got {x.shape} and {y.shape}")
    x = x - x.mean(0)
    y = y - y.mean(0)
    cross = np.linalg.norm(y.T @ x) ** 2
    denom = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(cross / denom) if denom > 0 else float("nan")


def cka_matrix(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[list[float]]:
    """CKA of every layer of `a` (rows) with every layer of `b` (columns)."""
    return [[linear_cka(fa, fb) for fb in b.values()] for fa in a.values()]


def layer_features(backbone: torch.nn.Module, x: torch.Tensor, batch_size: int = 128) -> dict[str, np.ndarray]:
    """Globally average-pooled output of every feature stage of a timm backbone (its `feature_info`)
    plus the pooled embedding, for the normalised batch `x`."""
    names = [f["module"] for f in getattr(backbone, "feature_info", [])]
    modules = dict(backbone.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"backbone: feature stages {missing} not found")
    out: dict[str, list[np.ndarray]] = {n: [] for n in [*names, "embedding"]}
    captured: dict[str, torch.Tensor] = {}
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o)) for n in names]
    was_training = backbone.training
    device = next(backbone.parameters()).device
    backbone.eval()
    try:
        with torch.inference_mode():
            for i in range(0, len(x), batch_size):
                emb = backbone.forward_head(backbone.forward_features(x[i:i + batch_size].float().to(device)))
                for n in names:
                    t = captured[n]
                    out[n].append((t.mean((2, 3)) if t.ndim == 4 else t).float().cpu().numpy())
                out["embedding"].append(emb.float().cpu().numpy())
    finally:
        for h in hooks:
            h.remove()
        backbone.train(was_training)
    return {n: np.concatenate(v) for n, v in out.items() if v}


def site_embedding_distances(embeddings: dict[str, np.ndarray]) -> dict[str, dict[str, float | None]]:
    """Distance between sites in embedding space: Euclidean distance between site means of the
    L2-normalised embeddings (0 = same centre, 2 = opposite); its square is the linear-kernel MMD^2."""
    unit = {s: e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12) for s, e in embeddings.items() if len(e)}
    out: dict[str, dict[str, float | None]] = {}
    for a, ea in unit.items():
        out[a] = {}
        for b, eb in unit.items():
            d = ea.mean(0) - eb.mean(0)
            out[a][b] = float(np.linalg.norm(d))
    return out
