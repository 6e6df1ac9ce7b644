"""A linear head fitted on frozen embeddings: the "LP" of LP-FT (Kumar et al., ICLR 2022).

Full fine-tuning from a random head sends large, noisy gradients through the backbone while the head
is still wrong, which distorts pretrained features most when labels are few. Fitting the head first
(logistic regression on the frozen backbone's embeddings) and fine-tuning from there keeps more of
the pretraining. The fitted head is also a model on its own (a linear probe), which the adaptation
sweep keeps as a member, so validation can fall back to it when fine-tuning does not help.

scikit-learn fits the regression (standardised features, balanced class weights, C chosen on the
validation AUROC); the scaler is folded into the `nn.Linear`, so the head takes raw embeddings.

Example:
    >>> c, val_auroc = fit_linear_head(model, train_cache, val_cache, ["benign", "malignant"], 1)
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from remedis.data.dataset import ImageCache
from remedis.metrics import auroc
from remedis.models.classifier import Classifier
from remedis.models.inference import embed_cache

C_GRID = (0.01, 0.1, 1.0)  # inverse L2 strength; few labels favour the stronger end


def _targets(cache: ImageCache, class_names: list[str]) -> np.ndarray:
    index = {name: i for i, name in enumerate(class_names)}
    return np.array([index[r.label] for r in cache.records])


def head_weights(scaler: StandardScaler, probe: LogisticRegression, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(num_classes, d) weight and (num_classes,) bias of one linear layer on raw embeddings whose
    softmax equals the probe's `predict_proba` on standardised embeddings."""
    coef, intercept = probe.coef_, probe.intercept_
    if len(probe.classes_) == 2:  # sklearn keeps one logit z for classes_[1]; softmax([-z/2, z/2]) = sigmoid(z)
        coef = np.concatenate([-coef / 2, coef / 2])
        intercept = np.concatenate([-intercept / 2, intercept / 2])
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    w = coef / scale
    b = intercept - w @ scaler.mean_
    weight = np.zeros((num_classes, w.shape[1]))
    # A class absent from the training images gets a very low logit rather than a random one.
    bias = np.full(num_classes, -30.0)
    weight[probe.classes_] = w
    bias[probe.classes_] = b
    return weight, bias


def fit_linear_head(model: Classifier, train: ImageCache, val: ImageCache, class_names: list[str],
                    positive_index: int, c_grid: tuple[float, ...] = C_GRID) -> tuple[float, float]:
    """Set `model.head` to the best logistic regression on frozen embeddings; return (C, val AUROC)."""
    y_train, y_val = _targets(train, class_names), _targets(val, class_names)
    if len(set(y_train)) < 2:
        raise ValueError(f"linear head: the training images hold only class(es) {sorted(set(y_train))}")
    x_train = embed_cache(model.backbone, train).double().numpy()
    x_val = embed_cache(model.backbone, val).double().numpy()
    scaler = StandardScaler().fit(x_train)
    best = None
    for c in c_grid:
        probe = LogisticRegression(C=c, class_weight="balanced", max_iter=5000).fit(scaler.transform(x_train), y_train)
        scores = np.zeros((len(y_val), len(class_names)))
        scores[:, probe.classes_] = probe.predict_proba(scaler.transform(x_val))
        score = auroc(y_val, scores, positive_index)
        if best is None or score > best[0] + 1e-9:  # ties keep the stronger regularisation
            best = (score, c, probe)
    score, c, probe = best
    weight, bias = head_weights(scaler, probe, len(class_names))
    with torch.no_grad():
        model.head.weight.copy_(torch.from_numpy(weight).to(model.head.weight))
        model.head.bias.copy_(torch.from_numpy(bias).to(model.head.bias))
    return c, float(score)
