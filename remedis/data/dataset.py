"""Decode once, cache in memory (and optionally on disk), serve tensors.

`load_images` decodes every record with `read_image`, resizes it with the run's `Preprocessing` and
keeps the result as float16 in [0, 1] (a 64 px image costs 8 KB), so epochs after the first never
touch the disk or the decoder. With `cache_dir`, decoded images are also kept on disk keyed by file
content and preprocessing (`remedis.data.cache`), so the next run does not decode either;
`num_workers` decodes in worker processes. Unreadable files are skipped and counted with their
reason instead of ending the job.

Example:
    >>> cache = load_images(records, Preprocessing(64))
    >>> cache = load_images(records, Preprocessing(64), cache_dir="~/.cache/remedis", num_workers=2)
    >>> cache.failures   # [(path, reason), ...]
    >>> ds = LabeledDataset(cache, class_names=["benign", "malignant"])
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from remedis.data.cache import DiskCache, decode
from remedis.data.manifest import Record
from remedis.data.preprocess import Preprocessing
from remedis.data.readers import ImageReadError
from remedis.progress import track

log = logging.getLogger(__name__)

STORE_EVERY = 2048  # images per on-disk cache pack


class ImageCache:
    """Decoded images and the records they came from.

    A subset is an index view: it shares the parent's pixel storage and holds only the indices it
    keeps, so the budgets, splits and per-site sets of a run cost a few bytes per image, not a copy.
    `image(i)` reads one image without copying; `pixels` gives the (N, C, S, S) float16 tensor of the
    view (the storage itself when the view is the whole cache, else a gathered copy for bulk inference).

    Args:
        records: the records that decoded, aligned with the images.
        pixels: (N, C, S, S) float16 in [0, 1], C = preprocessing.channels (the shared storage).
        preprocessing: the `Preprocessing` that produced them.
        failures: (file, reason) of the records that were skipped.
        index: positions into `pixels` of this view's images (None: all of them, in order).

    Example:
        >>> cache = ImageCache(records, torch.zeros(4, 1, 8, 8, dtype=torch.float16), Preprocessing(8))
        >>> view = cache.subset(lambda r: r.split == "train")
        >>> view.image(0).data_ptr() == cache.store[view.index[0]].data_ptr()   # no copy
        True
    """

    def __init__(self, records: list[Record], pixels: torch.Tensor, preprocessing: Preprocessing,
                 failures: list[tuple[str, str]] | None = None, index: torch.Tensor | None = None):
        if index is not None:
            index = torch.as_tensor(index, dtype=torch.long)
        if len(records) != (len(pixels) if index is None else len(index)):
            raise ValueError(f"{len(records)} records for {len(pixels) if index is None else len(index)} images")
        self.records = records
        self.store = pixels
        self.index = index
        self.preprocessing = preprocessing
        self.failures = failures if failures is not None else []

    def __len__(self) -> int:
        return len(self.records)

    @property
    def pixels(self) -> torch.Tensor:
        """The images (N, C, S, S) in [0, 1], float16: a view when this cache is a subset."""
        return self.store if self.index is None else self.store[self.index]

    def image(self, i: int) -> torch.Tensor:
        """The i-th image of this view, (C, S, S) float16, a view into the storage."""
        return self.store[i if self.index is None else int(self.index[i])]

    def subset(self, keep: Callable[[Record], bool]) -> "ImageCache":
        """The images whose record `keep` accepts, in order, as a view on the same storage."""
        idx = [i for i, r in enumerate(self.records) if keep(r)]
        base = torch.as_tensor(idx, dtype=torch.long) if self.index is None else self.index[idx]
        return ImageCache([self.records[i] for i in idx], self.store, self.preprocessing, [], index=base)


def load_images(records: list[Record], preprocessing: Preprocessing, cache_dir: str | Path | None = None,
                num_workers: int = 0, read_options: dict[str, Any] | None = None) -> ImageCache:
    """Decode + resize every record (skipping and counting unreadable ones).

    cache_dir: an on-disk cache folder (None: off); num_workers: decoding processes (0: in this
    process); read_options: keywords for `read_image` (e.g. {"window": (40, 400)} for a CT window)."""
    loader = _Loader(list(records), preprocessing, cache_dir, read_options or {})
    results: list = [None] * len(records)
    todo = list(range(len(records)))
    disk = DiskCache(cache_dir, preprocessing, read_options or {}) if cache_dir is not None else None
    if disk is not None:  # hits cost a stat and a slice: served here, before any worker starts
        for i in todo:
            results[i] = disk.lookup(records[i].image)
        todo = [i for i in todo if results[i] is None]
    computed = []
    if num_workers > 0 and len(todo) > 1:
        dl = DataLoader(Subset(loader, todo), batch_size=None, shuffle=False, num_workers=num_workers, worker_init_fn=_one_thread)
        items = iter(dl)
    else:
        items = (loader[i] for i in todo)
    for i, x, reason, key, content in track(items, "decode", total=len(todo)):  # a bar, or a line every 30 s
        results[i] = (x, reason)
        computed.append((key, content, (x, reason)))
        if disk is not None and len(computed) >= STORE_EVERY:  # an interrupted run keeps what it decoded
            disk.store(computed)
            computed = []
    if disk is not None and computed:
        disk.store(computed)  # one pack per batch: a file per image costs more than decoding it
    kept, tensors, failures = [], [], []
    for r, (x, reason) in zip(records, results):
        if x is None:
            failures.append((r.image.name, reason))
        else:
            tensors.append(x)
            kept.append(r)
    if failures:
        log.warning("skipped %d unreadable image(s) of %d; first: %s: %s", len(failures), len(records), *failures[0])
    size = preprocessing.image_size
    pixels = torch.stack(tensors) if tensors else torch.empty(0, preprocessing.channels, size, size, dtype=torch.float16)
    return ImageCache(kept, pixels, preprocessing, failures)


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)  # each worker decodes one image at a time; threads would oversubscribe


def item_seed(*parts: int) -> int:
    """A 32-bit seed from integers (seed, epoch, index): a stable hash, so an image's augmentation in an
    epoch does not depend on the order, the worker or what ran before (resumed runs repeat it exactly)."""
    return int(np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(1)[0])


def dataset_key(key) -> tuple[int, int | None]:
    """Dataset index from a plain sampler (i) or from `EpochSampler` ((i, epoch))."""
    if isinstance(key, tuple):
        return int(key[0]), int(key[1])
    return int(key), None


def augment_item(augment, x: torch.Tensor, epoch: int | None, i: int, view: int = 0) -> torch.Tensor:
    """Apply `augment` to one cached image (float32), keeping its channels."""
    if epoch is not None and hasattr(augment, "reseed"):
        augment.reseed(item_seed(getattr(augment, "seed", 0), epoch, i, view))
    return augment(x)


class EpochSampler(torch.utils.data.Sampler):
    """Shuffles by (seed, epoch) and yields (index, epoch) keys, so every epoch's order and every image's
    augmentation are functions of the seed and the epoch alone. Lightning calls `set_epoch` before each
    epoch, so a run resumed from an epoch checkpoint continues exactly as the uninterrupted run would."""

    def __init__(self, length: int, seed: int = 0, shuffle: bool = True):
        self.length, self.seed, self.shuffle, self.epoch = length, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for `epoch` (each epoch its own order, the same for the same seed)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(item_seed(self.seed, self.epoch))).tolist()
        else:
            order = range(self.length)
        return iter([(i, self.epoch) for i in order])


def seed_loader_worker(_worker_id: int) -> None:
    """DataLoader `worker_init_fn` for augmenting datasets: each worker process starts with a copy of the
    dataset, so without this every worker (and, without persistent workers, every epoch) would draw the
    same augmentations. torch gives each worker a distinct seed derived from the loader's generator,
    so the streams stay deterministic for a seed."""
    info = torch.utils.data.get_worker_info()
    torch.set_num_threads(1)
    dataset = info.dataset
    seed = info.seed % 2**32
    augment = getattr(dataset, "augment", None)
    if hasattr(augment, "reseed"):
        augment.reseed(seed)
    if isinstance(getattr(dataset, "rng", None), np.random.Generator):
        dataset.rng = np.random.default_rng(seed)


class _Loader(Dataset):
    """Index -> (index, (C, S, S) float16 or None, reason or None, cache path key, content hash);
    picklable for worker processes, which decode but never write the cache (the caller stores)."""

    def __init__(self, records: list[Record], preprocessing: Preprocessing, cache_dir, read_options: dict[str, Any]):
        self.records = records
        self.preprocessing = preprocessing
        self.cache_dir = cache_dir
        self.read_options = read_options
        self._disk = None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        path = self.records[i].image
        if self.cache_dir is not None:
            if self._disk is None:  # opened lazily: once per worker process
                self._disk = DiskCache(self.cache_dir, self.preprocessing, self.read_options)
            key, content, (x, reason) = self._disk.compute(path)
            return i, x, reason, key, content
        try:
            data = path.read_bytes()
        except OSError as exc:
            return i, None, f"cannot read file ({exc.strerror or exc})", None, None
        try:
            return i, decode(path, self.preprocessing, data, **self.read_options), None, None, None
        except ImageReadError as exc:
            return i, None, str(exc).split(": ", 1)[-1], None, None


class LabeledDataset(Dataset):
    """(normalised image, target) pairs from a cache; `augment` maps a (C, S, S) tensor in [0, 1].

    Multi-class: the target is the class index. `multi_label=True`: the target is a float multi-hot
    vector over `class_names` built from the record's `|`-separated labels."""

    def __init__(self, cache: ImageCache, class_names: list[str], augment: Callable | None = None, multi_label: bool = False):
        index = {c: i for i, c in enumerate(class_names)}
        seen = {lab for r in cache.records for lab in r.labels} if multi_label else {r.label for r in cache.records}
        unknown = sorted(seen - set(index))
        if unknown:
            raise ValueError(f"labels {unknown} are not among the model's classes {class_names}")
        self.cache = cache
        if multi_label:
            self.targets = torch.zeros(len(cache.records), len(class_names), dtype=torch.float32)
            for i, r in enumerate(cache.records):
                for lab in r.labels:
                    self.targets[i, index[lab]] = 1.0
        else:
            self.targets = torch.tensor([index[r.label] for r in cache.records], dtype=torch.long)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, key):
        i, epoch = dataset_key(key)
        x = self.cache.image(i).float()
        if self.augment is not None:
            x = augment_item(self.augment, x, epoch, i)
        return self.cache.preprocessing.normalize(x), self.targets[i]


class TwoViewDataset(Dataset):
    """Two independently augmented views of each image (SimCLR positives)."""

    def __init__(self, cache: ImageCache, augment: Callable):
        self.cache = cache
        self.augment = augment

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, key):
        i, epoch = dataset_key(key)
        x = self.cache.image(i).float()
        norm = self.cache.preprocessing.normalize
        return norm(augment_item(self.augment, x, epoch, i, 0)), norm(augment_item(self.augment, x, epoch, i, 1))
