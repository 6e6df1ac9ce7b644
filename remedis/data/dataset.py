"""Decode once, cache in memory, serve tensors.

`load_images` decodes every record with `read_image`, resizes it with the run's `Preprocessing` and
keeps the result as float16 in [0, 1] (a 64 px image costs 8 KB), so epochs after the first never
touch the disk or the decoder. Unreadable files are skipped and counted with their reason instead of
ending the job.

Example:
    >>> cache = load_images(records, Preprocessing(64))
    >>> cache.failures   # [(path, reason), ...]
    >>> ds = LabeledDataset(cache, class_names=["benign", "malignant"])
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.data import Dataset

from remedis.data.manifest import Record
from remedis.data.preprocess import Preprocessing
from remedis.data.readers import ImageReadError, read_image

log = logging.getLogger(__name__)


@dataclass
class ImageCache:
    records: list[Record]  # the records that decoded, aligned with `pixels`
    pixels: torch.Tensor  # (N, 1, S, S) float16 in [0, 1]
    preprocessing: Preprocessing
    failures: list[tuple[str, str]] = field(default_factory=list)  # (file, reason) of skipped records

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, keep: Callable[[Record], bool]) -> "ImageCache":
        idx = [i for i, r in enumerate(self.records) if keep(r)]
        return ImageCache([self.records[i] for i in idx], self.pixels[idx], self.preprocessing, [])


def load_images(records: list[Record], preprocessing: Preprocessing) -> ImageCache:
    kept, tensors, failures = [], [], []
    for r in records:
        try:
            tensors.append(preprocessing.resize(read_image(r.image)).to(torch.float16))
            kept.append(r)
        except ImageReadError as exc:
            failures.append((r.image.name, str(exc).split(": ", 1)[-1]))
    if failures:
        log.warning("skipped %d unreadable image(s) of %d; first: %s: %s", len(failures), len(records), *failures[0])
    size = preprocessing.image_size
    pixels = torch.stack(tensors) if tensors else torch.empty(0, 1, size, size, dtype=torch.float16)
    return ImageCache(kept, pixels, preprocessing, failures)


class LabeledDataset(Dataset):
    """(normalised image, class index) pairs from a cache; `augment` maps a (1, S, S) tensor in [0, 1]."""

    def __init__(self, cache: ImageCache, class_names: list[str], augment: Callable | None = None):
        index = {c: i for i, c in enumerate(class_names)}
        unknown = sorted({r.label for r in cache.records} - set(index))
        if unknown:
            raise ValueError(f"labels {unknown} are not among the model's classes {class_names}")
        self.cache = cache
        self.targets = torch.tensor([index[r.label] for r in cache.records], dtype=torch.long)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int):
        x = self.cache.pixels[i].float()
        if self.augment is not None:
            x = self.augment(x)
        return self.cache.preprocessing.normalize(x), self.targets[i]


class TwoViewDataset(Dataset):
    """Two independently augmented views of each image (SimCLR positives)."""

    def __init__(self, cache: ImageCache, augment: Callable):
        self.cache = cache
        self.augment = augment

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int):
        x = self.cache.pixels[i].float()
        norm = self.cache.preprocessing.normalize
        return norm(self.augment(x)), norm(self.augment(x))
