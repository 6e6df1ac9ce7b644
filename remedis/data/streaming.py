"""Training items streamed from shards (`remedis.data.shards`) with litdata, for pretraining at scale.

Nothing holds the dataset in memory: samples come from litdata chunks (memory-mapped), are turned into
float [0, 1] pixels, augmented and normalised per item. Every random choice is a function of
(seed, epoch, group, view) (`remedis.data.dataset.item_seed` and the augment's `reseed`), never of the
order, the worker or the process, so a run resumed mid-epoch sees the views the uninterrupted run saw.
The epoch is litdata's own: `StreamingDataLoader` sets `current_epoch` (1, 2, ...) on the dataset
before every epoch and restores it from a checkpoint; items use `epoch = current_epoch - 1`, as
Lightning counts. `ShardLoader` is litdata's `StreamingDataLoader` (Lightning saves and restores its
position in checkpoints), made exact for epochs that Lightning cuts short (`max_steps_per_epoch`).

Example:
    >>> ds = StreamingTwoView("runs/x/shards", SimCLRAugment(224, seed=0), seed=0)
    >>> loader = ShardLoader(ds, batch_size=256, drop_last=True)
    >>> v1, v2 = next(iter(loader))                   # (256, C, 224, 224) normalised views
    >>> ds = StreamingLabeled("runs/x/shards", ["benign", "malignant"], FineTuneAugment(224), seed=0)
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from litdata import StreamingDataLoader, StreamingDataset

from remedis.data.dataset import augment_item, item_seed
from remedis.data.preprocess import Preprocessing
from remedis.data.shards import SCALES, ShardSet, open_shards, sample_meta


def quiet_litdata() -> None:
    """litdata logs cache sizes and fast paths at INFO on every dataset; keep remedis' INFO log readable."""
    logging.getLogger("litdata").setLevel(logging.WARNING)


def sample_pixels(sample: dict[str, Any]) -> torch.Tensor:
    """A shard sample's (G, C, S, S) integer pixels as float32 in [0, 1]."""
    px = sample["pixels"]
    x = px.astype(np.float32)
    np.divide(x, SCALES[px.dtype.name], out=x)
    return torch.from_numpy(x)


class ShardDataset(StreamingDataset):
    """Shard samples as stored (dicts, see `remedis.data.shards`); subclasses turn them into training items
    with `item(sample, epoch)`. Reads the folder's sidecar first, so a wrong folder fails by name.

    Args:
        folder: a shard folder or its `ShardSet`.
        seed: litdata's shuffle seed (chunk order and windows inside chunks, reshuffled every epoch).
        shuffle: shuffle the order (training); False streams in written order (evaluation).
        preprocessing: normalisation for the items (default: the one the shards were written with).
    """

    def __init__(self, folder: str | Path | ShardSet, seed: int = 0, shuffle: bool = True,
                 preprocessing: Preprocessing | None = None, drop_last: bool | None = None):
        self.shards = open_shards(folder)
        quiet_litdata()
        # batch_decode=0: deserialize only the requested sample. litdata's default decodes aligned windows
        # (32 samples of a 224 px image) and keeps one, which pays off for its windowed shuffle, but with the
        # full in-chunk shuffle below every sample re-decoded its window: 200k 224 px samples streamed at
        # a fraction of the 2k-sample rate (benchmarks/README.md).
        super().__init__(str(self.shards.folder), shuffle=shuffle, seed=seed, drop_last=drop_last, batch_decode=0)
        self.preprocessing = preprocessing or self.shards.preprocessing
        stored, wanted = self.shards.preprocessing, self.preprocessing
        if (wanted.image_size, wanted.channels) != (stored.image_size, stored.channels):
            raise ValueError(f"{self.shards.folder}: shards hold {stored.image_size} px, {stored.channels} channel(s); "
                             f"the run wants {wanted.image_size} px, {wanted.channels}: write shards for this preprocessing")
        self.item_seed_base = int(seed)
        self._drop_last_arg = drop_last

    def _create_shuffler(self, cache):
        """A full shuffle every epoch: the chunk order and every chunk's items permuted by (seed, epoch).
        litdata's default for a local folder (`WindowShuffle`) keeps chunks in sequential stripes and
        permutes items only inside windows of 16, so with `drop_last` the same tail samples were dropped
        every epoch (measured: 9 of 57 images never seen) and batches stayed within a chunk region."""
        from litdata.streaming.shuffle import FullShuffle, NoShuffle

        state = self._state_dict or {}
        seed, drop_last = state.get("seed", self.seed), state.get("drop_last", self.drop_last)
        if not self.shuffle:
            return NoShuffle(cache, seed, drop_last)
        return FullShuffle(cache, seed, drop_last, item_window=0)

    def set_drop_last(self, drop_last: bool) -> None:
        """One process: litdata keeps every sample of the epoch (its drop_last trims each chunk's interval
        before the shuffle, which drops the same samples every epoch); the loader's batcher then drops the
        epoch's incomplete last batch, a different one each epoch. Several processes: litdata's drop_last,
        for equal counts per rank."""
        self._drop_last_arg = drop_last
        super().set_drop_last(bool(drop_last) and self.distributed_env.world_size > 1)

    def refresh_distributed(self) -> None:
        """Detect the process group again: litdata reads it when the dataset is built, which a Lightning
        job does before DDP starts (`ShardLoader` calls this before every epoch and `len`)."""
        from litdata.utilities.env import _DistributedEnv

        env = _DistributedEnv.detect()
        if env != self.distributed_env:
            self.distributed_env = env
            self.shuffler = None
            if env.world_size > 1 and self._drop_last_arg is not False:
                self.drop_last = True  # what litdata does when built inside the process group
            elif env.world_size == 1:
                self.drop_last = False  # see set_drop_last

    @property
    def epoch(self) -> int:
        """0-based epoch of the items being produced (litdata's `current_epoch` counts from 1)."""
        return max(0, int(self.current_epoch) - 1)

    def __getitem__(self, index):
        sample = super().__getitem__(index)
        if isinstance(sample, list):  # a slice
            return [self.item(s, self.epoch) for s in sample]
        return self.item(sample, self.epoch)

    def item(self, sample: dict[str, Any], epoch: int) -> Any:
        """The sample as stored: integer pixels and its fields (`remedis.data.shards.sample_meta`)."""
        return {"pixels": sample["pixels"], **sample_meta(sample)}


class StreamingTwoView(ShardDataset):
    """SimCLR / MICLe pairs: (view1, view2), normalised. With `micle` and a group of >= 2 images, the two
    views come from two different images of the patient, picked by rng(item_seed(seed, epoch, group));
    otherwise both are views of one image (a random one of the group when `micle` is off).

    Args:
        folder: shard folder (any group size; group_size 1 gives plain SimCLR).
        augment: maps a (C, S, S) tensor in [0, 1] to one; reseeded per (epoch, group, view).
        preprocessing: normalisation (default: the shards' own).
        seed: shuffle and pair-choice seed.
        micle: pair different images of a patient when the group has several.
    """

    def __init__(self, folder: str | Path | ShardSet, augment: Callable, preprocessing: Preprocessing | None = None,
                 seed: int = 0, micle: bool = True, drop_last: bool | None = None):
        super().__init__(folder, seed=seed, preprocessing=preprocessing, drop_last=drop_last)
        self.augment, self.micle = augment, micle

    def pick(self, group: int, size: int, epoch: int) -> tuple[int, int]:
        """Indices (within the group) of the two images that make the pair."""
        if size < 2:
            return 0, 0
        rng = np.random.default_rng(item_seed(self.item_seed_base, epoch, group))
        if self.micle:
            i, j = rng.choice(size, 2, replace=False)
            return int(i), int(j)
        i = int(rng.integers(size))
        return i, i

    def item(self, sample: dict[str, Any], epoch: int):
        """Two augmented views of a shard sample (MICLe: of two images of its patient)."""
        x = sample_pixels(sample)
        group = int(sample["group"])
        i, j = self.pick(group, len(x), epoch)
        norm = self.preprocessing.normalize
        return (norm(augment_item(self.augment, x[i], epoch, group, 0)),
                norm(augment_item(self.augment, x[j], epoch, group, 1)))


class StreamingLabeled(ShardDataset):
    """(normalised image, target) from group_size-1 shards, for supervised pretraining.

    Args:
        folder: shard folder written with group_size 1.
        class_names: the model's classes; the shards' labels must be among them (checked on the sidecar).
        augment: (C, S, S) -> (C, S, S) in [0, 1], reseeded per (epoch, group); None: no augmentation.
        preprocessing: normalisation (default: the shards' own).
        seed: shuffle seed.
        multi_label: targets are multi-hot float vectors over `class_names` ("a|b" labels).
        shuffle: False streams in written order (validation).
    """

    def __init__(self, folder: str | Path | ShardSet, class_names: list[str], augment: Callable | None = None,
                 preprocessing: Preprocessing | None = None, seed: int = 0, multi_label: bool = False,
                 shuffle: bool = True, drop_last: bool | None = None):
        super().__init__(folder, seed=seed, shuffle=shuffle, preprocessing=preprocessing, drop_last=drop_last)
        if self.shards.group_size != 1:
            raise ValueError(f"{self.shards.folder}: labeled training needs shards written with group_size 1, "
                             f"these have group_size {self.shards.group_size}")
        self.index = {c: i for i, c in enumerate(class_names)}
        labels = self.shards.meta.get("labels", {})
        seen = {lab for label in labels for lab in label.split("|") if lab} if multi_label else set(labels)
        unknown = sorted(seen - set(self.index))
        if unknown:
            raise ValueError(f"{self.shards.folder}: labels {unknown} are not among the model's classes {class_names}")
        self.class_names, self.augment, self.multi_label = list(class_names), augment, multi_label

    def targets(self) -> torch.Tensor:
        """Every image's class index (from the sidecar's counts; for `class_weights`)."""
        counts = self.shards.meta.get("labels", {})
        return torch.tensor([self.index[lab] for lab, n in counts.items() for _ in range(int(n))], dtype=torch.long)

    def item(self, sample: dict[str, Any], epoch: int):
        """One (normalised, augmented image, target) pair of a shard sample."""
        x = sample_pixels(sample)[0]
        group = int(sample["group"])
        if self.augment is not None:
            x = augment_item(self.augment, x, epoch, group)
        label = json.loads(sample["meta"])["label"]
        if self.multi_label:
            target = torch.zeros(len(self.class_names), dtype=torch.float32)
            for lab in label.split("|"):
                if lab:
                    target[self.index[lab]] = 1.0
        else:
            target = torch.tensor(self.index[label], dtype=torch.long)
        return self.preprocessing.normalize(x), target


class ShardLoader(StreamingDataLoader):
    """litdata's `StreamingDataLoader` (Lightning checkpoints its position: mid-epoch resume) whose state
    says "epoch finished" once the epoch's batches are all out, including an epoch that Lightning
    stopped at `max_batches` (`max_steps_per_epoch`): without this, a run resumed from an end-of-epoch
    checkpoint would continue the cut-short litdata epoch instead of starting the next one. The order is
    a function of the seed, the epoch, and the number of processes, loader workers and the batch size
    (litdata deals chunks to workers): resume with the same ones.

    Args:
        dataset: a `ShardDataset`.
        batch_size: per process.
        max_batches: Lightning's `limit_train_batches` when an int (None: whole epochs).
        drop_last: only full batches (SimCLR); also equal counts on every process and worker.
        num_workers: loader processes.
    """

    def __init__(self, dataset: ShardDataset, batch_size: int, *, max_batches: int | None = None,
                 drop_last: bool = False, num_workers: int = 0, **kwargs: Any):
        super().__init__(dataset, batch_size=batch_size, shuffle=dataset.shuffle, drop_last=drop_last,
                         num_workers=num_workers, **kwargs)
        self.max_batches = max_batches
        self._restored_used = False
        self.full_batches_only = drop_last  # one process: the epoch's incomplete last batch is dropped here

    def __iter__(self):
        self.dataset.refresh_distributed()
        if self.restore and self._restored_used:
            # litdata keeps `restore` until an epoch runs to its end: an epoch cut short at `max_batches`
            # after a resume would otherwise replay the restored position again in the next epoch
            self.restore = False
        for batch in super().__iter__():
            self._restored_used = True
            if (self.full_batches_only and self.dataset.distributed_env.world_size == 1
                    and _batch_size(batch) < int(self.batch_size or 1)):
                continue  # only the last batch of an epoch can be short
            yield batch

    def __len__(self) -> int:
        self.dataset.refresh_distributed()
        n = super().__len__()
        if self.full_batches_only and self.dataset.distributed_env.world_size == 1:
            n = len(self.dataset) // int(self.batch_size or 1)
        return n

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        """Resume mid-epoch from a saved position."""
        super().load_state_dict(obj)
        self._restored_used = False

    def epoch_batches(self) -> int:
        """Batches per epoch (after `max_batches`)."""
        n = len(self)
        return min(n, self.max_batches) if self.max_batches else n

    def state_dict(self) -> dict[str, Any]:
        """The position in the epoch (kept in the resume state)."""
        state = super().state_dict()
        yielded = int(state.get("num_samples_yielded", 0))
        if yielded and yielded >= self.epoch_batches() * int(self.batch_size or 1):
            state = copy.deepcopy(state)  # the dataset returns its live state dict
            state["num_samples_yielded"] = 0
            state["dataset"]["num_samples_yielded"] = 0
            state["dataset"]["sample_in_epoch"] = 0
        return state


def _batch_size(batch: Any) -> int:
    """Samples in a collated batch: a tensor, a tuple/list/dict of tensors (default collate), or a list
    of samples (an identity collate_fn)."""
    if isinstance(batch, dict):
        batch = list(batch.values())
    if hasattr(batch, "shape"):
        return int(batch.shape[0])
    if isinstance(batch, (list, tuple)) and batch and hasattr(batch[0], "shape"):
        return int(batch[0].shape[0])
    return len(batch)
