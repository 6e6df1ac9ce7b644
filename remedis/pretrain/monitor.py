"""kNN monitor: representation quality during self-supervision, without training anything.

At the end of each epoch the backbone embeds a labeled bank (source-site train images) and labeled
queries (source-site validation images); each query's class score is a cosine-similarity-weighted
vote of its k nearest bank images (the InstDisc / DINO kNN protocol). The AUROC of that score is
logged per epoch, so a SimCLR run that is destroying the upstream features shows it immediately.

Example:
    >>> trainer = make_trainer(runtime, epochs, callbacks=[KNNMonitor(bank, queries, class_names, positive_index=1)])
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from remedis.data.dataset import ImageCache
from remedis.metrics import auroc
from remedis.models.inference import embed_cache


def knn_scores(bank: torch.Tensor, bank_targets: torch.Tensor, queries: torch.Tensor, num_classes: int,
               k: int = 20, temperature: float = 0.07) -> np.ndarray:
    """(Q, C) class scores: similarity-weighted votes of the k nearest bank embeddings (cosine)."""
    sim = F.normalize(queries, dim=1) @ F.normalize(bank, dim=1).T
    k = min(k, bank.shape[0])
    top, idx = sim.topk(k, dim=1)
    weights = (top / temperature).exp()
    votes = torch.zeros(queries.shape[0], num_classes)
    votes.scatter_add_(1, bank_targets[idx], weights)
    return (votes / votes.sum(1, keepdim=True)).numpy()


class KNNMonitor(L.Callback):
    """A Lightning callback that measures the representation each epoch: kNN AUROC of source validation images
    against a labeled source bank."""

    def __init__(self, bank: ImageCache, queries: ImageCache, class_names: list[str], positive_index: int = 1, k: int = 20):
        index = {c: i for i, c in enumerate(class_names)}
        self.bank, self.queries = bank, queries
        self.bank_targets = torch.tensor([index[r.label] for r in bank.records])
        self.query_targets = np.array([index[r.label] for r in queries.records])
        self.num_classes, self.positive_index, self.k = len(class_names), positive_index, k
        self.history: list[float] = []

    def measure(self, backbone: torch.nn.Module) -> float:
        """The kNN AUROC of `backbone` now."""
        scores = knn_scores(embed_cache(backbone, self.bank), self.bank_targets, embed_cache(backbone, self.queries),
                            self.num_classes, self.k)
        return auroc(self.query_targets, scores, self.positive_index)

    def state_dict(self) -> dict:
        """The per-epoch history (kept in the resume state)."""
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the per-epoch history of a resumed run."""
        self.history = list(state_dict.get("history", []))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        """Measure and log the kNN AUROC after the epoch."""
        value = self.measure(pl_module.backbone)
        self.history.append(value)  # merged into the stage history by the job (callbacks run before the module's hook)
        pl_module.log("knn_auroc", value, prog_bar=True)
