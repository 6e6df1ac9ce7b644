"""Augmentation recipes for medical images (grey or colour), built from MONAI transforms.

One class per recipe. Both map a (C, S, S) tensor in [0, 1] to a (C, S, S) tensor in [0, 1], with C the
recipe's `channels` (1 grey, 3 RGB). For grey images, intensity distortions (gamma, contrast, brightness)
replace SimCLR's colour jitter, which has no meaning for one channel; REMEDIS found these, with crops,
flips, rotation and blur, the ones that matter for medical images. For colour images (dermoscopy,
pathology, fundus) SimCLR's own colour jitter and random grayscale are used instead. The colour steps
are MONAI `Randomizable` transforms, so `Compose.set_random_state` (and `reseed`) seed them like the
rest: the per-(seed, epoch, image) determinism of the datasets holds for colour too. Grey recipes
(`channels` 1) draw exactly the random numbers they always drew.

Example:
    >>> import torch
    >>> aug = SimCLRAugment(image_size=32, seed=0)
    >>> aug(torch.rand(1, 32, 32)).shape
    torch.Size([1, 32, 32])
    >>> rgb = SimCLRAugment(image_size=32, seed=0, channels=3)
    >>> rgb(torch.rand(3, 32, 32)).shape
    torch.Size([3, 32, 32])
"""

from __future__ import annotations

import math

import torch
import torchvision.transforms.v2.functional as TF
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
    RandomizableTransform,
    RandRotate,
    RandScaleIntensity,
    RandShiftIntensity,
    RandSpatialCrop,
    Resize,
)

from remedis.data.preprocess import LUMA


def _rgb(img, name: str) -> torch.Tensor:
    x = torch.as_tensor(img)
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"{name}: expected a (3, H, W) RGB tensor, got shape {tuple(x.shape)}")
    return x.float().clamp(0.0, 1.0)


class RandColourJitter(RandomizableTransform):
    """SimCLR's colour jitter on a (3, H, W) tensor in [0, 1]: brightness, contrast and saturation
    factors drawn from [max(0, 1 - v), 1 + v], hue shift from [-hue, hue] (fraction of the colour
    circle, at most 0.5), applied in a random order (as torchvision's `ColorJitter`), with probability
    `prob`. Randomness comes from `self.R`, so `set_random_state` makes it reproducible.

    Args:
        brightness, contrast, saturation: jitter magnitudes (0: that operation is skipped).
        hue: hue shift magnitude in [0, 0.5].
        prob: probability of jittering an image.

    Example:
        >>> jitter = RandColourJitter(0.8, 0.8, 0.8, 0.2, prob=1.0).set_random_state(0)
        >>> jitter(torch.rand(3, 8, 8)).shape
        torch.Size([3, 8, 8])
    """

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float, prob: float = 0.8):
        RandomizableTransform.__init__(self, prob)
        for name, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if v < 0:
                raise ValueError(f"colour jitter {name} must be >= 0, got {v}")
        if not 0 <= hue <= 0.5:
            raise ValueError(f"colour jitter hue must be in [0, 0.5], got {hue}")
        self.magnitudes = (float(brightness), float(contrast), float(saturation), float(hue))
        self._order: list[int] = []
        self._factors: list[float] = []

    def randomize(self, data=None) -> None:
        """Draw this call's brightness, contrast, saturation and hue factors."""
        super().randomize(None)
        if not self._do_transform:
            return
        b, c, s, h = self.magnitudes
        self._order = [int(i) for i in self.R.permutation(4)]
        self._factors = [float(self.R.uniform(max(0.0, 1 - v), 1 + v)) for v in (b, c, s)] + [float(self.R.uniform(-h, h))]

    def __call__(self, img, randomize: bool = True) -> torch.Tensor:
        """The (3, H, W) image jittered with probability `prob` (new factors unless `randomize` is False)."""
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        x = _rgb(img, "RandColourJitter")
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for i in self._order:
            if self.magnitudes[i] > 0:  # a zero magnitude still draws its factor: the stream does not depend on it
                x = ops[i](x, self._factors[i])
        return x


class RandGrayscale(RandomizableTransform):
    """With probability `prob`, replace a (3, H, W) RGB tensor by its luminance (BT.601, as
    `Preprocessing`) repeated on the three channels (SimCLR's random grayscale).

    Example:
        >>> g = RandGrayscale(prob=1.0).set_random_state(0)(torch.rand(3, 8, 8))
        >>> bool((g[0] == g[1]).all() and (g[1] == g[2]).all())
        True
    """

    def __init__(self, prob: float = 0.2):
        RandomizableTransform.__init__(self, prob)

    def __call__(self, img, randomize: bool = True) -> torch.Tensor:
        """The (3, H, W) image as its luminance on every channel, with probability `prob`."""
        if randomize:
            self.randomize(None)
        if not self._do_transform:
            return img
        x = _rgb(img, "RandGrayscale")
        grey = (x * torch.tensor(LUMA, dtype=x.dtype).view(3, 1, 1)).sum(0, keepdim=True)
        return grey.expand(3, -1, -1).contiguous()


def _check_channels(channels: int) -> int:
    if channels not in (1, 3):
        raise ValueError(f"augmentation channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    return int(channels)


class _Recipe:
    transform: Compose
    channels: int = 1
    seed: int = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[0] != self.channels:
            raise ValueError(f"{type(self).__name__}(channels={self.channels}): expected a ({self.channels}, S, S) "
                             f"tensor, got shape {tuple(x.shape)}")
        set_track_meta(False)  # plain tensors: MetaTensor bookkeeping costs more than the transforms here
        out = self.transform(x)
        return torch.as_tensor(out).clamp_(0.0, 1.0)

    def reseed(self, seed: int) -> None:
        """Restart the random stream (DataLoader workers each get their own, see `seed_loader_worker`;
        training datasets reseed per (epoch, image), see `remedis.data.dataset.item_seed`)."""
        self.transform.set_random_state(seed % 2**32)


class SimCLRAugment(_Recipe):
    """Random resized crop, flip, rotation, blur and noise (strong views), with gamma/contrast/brightness
    distortions for grey images (`channels` 1) or SimCLR's colour jitter (brightness, contrast,
    saturation 0.8 * strength, hue 0.2 * strength, p 0.8) and random grayscale (p 0.2) for RGB
    (`channels` 3); optionally histogram equalisation and elastic deformation (off by default;
    `*_prob` > 0 enables).

    Args:
        image_size: output side S.
        min_crop_scale: smallest crop side as a fraction of S.
        seed: random stream seed (see `reseed`).
        strength: scales the intensity / colour distortions.
        hist_eq_prob, elastic_prob: probabilities of the optional steps.
        channels: 1 (grey, (1, S, S) in and out) or 3 (RGB, (3, S, S)).

    Example:
        >>> aug = SimCLRAugment(32, seed=0, channels=3)
        >>> aug(torch.rand(3, 32, 32)).shape
        torch.Size([3, 32, 32])
    """

    def __init__(self, image_size: int, min_crop_scale: float = 0.5, seed: int = 0, strength: float = 1.0,
                 hist_eq_prob: float = 0.0, elastic_prob: float = 0.0, channels: int = 1):
        self.channels = _check_channels(channels)
        s = image_size
        optional = []
        if hist_eq_prob > 0:
            optional.append(OneOf([HistogramNormalize(num_bins=256, min=0, max=1), Identity()],
                                  weights=[hist_eq_prob, 1 - hist_eq_prob]))
        if elastic_prob > 0:
            optional.append(Rand2DElastic(spacing=max(4, s // 4), magnitude_range=(0.5, 1.5), prob=elastic_prob,
                                          padding_mode="zeros"))
        if self.channels == 1:
            appearance = [
                RandAdjustContrast(prob=0.8, gamma=(1 - 0.4 * strength, 1 + 0.6 * strength)),
                RandScaleIntensity(factors=0.3 * strength, prob=0.8),
                RandShiftIntensity(offsets=0.1 * strength, prob=0.8),
            ]
        else:  # SimCLR's colour distortion, which the grey intensity steps stand in for
            v = 0.8 * strength
            appearance = [RandColourJitter(v, v, v, min(0.5, 0.2 * strength), prob=0.8), RandGrayscale(prob=0.2)]
        self.transform = Compose([*optional,
            RandSpatialCrop(roi_size=max(8, int(min_crop_scale * s)), max_roi_size=s, random_size=True),
            Resize((s, s), mode="bilinear", anti_aliasing=False),
            RandFlip(prob=0.5, spatial_axis=1),
            RandRotate(range_x=math.radians(20), prob=0.5, padding_mode="zeros"),
            *appearance,
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
    RGB (`channels` 3) adds a mild colour jitter (brightness, contrast, saturation 0.1 * strength, hue
    0.02 * strength, p 0.5) after the intensity steps (which act on all channels together).

    Args:
        image_size: output side S.
        seed: random stream seed (see `reseed`).
        strength: augmentation magnitude (>= 0).
        channels: 1 (grey, (1, S, S) in and out) or 3 (RGB, (3, S, S)).

    Example:
        >>> FineTuneAugment(32, seed=0, channels=3)(torch.rand(3, 32, 32)).shape
        torch.Size([3, 32, 32])
    """

    def __init__(self, image_size: int, seed: int = 0, strength: float = 1.0, channels: int = 1):
        if strength < 0:
            raise ValueError(f"augmentation strength must be >= 0, got {strength}")
        self.channels = _check_channels(channels)
        s, extra = image_size, max(0.0, strength - 1.0)
        steps = [
            RandSpatialCrop(roi_size=max(8, int(max(0.5, 1 - 0.15 * strength) * s)), max_roi_size=s, random_size=True),
            Resize((s, s), mode="bilinear", anti_aliasing=False),
            RandFlip(prob=0.5, spatial_axis=1),
            RandAdjustContrast(prob=0.5, gamma=(1 / (1 + 0.25 * strength), 1 + 0.25 * strength)),
            RandScaleIntensity(factors=0.1 * strength, prob=0.5),
        ]
        if self.channels == 3 and strength > 0:  # grey recipes never see this, so their stream is unchanged
            v = 0.1 * strength
            steps.append(RandColourJitter(v, v, v, min(0.5, 0.02 * strength), prob=0.5))
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
