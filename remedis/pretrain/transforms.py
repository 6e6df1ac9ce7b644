"""Augmentation recipes for grayscale medical images, built from MONAI transforms.

One class per recipe. Both map a (1, S, S) tensor in [0, 1] to a (1, S, S) tensor in [0, 1].
Intensity distortions (gamma, contrast, brightness) replace SimCLR's colour jitter, which has no
meaning for one channel; REMEDIS found these, with crops, flips, rotation and blur, the ones that
matter for medical images.

Example:
    >>> aug = SimCLRAugment(image_size=64, seed=0)
    >>> v1, v2 = aug(x), aug(x)
"""

from __future__ import annotations

import math

import torch
from monai.data import set_track_meta
from monai.transforms import (
    Compose,
    HistogramNormalize,
    Identity,
    OneOf,
    Rand2DElastic,
    RandAdjustContrast,
    RandFlip,
    RandGaussianNoise,
    RandGaussianSmooth,
    RandRotate,
    RandScaleIntensity,
    RandShiftIntensity,
    RandSpatialCrop,
    Resize,
)


class _Recipe:
    transform: Compose

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        set_track_meta(False)  # plain tensors: MetaTensor bookkeeping costs more than the transforms here
        out = self.transform(x)
        return torch.as_tensor(out).clamp_(0.0, 1.0)

    seed: int = 0

    def reseed(self, seed: int) -> None:
        """Restart the random stream (DataLoader workers each get their own, see `seed_loader_worker`;
        training datasets reseed per (epoch, image), see `remedis.data.dataset.item_seed`)."""
        self.transform.set_random_state(seed % 2**32)


class SimCLRAugment(_Recipe):
    """Random resized crop, flip, rotation, gamma/contrast/brightness, blur and noise (strong views);
    optionally histogram equalisation and elastic deformation (off by default; `*_prob` > 0 enables)."""

    def __init__(self, image_size: int, min_crop_scale: float = 0.5, seed: int = 0, strength: float = 1.0,
                 hist_eq_prob: float = 0.0, elastic_prob: float = 0.0):
        s = image_size
        optional = []
        if hist_eq_prob > 0:
            optional.append(OneOf([HistogramNormalize(num_bins=256, min=0, max=1), Identity()],
                                  weights=[hist_eq_prob, 1 - hist_eq_prob]))
        if elastic_prob > 0:
            optional.append(Rand2DElastic(spacing=max(4, s // 4), magnitude_range=(0.5, 1.5), prob=elastic_prob,
                                          padding_mode="zeros"))
        self.transform = Compose([*optional,
            RandSpatialCrop(roi_size=max(8, int(min_crop_scale * s)), max_roi_size=s, random_size=True),
            Resize((s, s), mode="bilinear", anti_aliasing=False),
            RandFlip(prob=0.5, spatial_axis=1),
            RandRotate(range_x=math.radians(20), prob=0.5, padding_mode="zeros"),
            RandAdjustContrast(prob=0.8, gamma=(1 - 0.4 * strength, 1 + 0.6 * strength)),
            RandScaleIntensity(factors=0.3 * strength, prob=0.8),
            RandShiftIntensity(offsets=0.1 * strength, prob=0.8),
            RandGaussianSmooth(sigma_x=(0.1, 1.5), sigma_y=(0.1, 1.5), prob=0.5),
            RandGaussianNoise(prob=0.3, std=0.03 * strength),
        ])
        self.transform.set_random_state(seed)
        self.seed = seed


class FineTuneAugment(_Recipe):
    """Augmentation for supervised training and fine-tuning: crop, flip and intensity jitter whose
    magnitudes scale with `strength`. 1 is the light default (85-100% crop, gamma 0.8-1.25, 10%
    intensity scale); above 1 the crop widens (down to 50%), and rotation, brightness shift, blur and
    noise join in, growing with `strength - 1`; 0 leaves only the flip. A sweep can search it
    (`adapt.sweep_augment_strengths`): scanner and site shifts are largely intensity and texture shifts.
    """

    def __init__(self, image_size: int, seed: int = 0, strength: float = 1.0):
        if strength < 0:
            raise ValueError(f"augmentation strength must be >= 0, got {strength}")
        s, extra = image_size, max(0.0, strength - 1.0)
        steps = [
            RandSpatialCrop(roi_size=max(8, int(max(0.5, 1 - 0.15 * strength) * s)), max_roi_size=s, random_size=True),
            Resize((s, s), mode="bilinear", anti_aliasing=False),
            RandFlip(prob=0.5, spatial_axis=1),
            RandAdjustContrast(prob=0.5, gamma=(1 / (1 + 0.25 * strength), 1 + 0.25 * strength)),
            RandScaleIntensity(factors=0.1 * strength, prob=0.5),
        ]
        if extra > 0:  # appended, so strength 1 draws exactly the random numbers it always drew
            steps += [
                RandRotate(range_x=math.radians(min(30.0, 10 * extra)), prob=0.5, padding_mode="zeros"),
                RandShiftIntensity(offsets=min(0.2, 0.05 * extra), prob=0.5),
                RandGaussianSmooth(sigma_x=(0.1, 1.0), sigma_y=(0.1, 1.0), prob=min(0.5, 0.25 * extra)),
                RandGaussianNoise(prob=min(0.5, 0.25 * extra), std=min(0.05, 0.02 * extra)),
            ]
        self.transform = Compose(steps)
        self.transform.set_random_state(seed)
        self.seed = seed
        self.strength = strength
