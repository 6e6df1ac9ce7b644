"""MICLe (Azizi et al. 2021): multi-instance contrastive pairs.

When a patient has several images (views of one lesion, both breasts, follow-ups), the positive pair
is two *different* images of that patient, each augmented; a patient with one image falls back to two
views of that image (plain SimCLR). Different images carry real acquisition variation that synthetic
augmentation cannot invent.

Example:
    >>> ds = MICLeDataset(cache, SimCLRAugment(64), seed=0)
    >>> v1, v2 = ds[0]      # augmented views of two images of one patient
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import numpy as np
from torch.utils.data import Dataset

from remedis.data.dataset import ImageCache, augment_item, dataset_key, item_seed


class MICLeDataset(Dataset):
    """Two views per item for SimCLR; MICLe: the second view from another image of the same patient when there is one."""

    def __init__(self, cache: ImageCache, augment: Callable, seed: int = 0):
        self.cache = cache
        self.augment = augment
        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        for i, r in enumerate(cache.records):
            groups[(r.site, r.patient_id)].append(i)
        self.partners = [groups[(r.site, r.patient_id)] for r in cache.records]
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    @property
    def multi_image_fraction(self) -> float:
        """Share of images whose patient has another image (a MICLe partner)."""
        return float(np.mean([len(p) > 1 for p in self.partners])) if self.partners else 0.0

    def partner(self, i: int, epoch: int | None = None) -> int:
        """Another image of the same patient for item `i` (itself when it has none), seeded per epoch."""
        others = [j for j in self.partners[i] if j != i]
        if not others:
            return i
        rng = self.rng if epoch is None else np.random.default_rng(item_seed(self.seed, epoch, i))
        return int(rng.choice(others))

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, key):
        i, epoch = dataset_key(key)
        j = self.partner(i, epoch)
        norm = self.cache.preprocessing.normalize
        return (norm(augment_item(self.augment, self.cache.image(i).float(), epoch, i, 0)),
                norm(augment_item(self.augment, self.cache.image(j).float(), epoch, i, 1)))
