"""Linear probe: how much of a task a frozen backbone's embedding already carries.

A logistic regression (scikit-learn; standardised features, balanced class weights) fitted on the
pooled embeddings of one split and scored (AUROC) on another. The standard yardstick for comparing
pretraining recipes without fine-tuning noise: random-init vs supervised-only vs REMEDIS features.

Example:
    >>> auroc = linear_probe_auroc(backbone, train_cache, test_cache, ["benign", "malignant"], 1)
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from remedis.data.dataset import ImageCache
from remedis.metrics import auroc
from remedis.models.inference import embed_cache


def linear_probe_scores(backbone: torch.nn.Module, train: ImageCache, test: ImageCache, class_names: list[str],
                        c: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(test class indices, (N, classes) test probabilities) of a linear probe fitted on `train`'s embeddings."""
    index = {name: i for i, name in enumerate(class_names)}
    y_train = np.array([index[r.label] for r in train.records])
    y_test = np.array([index[r.label] for r in test.records])
    if len(set(y_train)) < 2:
        raise ValueError(f"linear probe: the training split has only class(es) {sorted(set(y_train))}")
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=5000))
    probe.fit(embed_cache(backbone, train).numpy(), y_train)
    scores = probe.predict_proba(embed_cache(backbone, test).numpy())
    full = np.zeros((len(y_test), len(class_names)))
    full[:, probe.classes_] = scores
    return y_test, full


def linear_probe_auroc(backbone: torch.nn.Module, train: ImageCache, test: ImageCache, class_names: list[str],
                       positive_index: int, c: float = 0.1) -> float:
    """Test AUROC of a logistic-regression probe on frozen backbone features (a representation's quality without fine-tuning)."""
    y_test, probs = linear_probe_scores(backbone, train, test, class_names, c)
    return auroc(y_test, probs, positive_index)
