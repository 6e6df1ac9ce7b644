"""Out-of-distribution detection: five scores, how well each separates sites, and the detector the
service uses to refuse images that do not look like the site the model was adapted to.

Scores (higher = more OOD):
    msp          -max softmax probability (Hendrycks & Gimpel 2017)
    max_logit    -max logit (Hendrycks et al. 2022)
    energy       -logsumexp(logits) (Liu et al. 2020)
    mahalanobis  min over classes of the Mahalanobis distance of the embedding to the class mean,
                 shared (Ledoit-Wolf shrunk) covariance (Lee et al. 2018, on the pooled embedding)
    knn          distance to the k-th nearest L2-normalised train embedding (Sun et al. 2022)

Each score is one registered class in `remedis.ood_scores` (a new score: one file there).

The threshold is set so that `accept_rate` (95%) of in-distribution *validation* images are accepted
(score <= threshold); the test split is never used to choose anything. The service loads the detector
from the adapted model folder (`ood.json` + `ood.safetensors`).

Example:
    >>> det = fit_ood_detector("energy", train_emb, train_y, val_logits, val_emb)
    >>> det.save("runs/x/adapted/remedis@1")
    >>> OODDetector.load("runs/x/adapted/remedis@1").is_ood(logits, embeddings)   # (N,) bool
    >>> ood_auroc(id_scores, ood_scores), fpr_at_tpr(id_scores, ood_scores, 0.95)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from remedis.files import atomic_write, atomic_write_text
from remedis.ood_scores import get_score, score_names
from remedis.ood_scores.arrays import as_2d

OOD_JSON = "ood.json"
OOD_WEIGHTS = "ood.safetensors"
FORMAT_VERSION = 1
DEFAULT_K = 10  # kNN neighbour rank; Sun et al. use 50 on ImageNet-size banks, site train sets are small


@dataclass
class OODDetector:
    """A fitted OOD score and its threshold: what an adapted model folder stores and the service applies.

    Args:
        method: a registered score (`remedis.ood_scores`: msp, max_logit, energy, mahalanobis, knn).
        threshold: score above threshold => OOD; set to accept `accept_rate` of in-distribution validation images.
        state: the score's fitted arrays (mahalanobis: means, precision; knn: bank, k).
        accept_rate: share of in-distribution validation images the threshold accepts.
    """

    method: str
    threshold: float
    state: dict[str, np.ndarray] = field(default_factory=dict)
    accept_rate: float = 0.95

    def __post_init__(self) -> None:
        missing = [k for k in get_score(self.method).state_keys if k not in self.state]
        if missing:
            raise ValueError(f"OOD detector {self.method!r}: state is missing {missing}")

    def score(self, logits: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
        """(N,) scores, higher = more OOD. `logits` are uncalibrated (temperature does not change
        the ranking of max_logit/energy, and MSP is defined on the raw softmax)."""
        return get_score(self.method).score(self.state, logits, embeddings)

    def is_ood(self, logits: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
        """(N,) True where the score is above the threshold."""
        return self.score(logits, embeddings) > self.threshold

    def save(self, model_folder: str | Path) -> None:
        """Write `ood.safetensors` then `ood.json` (each via a temporary file + rename; the JSON,
        written last, records the weights hash, so a reader never pairs it with other weights)."""
        from safetensors.numpy import save

        folder = Path(model_folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: adapted model folder not found")
        tensors = {k: np.ascontiguousarray(v, dtype=np.int64 if k == "k" else np.float32) for k, v in self.state.items()}
        data = save(tensors)
        # 0644: a service running as another user must read them
        atomic_write(folder / OOD_WEIGHTS, data, durable=False, mode=0o644)
        meta = {"format_version": FORMAT_VERSION, "method": self.method, "threshold": float(self.threshold),
                "accept_rate": float(self.accept_rate), "score": "higher = more out-of-distribution; OOD when score > threshold",
                "weights_sha256": hashlib.sha256(data).hexdigest()}
        atomic_write_text(folder / OOD_JSON, json.dumps(meta, indent=2), durable=False, mode=0o644)

    @classmethod
    def load(cls, model_folder: str | Path) -> OODDetector | None:
        """The detector stored in `model_folder`, or None when it has none."""
        from safetensors.numpy import load_file

        folder = Path(model_folder)
        if not (folder / OOD_JSON).is_file():
            return None
        try:
            meta = json.loads((folder / OOD_JSON).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{folder / OOD_JSON}: corrupt OOD detector metadata ({exc})") from None
        weights = folder / OOD_WEIGHTS
        if not weights.is_file():
            raise ValueError(f"{folder}: {OOD_JSON} present but {OOD_WEIGHTS} is missing")
        data = weights.read_bytes()
        if meta.get("weights_sha256") and hashlib.sha256(data).hexdigest() != meta["weights_sha256"]:
            raise ValueError(f"{weights}: hash does not match {OOD_JSON} (corrupt or modified detector)")
        state = {k: np.asarray(v) for k, v in load_file(str(weights)).items()}
        return cls(meta["method"], float(meta["threshold"]), state, float(meta.get("accept_rate", 0.95)))


def remove_detector(model_folder: str | Path) -> None:
    """Delete a stored detector (the JSON first, so a reader never finds it without its weights)."""
    folder = Path(model_folder)
    (folder / OOD_JSON).unlink(missing_ok=True)
    (folder / OOD_WEIGHTS).unlink(missing_ok=True)


def fit_state(method: str, train_embeddings, train_targets, k: int = DEFAULT_K) -> dict[str, np.ndarray]:
    """What a method needs from the in-distribution training set (nothing for logit scores)."""
    score = get_score(method)
    if not score.state_keys:
        return {}
    emb = as_2d("train_embeddings", train_embeddings)
    if len(emb) < 2:
        raise ValueError(f"train_embeddings: {method} needs at least 2 training images, got {len(emb)}")
    return score.fit(emb, train_targets, k)


def fit_ood_detector(method: str, train_embeddings, train_targets, val_logits, val_embeddings,
                     accept_rate: float = 0.95, k: int = DEFAULT_K, state: dict | None = None) -> OODDetector:
    """Fit `method` on the train split and set its threshold on the in-distribution validation split
    (`state`: an already fitted `fit_state(method, ...)`, to reuse it)."""
    if not 0.0 < accept_rate < 1.0:
        raise ValueError(f"accept_rate: must be in (0, 1), got {accept_rate}")
    state = fit_state(method, train_embeddings, train_targets, k) if state is None else state
    det = OODDetector(method, float("inf"), state, accept_rate)
    val = det.score(val_logits, val_embeddings)
    if len(val) == 0:
        raise ValueError("val_logits: the validation split is empty; cannot set the OOD threshold")
    det.threshold = float(threshold_for_accept_rate(val, accept_rate))
    return det


def fit_model_detector(model, train, val, method: str = "mahalanobis", accept_rate: float = 0.95) -> OODDetector | None:
    """The detector of an adapted model: `method`'s state fitted on the embeddings of its labeled train
    images, the threshold accepting `accept_rate` of its validation images. None when the site has too
    few images (fewer than two train or no validation images).

    Args:
        model: an `AdaptedModel` (its `infer` gives logits and embeddings).
        train: `ImageCache` of the labeled train images the model was adapted on.
        val: `ImageCache` of the site's validation images.
        method: a registered score (`remedis.ood_scores.score_names()`).
        accept_rate: share of in-distribution validation images accepted.

    Example:
        >>> model.ood_detector = fit_model_detector(model, train, val, "mahalanobis", 0.95)
    """
    if len(train) < 2 or len(val) == 0:
        return None
    index = {c: i for i, c in enumerate(model.class_names)}
    _, train_emb = model.infer(train.pixels)
    val_logits, val_emb = model.infer(val.pixels)
    targets = np.array([index.get(r.label, -1) for r in train.records])
    return fit_ood_detector(method, train_emb, targets, val_logits, val_emb, accept_rate)


def threshold_for_accept_rate(scores, accept_rate: float = 0.95) -> float:
    """Smallest observed score t with at least `accept_rate` of `scores` <= t."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    return float(s[max(int(np.ceil(accept_rate * len(s))) - 1, 0)])


def ood_auroc(id_scores, ood_scores) -> float:
    """AUROC of telling OOD (positive) from in-distribution by the score; 0.5 = chance."""
    from sklearn.metrics import roc_auc_score

    a, b = np.asarray(id_scores, dtype=np.float64), np.asarray(ood_scores, dtype=np.float64)
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    return float(roc_auc_score(np.r_[np.zeros(len(a)), np.ones(len(b))], np.r_[a, b]))


def fpr_at_tpr(id_scores, ood_scores, tpr: float = 0.95) -> float:
    """FPR at 95% TPR (the ODIN/energy-paper convention): in-distribution is the positive class;
    the threshold accepts `tpr` of in-distribution images, and we return the fraction of OOD images
    it also accepts. 0 = perfect, lower is better."""
    a, b = np.asarray(id_scores, dtype=np.float64), np.asarray(ood_scores, dtype=np.float64)
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    return float(np.mean(b <= threshold_for_accept_rate(a, tpr)))


def all_scores(logits, embeddings, train_embeddings, train_targets, k: int = DEFAULT_K,
               states: dict[str, dict] | None = None, methods: list[str] | None = None) -> dict[str, np.ndarray]:
    """Every method's scores (or those of `methods`) for one set of images (states fitted once and reused
    through `states`)."""
    out = {}
    for method in methods or score_names():
        if states is not None and method in states:
            state = states[method]
        else:
            state = fit_state(method, train_embeddings, train_targets, k)
            if states is not None:
                states[method] = state
        out[method] = OODDetector(method, float("inf"), state).score(logits, embeddings)
    return out
