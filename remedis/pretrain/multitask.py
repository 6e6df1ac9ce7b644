"""Multi-task supervised upstream: one shared backbone, one head per labeled task, batches that mix tasks.

REMEDIS's first stage is large-scale supervised pretraining. A central team pools every labeled corpus
it holds (breast ultrasound, chest X-ray, dermoscopy, CT, ...) into one upstream, each corpus with its
own label space, and hands hospitals one backbone to adapt.

- **A head per task** (`MultiTaskClassifier`): a linear layer on the backbone's pooled embedding.
  Multi-class tasks train with class-weighted cross-entropy (inverse frequency, as the single-task
  upstream), multi-label tasks with binary cross-entropy per class.
- **Mixed batches** (`TaskMixSampler`): each sample's task is drawn with probability proportional to
  the task's weight, then an image of that task (cycling through a per-epoch permutation of the task),
  so the weights set each task's share of every batch and an epoch has `length` samples whatever the
  task sizes. Order and augmentation are functions of (seed, epoch): a resumed stage equals an
  uninterrupted one. Each batch's loss is the mean over its samples of their task's loss.
- **Grey and colour together**: a 3-channel backbone; a grey task's images are kept as one channel
  and repeated at normalisation (`Preprocessing.in_chans` 3). Per-domain stems were not built: on
  the kits a shared first conv sees both (docs/evidence.md).
- **Per-task validation**: one loader over every task's validation split; each task is scored on its
  own images every epoch (AUROC: binary on the positive class, macro one-vs-rest for multi-class,
  macro per label for multi-label); the best epoch is the one with the highest mean AUROC over the tasks, and its weights are kept.

Example:
    >>> tasks = [UpstreamTask("bus", ["benign", "malignant"], 1), UpstreamTask("cxr", ["no_finding", "pneumonia"], 1, weight=2)]
    >>> model = MultiTaskClassifier("resnet18", tasks, in_chans=3)
    >>> model(torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 1, 0]))[1].shape   # task 1's logits for its 2 samples
    torch.Size([2, 2])
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import lightning as L
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from remedis.data.dataset import EpochSampler, ImageCache, augment_item, dataset_key, item_seed
from remedis.metrics import accuracy, auroc, binary_auroc
from remedis.models.backbones import create_backbone, embedding_dim
from remedis.models.layout import memory_format


@dataclass
class UpstreamTask:
    """One labeled upstream task.

    Args:
        name: the task's name (its head's key).
        class_names: its label space, in head order.
        positive_index: the class whose AUROC is reported for a binary task.
        multi_label: targets are multi-hot ("a|b" labels), trained with binary cross-entropy.
        weight: its share of every batch, relative to the other tasks' weights.
        info: provenance recorded in the backbone's history (manifest hash, sites, images, ...).
    """

    name: str
    class_names: list[str]
    positive_index: int = 1
    multi_label: bool = False
    weight: float = 1.0
    info: dict = field(default_factory=dict)


class MultiTaskClassifier(nn.Module):
    """A backbone with one linear head per task; `forward(x, task)` gives each task's logits for its samples."""

    def __init__(self, backbone_name: str, tasks: list[UpstreamTask], in_chans: int = 3):
        super().__init__()
        self.backbone_name = backbone_name
        self.tasks = [t.name for t in tasks]
        self.backbone = create_backbone(backbone_name, in_chans=in_chans)
        dim = embedding_dim(self.backbone)
        self.heads = nn.ModuleDict({t.name: nn.Linear(dim, len(t.class_names)) for t in tasks})

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features of a normalised batch."""
        return self.backbone.forward_head(self.backbone.forward_features(x))

    def forward(self, x: torch.Tensor, task: torch.Tensor) -> dict[int, torch.Tensor]:
        """{task index: logits of the samples of that task, in batch order} (tasks absent from the batch are absent)."""
        e = self.embed(x)
        return {t: self.heads[name](e[task == t]) for t, name in enumerate(self.tasks) if bool((task == t).any())}


class MultiTaskDataset(Dataset):
    """The tasks' images as one indexable set: global index g -> (normalised image, target row, task index).

    The target row has `width` entries (the largest label space): a one-hot or multi-hot vector over the
    task's classes, zero-padded, so samples of different tasks collate into one batch.

    Args:
        caches: one `ImageCache` per task (its own preprocessing: a grey task may feed a 3-channel network).
        tasks: the tasks, aligned with `caches`.
        augments: one augmentation per task (None: none), taking (C, S, S) in [0, 1] with the cache's channels.
    """

    def __init__(self, caches: list[ImageCache], tasks: list[UpstreamTask], augments: list | None = None):
        if len(caches) != len(tasks):
            raise ValueError(f"{len(caches)} image sets for {len(tasks)} tasks")
        self.caches, self.tasks = caches, tasks
        self.augments = augments or [None] * len(tasks)
        self.sizes = [len(c) for c in caches]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.width = max(len(t.class_names) for t in tasks)
        self.targets = []
        for cache, task in zip(caches, tasks):
            index = {c: i for i, c in enumerate(task.class_names)}
            rows = torch.zeros(len(cache), self.width)
            for i, r in enumerate(cache.records):
                labels = r.labels if task.multi_label else (r.label,)
                unknown = [lab for lab in labels if lab not in index]
                if unknown:
                    raise ValueError(f"task {task.name}: labels {unknown} of {r.image.name} are not among its classes {task.class_names}")
                for lab in labels:
                    rows[i, index[lab]] = 1.0
            self.targets.append(rows)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, g: int) -> tuple[int, int]:
        """Global index -> (task index, index in that task's images)."""
        t = int(np.searchsorted(self.offsets, g, side="right") - 1)
        return t, g - int(self.offsets[t])

    def __getitem__(self, key):
        g, epoch = dataset_key(key)
        t, i = self.locate(g)
        cache = self.caches[t]
        x = cache.image(i).float()
        if self.augments[t] is not None:
            x = augment_item(self.augments[t], x, epoch, g)
        return cache.preprocessing.normalize(x), self.targets[t][i], t


class TaskMixSampler(EpochSampler):
    """Yields (global index, epoch) keys of a `MultiTaskDataset`, tasks mixed by weight.

    Each of the epoch's `length` draws picks a task with probability weight / sum(weights), then the next
    image of that task's per-epoch permutation (a new permutation when one runs out), so every image of
    a task is seen before any is repeated. A function of (seed, epoch) alone.

    Args:
        sizes: images per task.
        weights: relative task weights (> 0).
        seed: the run's seed.
        length: draws per epoch (default: the total number of images).

    Example:
        >>> keys = list(TaskMixSampler([100, 10], [1.0, 1.0], seed=0))
        >>> len(keys), sum(g >= 100 for g, _ in keys)   # about half the draws from the 10-image task
        (110, 53)
    """

    def __init__(self, sizes: list[int], weights: list[float], seed: int = 0, length: int | None = None):
        if len(sizes) != len(weights) or not sizes:
            raise ValueError(f"{len(sizes)} task sizes for {len(weights)} weights")
        if any(w <= 0 for w in weights) or any(n <= 0 for n in sizes):
            raise ValueError(f"task weights and sizes must be > 0, got weights {weights}, sizes {sizes}")
        super().__init__(int(length or sum(sizes)), seed)
        self.sizes = [int(n) for n in sizes]
        self.probs = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    def __iter__(self):
        rng = np.random.default_rng(item_seed(self.seed, self.epoch, 7))
        draws = rng.choice(len(self.sizes), size=self.length, p=self.probs)
        order = np.empty(self.length, dtype=np.int64)
        for t, n in enumerate(self.sizes):
            where = np.flatnonzero(draws == t)
            if not len(where):
                continue
            rounds = -(-len(where) // n)
            perm = np.concatenate([rng.permutation(n) for _ in range(rounds)])[:len(where)]
            order[where] = self.offsets[t] + perm
        return iter([(int(g), self.epoch) for g in order])


class MultiTaskModule(L.LightningModule):
    """Trains a `MultiTaskClassifier` on batches of (image, target row, task index) (`MultiTaskDataset`).

    Args:
        model: the network.
        tasks: the tasks, aligned with the model's heads.
        class_weights: per task, the cross-entropy class weights (None: unweighted; ignored for multi-label).
        lr, weight_decay: AdamW with a one-cycle schedule, as the single-task upstream.
        label_smoothing: for multi-class tasks.
    """

    def __init__(self, model: MultiTaskClassifier, tasks: list[UpstreamTask], class_weights: list[torch.Tensor | None] | None = None,
                 lr: float = 1e-3, weight_decay: float = 1e-4, label_smoothing: float = 0.0):
        super().__init__()
        self.model, self.tasks = model, tasks
        self.lr, self.weight_decay, self.label_smoothing = lr, weight_decay, label_smoothing
        for t, w in enumerate(class_weights or [None] * len(tasks)):
            self.register_buffer(f"class_weights_{t}", w if w is not None else torch.empty(0), persistent=False)
        self.history: list[dict] = []
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_metric = -math.inf
        self._val: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._train: dict[int, list[float]] = {}
        self._seen = np.zeros(len(tasks), dtype=np.int64)

    def setup(self, stage: str) -> None:
        """Put the network in the device's memory layout."""
        self.memory_format = memory_format(self.model, self.trainer.strategy.root_device)  # before DDP wraps it
        self.model.to(memory_format=self.memory_format)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the history and best weights in the resume state."""
        checkpoint["remedis"] = {"history": self.history, "best_metric": self.best_metric, "best_state": self.best_state,
                                 "seen": self._seen.tolist()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore the history and best weights of a resumed run."""
        state = checkpoint.get("remedis", {})
        self.history = list(state.get("history", []))
        self.best_metric = state.get("best_metric", -math.inf)
        self.best_state = state.get("best_state")
        self._seen = np.asarray(state.get("seen", np.zeros(len(self.tasks))), dtype=np.int64)

    def task_losses(self, logits: dict[int, torch.Tensor], target: torch.Tensor, task: torch.Tensor) -> dict[int, torch.Tensor]:
        """{task index: summed loss of its samples} for one batch."""
        out = {}
        for t, z in logits.items():
            spec, y = self.tasks[t], target[task == t][:, :z.shape[1]]
            if spec.multi_label:
                out[t] = F.binary_cross_entropy_with_logits(z.float(), y, reduction="none").mean(1).sum()
            else:
                w = getattr(self, f"class_weights_{t}")
                per = F.cross_entropy(z.float(), y.argmax(1), weight=w if w.numel() else None,
                                      label_smoothing=self.label_smoothing, reduction="none")
                # weighted mean over the task's samples (as F.cross_entropy's "mean"), times their count
                scale = (w[y.argmax(1)].sum() if w.numel() else torch.tensor(float(len(per)), device=per.device)) / len(per)
                out[t] = per.sum() / scale
        return out

    def training_step(self, batch, batch_idx):
        """The weighted sum of each task's loss on its rows of the batch."""
        x, target, task = batch
        logits = self.model(x.contiguous(memory_format=self.memory_format), task)
        losses = self.task_losses(logits, target, task)
        loss = sum(losses.values()) / len(task)
        for t, value in losses.items():
            n = int((task == t).sum())
            self._train.setdefault(t, []).append(value.detach().item() / n)
            self._seen[t] += n
        self.log("loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        """Collect each task's probabilities and targets for the epoch's AUROC."""
        x, target, task = batch
        logits = self.model(x.contiguous(memory_format=self.memory_format), task)
        probs = torch.zeros(target.shape, dtype=torch.float32, device=target.device)  # zero-padded rows, as targets
        for t, z in logits.items():
            p = torch.sigmoid(z.float()) if self.tasks[t].multi_label else z.float().softmax(1)
            rows = torch.zeros(len(p), target.shape[1], device=p.device)
            rows[:, :p.shape[1]] = p
            probs[task == t] = rows
        self._val.append((probs.cpu(), target.cpu(), task.cpu()))

    def on_validation_epoch_end(self) -> None:
        """Per-task validation AUROC and their mean; keep the best epoch."""
        if not self._val:
            return
        probs, targets, task = (torch.cat(v) for v in zip(*self._val))
        self._val.clear()
        if self.trainer.world_size > 1:  # DDP: equal sample counts per rank; every process scores the whole split
            probs, targets, task = (self.all_gather(v.to(self.device)).flatten(0, 1).cpu() for v in (probs, targets, task))
        record: dict = {"epoch": int(self.current_epoch), "tasks": {}}
        aurocs = []
        for t, spec in enumerate(self.tasks):
            mine = task == t
            if not bool(mine.any()):
                continue
            width = len(spec.class_names)
            p, y = probs[mine][:, :width].numpy(), targets[mine][:, :width].numpy()
            score = task_auroc(spec, y, p)
            train = self._train.get(t, [])
            record["tasks"][spec.name] = {
                "val_auroc": score, "val_images": int(mine.sum()),
                "val_accuracy": None if spec.multi_label else accuracy(y.argmax(1), p),
                "train_loss": float(np.mean(train)) if train else None, "train_samples_seen": int(self._seen[t])}
            if not math.isnan(score):
                aurocs.append(score)
        self._train.clear()
        record["val_auroc"] = float(np.mean(aurocs)) if aurocs else float("nan")
        self.history.append(record)
        self.log("val_auroc", record["val_auroc"] if aurocs else 0.0, prog_bar=True)
        if aurocs and record["val_auroc"] > self.best_metric:  # strict: ties keep the earlier epoch
            self.best_metric = record["val_auroc"]
            self.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in self.model.state_dict().items()})

    def load_best(self) -> None:
        """Load the weights of the epoch with the best mean validation AUROC."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)

    def configure_optimizers(self):
        """AdamW with a one-cycle schedule."""
        opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=self.lr, weight_decay=self.weight_decay)
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=steps, pct_start=0.15)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def task_auroc(task: UpstreamTask, targets: np.ndarray, probs: np.ndarray) -> float:
    """A task's validation AUROC from its (N, C) target rows: binary on the positive class, macro
    one-vs-rest for multi-class, macro over labels with both outcomes for multi-label (NaN when undefined)."""
    if task.multi_label:
        per = [binary_auroc(targets[:, c] > 0.5, probs[:, c]) for c in range(probs.shape[1])]
        per = [a for a in per if not math.isnan(a)]
        return float(np.mean(per)) if per else float("nan")
    return auroc(targets.argmax(1), probs, task.positive_index)
