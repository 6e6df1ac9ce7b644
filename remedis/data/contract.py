"""The input contract: what an adapted model was trained on, checked on every input before the OOD score.

A feature-space OOD detector scores what the network sees, and a network trained on one modality can
embed a very different one close to its training data (a CT slice, a chest X-ray or a nuclear-medicine
image scoring "in distribution" for an ultrasound model). The contract is the cheap first line: facts
read from the file header (`SourceInfo`: DICOM modality, photometric interpretation, channels, size)
and simple intensity and texture statistics of the resized pixels, recorded at adaptation time
(`InputContract.fit`) and checked on every input (`InputContract.check`). Any mismatch is a reason
to flag the input as out of distribution, whatever the feature score says.

What is checked:
- modality, when both the contract and the input know it (DICOM Modality, or the manifest's `modality`
  column for non-DICOM training files);
- channels (from the header: a model trained on colour flags a grey upload and vice versa), and the
  photometric family (grey versus colour, e.g. a PALETTE COLOR DICOM); MONOCHROME1 versus MONOCHROME2
  is not a mismatch, the readers invert MONOCHROME1;
- size, only when clearly outside what training saw (more than `SIZE_FACTOR` times smaller or larger);
- intensity: per-image mean, std and percentiles against wide training ranges, and a joint
  intensity/texture profile (robustly standardised statistics, shrunk covariance, a threshold from
  cross-fitted distances) that catches images whose statistics are each plausible but not together.

Formats are recorded, not checked (a hospital may send PNG exports of a DICOM-trained model's images).
Reasons never carry a file name or a header value other than modality and photometric code strings.

Example:
    >>> from remedis.data.contract import InputContract, describe_file
    >>> contract = InputContract.fit([describe_file(p) for p in paths], cache.pixels)
    >>> contract.check(describe_file("ct.dcm"), pre.resize(read_image("ct.dcm")))
    ['modality CT, model trained on US', 'image 512x512 px, model trained on 96-96 x 96-96 px']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from remedis.data.formats import GREY, ImageReadError, ImageTooLargeError, SourceInfo, format_of, format_of_file
from remedis.data.preprocess import LUMA

__all__ = ["SourceInfo", "InputContract", "ImageTooLargeError", "describe_file", "describe_bytes", "image_statistics"]

SIZE_FACTOR = 2.0  # a size is a mismatch only when more than this many times outside the training range
MARGIN = 0.5  # intensity ranges: the training percentiles widened by this fraction of their span ...
FENCE = 3.0  # ... or Tukey's far-out fences (quartiles -/+ FENCE x IQR), whichever is wider
PERCENTILES = (0.5, 99.5)
PROFILE_QUANTILE = 0.995  # the joint profile accepts this share of cross-fitted training distances ...
PROFILE_FACTOR = 1.25  # ... times this factor
MIN_RANGE_IMAGES = 5  # fewer training images: no intensity ranges
MIN_PROFILE_IMAGES = 20  # fewer: no joint profile
COARSE = 32  # the coarse statistics are computed at this size, so they do not depend on the model's size
RANGE_STATS = ("mean", "std", "p05", "p50", "p95")
PROFILE_STATS = ("mean", "std", "p05", "p50", "p95", "skew", "entropy", "border", "centre_border", "top_bottom",
                 "symmetry", "gradient", "gradient_rel", "laplacian", "laplacian_rel")


def describe_file(path: str | Path, modality_hint: str | None = None) -> SourceInfo:
    """Header facts of an image file, without decoding its pixels.

    Args:
        path: a DICOM, PNG, JPEG, TIFF or NIfTI file.
        modality_hint: the modality for files whose header has none (a manifest's `modality` column).

    Raises:
        ImageReadError: the file cannot be read or its header parsed; the message names the file.

    Example:
        >>> describe_file("images/site-A/A0000_v0.png", modality_hint="US").modality
        'US'
    """
    path = Path(path)
    fmt, _ = format_of_file(path)
    return fmt.describe(path, str(path), modality_hint)


def detect_channels(records, sample: int = 64) -> int:
    """3 when any of up to `sample` records spread over the list is a colour image (RGB, YBR, a colour
    palette: read from headers only), else 1. Unreadable files are passed over (they are counted when
    decoded).

    Example:
        >>> detect_channels(manifest.records)
        3
    """
    records = list(records)
    step = max(1, len(records) // max(1, sample))
    for r in records[::step][:sample]:
        try:
            if describe_file(r.image).channels == 3:
                return 3
        except (ImageReadError, OSError):
            continue
    return 1


def stored_grey(image: np.ndarray, tolerance: float = 0.02, share: float = 0.995) -> bool:
    """Is a colour-stored image (H, W, 3) grey content: its channels equal up to rounding and chroma subsampling?

    Most ultrasound scanners (and many converters) store grey images as RGB or YBR_FULL(_422); a grey model
    must read them as grey, not flag them as colour. `share` of the pixels must have every channel within
    `tolerance` (of the image's range) of the others.

    Example:
        >>> stored_grey(np.repeat(grey[..., None], 3, axis=2))
        True
    """
    x = np.asarray(image, dtype=np.float32)
    if x.ndim != 3 or x.shape[-1] != 3:
        return False
    span = float(x.max() - x.min()) or 1.0
    spread = (x.max(axis=-1) - x.min(axis=-1)) / span
    return bool(np.mean(spread <= tolerance) >= share)


def as_grey_source(source: SourceInfo) -> SourceInfo:
    """The header facts of a colour-stored grey image as the model reads it: one channel, MONOCHROME2."""
    from dataclasses import replace

    return replace(source, channels=1, photometric="MONOCHROME2")


def describe_bytes(data: bytes, name: str = "<upload>", modality_hint: str | None = None,
                   tags: tuple[str, ...] = ()) -> SourceInfo:
    """`describe_file` for bytes (an upload): the format from the bytes and the name (`remedis.data.formats`).

    Args:
        data: the file's bytes.
        name: a name for messages and for the format of preamble-less DICOM and NIfTI (".nii", ".nii.gz").
        modality_hint: the modality when the header has none.
        tags: DICOM attributes to read by keyword into `SourceInfo.tags` (DICOM only).

    Example:
        >>> describe_bytes(open("photo.jpg", "rb").read()).channels
        3
    """
    if not data:
        raise ImageReadError(f"{name}: empty file")
    fmt = format_of(name, data[:132])
    return fmt.describe(data, name, modality_hint, tags=tags) if tags else fmt.describe(data, name, modality_hint)


# ---- statistics of the resized pixels -------------------------------------------------------------

def _as_batch(pixels) -> torch.Tensor:
    """(N, S, S) view of the pixels, in their own dtype (converted to float32 chunk by chunk). Colour
    (N, 3, S, S) pixels become their luminance (BT.601, what `Preprocessing` channels 1 would keep), so
    the statistics mean the same for grey and colour models. A 3-D input is (N, S, S); one colour image
    is (1, 3, S, S) (`InputContract.check` adds that axis)."""
    x = pixels if isinstance(pixels, torch.Tensor) else torch.as_tensor(np.asarray(pixels))
    if x.ndim == 2:
        x = x[None]
    if x.ndim == 4:
        if x.shape[1] == 3:
            x = (x.float() * torch.tensor(LUMA).view(1, 3, 1, 1)).sum(1)
        elif x.shape[1] != 1:
            x = x.float().mean(1)  # (N, C, S, S): the channels' mean
        else:
            x = x[:, 0]
    if x.ndim != 3:
        raise ValueError(f"pixels: expected (S, S), (N, S, S), (N, 1, S, S) or (N, 3, S, S), got shape {tuple(x.shape)}")
    return x


def _image_stats(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image statistics of (N, S, S) pixels in [0, 1]."""
    n = len(x)
    fine = x
    coarse = x[:, None]
    if x.shape[-2:] != (COARSE, COARSE):
        coarse = F.interpolate(coarse, size=(COARSE, COARSE), mode="bilinear", antialias=True, align_corners=False)
    c = coarse[:, 0].clamp(0.0, 1.0)
    flat = c.reshape(n, -1)
    mean, std = flat.mean(1), flat.std(1, unbiased=False)
    q = torch.quantile(flat, torch.tensor([0.05, 0.5, 0.95]), dim=1)
    z = (flat - mean[:, None]) / (std[:, None] + 1e-3)
    bins = (flat * 16).long().clamp_(0, 15)
    hist = torch.zeros(n, 16).scatter_add_(1, bins, torch.ones_like(flat)) / flat.shape[1]
    ring = torch.ones(COARSE, COARSE, dtype=torch.bool)
    ring[3:-3, 3:-3] = False
    border = c[:, ring].mean(1)
    centre = c[:, COARSE // 4: 3 * COARSE // 4, COARSE // 4: 3 * COARSE // 4].mean((1, 2))
    half = COARSE // 2
    m = c.flip(-1).reshape(n, -1)
    mc = m - m.mean(1, keepdim=True)
    xc = flat - mean[:, None]
    symmetry = (xc * mc).sum(1) / (xc.norm(dim=1) * mc.norm(dim=1) + 1e-6)
    grad = ((c[:, :, 1:] - c[:, :, :-1]).abs().mean((1, 2)) + (c[:, 1:] - c[:, :-1]).abs().mean((1, 2))) / 2
    if fine.shape[-1] >= 3 and fine.shape[-2] >= 3:
        lap = (4 * fine[:, 1:-1, 1:-1] - fine[:, :-2, 1:-1] - fine[:, 2:, 1:-1] - fine[:, 1:-1, :-2] - fine[:, 1:-1, 2:]).abs().mean((1, 2))
    else:
        lap = torch.zeros(n)
    fine_std = fine.reshape(n, -1).std(1, unbiased=False)
    return {
        "mean": mean, "std": std, "p05": q[0], "p50": q[1], "p95": q[2],
        "skew": (z ** 3).mean(1), "entropy": -(hist * torch.log(hist + 1e-9)).sum(1),
        "border": border, "centre_border": centre - border,
        "top_bottom": c[:, :half].mean((1, 2)) - c[:, half:].mean((1, 2)),
        "symmetry": symmetry, "gradient": grad, "gradient_rel": grad / (std + 1e-3),
        "laplacian": lap, "laplacian_rel": lap / (fine_std + 1e-3),
    }


def image_statistics(pixels, image_size: int | None = None, chunk: int = 256) -> dict[str, np.ndarray]:
    """The per-image statistics the contract uses, for resized pixels in [0, 1].

    Args:
        pixels: (S, S), (N, S, S), (N, 1, S, S) or (N, 3, S, S) (colour: its luminance) array or tensor
            in [0, 1] (resized, not normalised).
        image_size: resize to this size first (the contract's), when the pixels have another.
        chunk: images per step (bounds memory for large training sets).

    Example:
        >>> image_statistics(torch.rand(4, 1, 64, 64))["mean"].shape
        (4,)
    """
    x = _as_batch(pixels)
    out: dict[str, list[np.ndarray]] = {}
    with torch.inference_mode():
        for i in range(0, len(x), chunk):
            part = x[i:i + chunk].float()
            if image_size and part.shape[-2:] != (image_size, image_size):
                part = F.interpolate(part[:, None], size=(image_size, image_size), mode="bilinear", antialias=True,
                                     align_corners=False)[:, 0]
            for k, v in _image_stats(part.clamp(0.0, 1.0)).items():
                out.setdefault(k, []).append(v.double().numpy())
    return {k: np.concatenate(v) for k, v in out.items()} if out else {k: np.zeros(0) for k in PROFILE_STATS}


def _accepted_range(v: np.ndarray) -> list[float]:
    lo, q1, q3, hi = np.percentile(v, [PERCENTILES[0], 25, 75, PERCENTILES[1]])
    span, iqr = hi - lo, q3 - q1
    lo, hi = min(lo - MARGIN * span, q1 - FENCE * iqr), max(hi + MARGIN * span, q3 + FENCE * iqr)
    return [float(max(lo, 0.0)), float(min(hi, 1.0))]  # the range-checked statistics live in [0, 1]


def _fit_gauss(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre and shrunk precision of standardised statistics (shrinkage towards the diagonal grows as
    the number of images approaches the number of statistics)."""
    n, d = z.shape
    centre = np.median(z, 0)  # z is standardised about the training median: the centre of the full fit is 0
    cov = np.cov(z.T) if n > 1 else np.eye(d)
    alpha = min(1.0, max(0.05, d / max(n, 1)))
    cov = (1 - alpha) * cov + alpha * np.diag(np.maximum(np.diag(cov), 1e-6))
    try:
        precision = np.linalg.inv(cov)
    except np.linalg.LinAlgError:
        precision = np.linalg.pinv(cov, hermitian=True)
    return centre, precision


def _distance(z: np.ndarray, centre: np.ndarray, precision: np.ndarray) -> np.ndarray:
    d = z - centre
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, precision, d), 0.0))


def _fit_profile(stats: dict[str, np.ndarray], seed: int = 0) -> dict[str, Any]:
    x = np.stack([stats[k] for k in PROFILE_STATS], 1)
    n = len(x)
    loc = np.median(x, 0)
    q1, q3 = np.percentile(x, [25, 75], 0)
    scale = np.maximum(np.maximum((q3 - q1) / 1.349, 0.5 * x.std(0)), 1e-2)
    z = (x - loc) / scale
    # The threshold comes from out-of-fold distances: in-sample ones are optimistic for small sets.
    folds = np.array_split(np.random.default_rng(seed).permutation(n), 5)
    oof = np.empty(n)
    for f in folds:
        keep = np.ones(n, bool)
        keep[f] = False
        oof[f] = _distance(z[f], *_fit_gauss(z[keep]))
    _, precision = _fit_gauss(z)
    threshold = float(np.quantile(oof, PROFILE_QUANTILE) * PROFILE_FACTOR)
    lo, hi = np.percentile(x, PERCENTILES, 0)
    return {"stats": list(PROFILE_STATS), "location": loc.tolist(), "scale": scale.tolist(),
            "precision": precision.tolist(), "threshold": threshold,
            "range": [[float(a), float(b)] for a, b in zip(lo, hi)]}


def _span(values: list[int]) -> str:
    return f"{values[0]}-{values[-1]}" if values else "?"


def _num(v: float) -> str:
    return f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"


@dataclass
class InputContract:
    """What an adapted model was trained on; `check` lists how an input differs (an empty list: it conforms).

    Args:
        modalities: distinct modalities of the training images (empty: unknown, not checked).
        photometric: distinct photometric interpretations seen.
        channels: distinct channel counts seen (1 grey, 3 colour; empty: not checked).
        formats: distinct file formats seen (recorded, not checked).
        rows: [min, max] source rows seen ([]: not checked).
        columns: [min, max] source columns seen.
        intensity: accepted per-image range [lo, hi] of each statistic in `RANGE_STATS` of the resized
            [0, 1] pixels (percentiles 0.5-99.5 widened by `MARGIN` of their span, or Tukey's far-out
            fences, whichever is wider).
        n_images: training images the contract was fitted on.
        image_size: the size of the resized pixels it was fitted on (inputs of another size are resized).
        profile: the joint intensity/texture profile: statistics, their location and scale, the shrunk
            precision matrix and the distance threshold ({}: too few training images, not checked).

    Example:
        >>> contract = InputContract.fit(sources, cache.pixels)       # at adaptation time
        >>> contract.check(describe_bytes(upload), pre.resize(img))   # per input: [] or reasons
        ['colour image (3 channels), model trained on grey (1)']
        >>> InputContract.from_dict(contract.to_dict()) == contract
        True
    """

    modalities: list[str] = field(default_factory=list)
    photometric: list[str] = field(default_factory=list)
    channels: list[int] = field(default_factory=list)
    formats: list[str] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    columns: list[int] = field(default_factory=list)
    intensity: dict[str, list[float]] = field(default_factory=dict)
    n_images: int = 0
    image_size: int = 0
    profile: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def fit(cls, sources: list[SourceInfo | None] | None, pixels, seed: int = 0) -> "InputContract":
        """The contract of a training set.

        Args:
            sources: `SourceInfo` of each training image, aligned with `pixels` (None entries, or an
                empty list: header facts unknown and not checked).
            pixels: (N, C, S, S) float16/float32 in [0, 1] (C 1 or 3): the training images after
                `Preprocessing.resize`, before `normalize` (an `ImageCache.pixels`).
            seed: seed of the cross-fitting folds of the joint profile.

        Raises:
            ValueError: `sources` and `pixels` are not aligned.

        Example:
            >>> cache = load_images(records, Preprocessing(64))
            >>> sources = [describe_file(r.image, r.meta.get("modality")) for r in cache.records]
            >>> InputContract.fit(sources, cache.pixels).modalities
            ['US']
        """
        x = _as_batch(pixels)
        sources = list(sources or [])
        if sources and len(sources) != len(x):
            raise ValueError(f"sources ({len(sources)}) and pixels ({len(x)}) must be aligned")
        known = [s for s in sources if s is not None]
        sized = [s for s in known if s.rows > 0 and s.columns > 0]
        contract = cls(
            modalities=sorted({s.modality for s in known if s.modality}),
            photometric=sorted({s.photometric for s in known if s.photometric}),
            channels=sorted({int(s.channels) for s in known}),
            formats=sorted({s.format for s in known}),
            rows=[min(s.rows for s in sized), max(s.rows for s in sized)] if sized else [],
            columns=[min(s.columns for s in sized), max(s.columns for s in sized)] if sized else [],
            n_images=len(x),
            image_size=int(x.shape[-1]) if len(x) else 0,
        )
        if len(x) >= MIN_RANGE_IMAGES:
            stats = image_statistics(x)
            contract.intensity = {k: _accepted_range(stats[k]) for k in RANGE_STATS}
            if len(x) >= MIN_PROFILE_IMAGES:
                contract.profile = _fit_profile(stats, seed)
        return contract

    def check(self, source: SourceInfo | None, pixels) -> list[str]:
        """How one input differs from the training images.

        Args:
            source: the input's header facts (None: unknown, only the pixels are checked).
            pixels: (S, S), (1, S, S) or (3, S, S) in [0, 1], resized by the model's `Preprocessing.resize`,
                not normalised (other sizes are resized to the contract's).

        Returns:
            Human-readable reasons, [] when the input conforms. No file name or identifier.

        Example:
            >>> contract.check(describe_file("ct.dcm"), pre.resize(read_image("ct.dcm")))
            ['modality CT, model trained on US']
        """
        reasons = self._check_header(source) if source is not None else []
        if self.intensity or self.profile:
            x = pixels if isinstance(pixels, torch.Tensor) else torch.as_tensor(np.asarray(pixels))
            x = x[None] if x.ndim == 3 else x  # one (C, S, S) image, not C grey images
            stats = {k: float(v[0]) for k, v in image_statistics(x, self.image_size or None).items()}
            reasons += self._check_pixels(stats)
        return reasons

    def _check_header(self, s: SourceInfo) -> list[str]:
        out = []
        if s.modality and self.modalities and s.modality not in self.modalities:
            out.append(f"modality {s.modality}, model trained on {', '.join(self.modalities)}")
        if self.channels and int(s.channels) not in self.channels:
            kind = {1: "grey", 3: "colour"}
            trained = " or ".join(f"{kind.get(c, 'other')} ({c})" for c in self.channels)
            out.append(f"{kind.get(int(s.channels), 'other')} image ({s.channels} channel{'s' if s.channels != 1 else ''}), "
                       f"model trained on {trained}")
        elif self.photometric and s.photometric and s.colour not in {p not in GREY for p in self.photometric}:
            out.append(f"photometric interpretation {s.photometric}, model trained on {', '.join(self.photometric)}")
        if len(self.rows) == 2 and len(self.columns) == 2 and s.rows > 0 and s.columns > 0:
            (r0, r1), (c0, c1) = self.rows, self.columns
            if (s.rows * SIZE_FACTOR < r0 or s.rows > r1 * SIZE_FACTOR
                    or s.columns * SIZE_FACTOR < c0 or s.columns > c1 * SIZE_FACTOR):
                out.append(f"image {s.rows}x{s.columns} px, model trained on {_span(self.rows)} x {_span(self.columns)} px")
        return out

    def _check_pixels(self, stats: dict[str, float]) -> list[str]:
        out = []
        for k, (lo, hi) in self.intensity.items():
            v = stats.get(k)
            if v is not None and not lo <= v <= hi:
                out.append(f"intensity {k} {_num(v)} outside the training range {_num(lo)} to {_num(hi)}")
        p = self.profile
        if p and not out:  # a range already failed: the profile would only repeat it
            names = p["stats"]
            if all(k in stats for k in names):
                x = np.array([stats[k] for k in names])
                loc, scale = np.asarray(p["location"]), np.asarray(p["scale"])
                z = ((x - loc) / scale)[None]
                dist = float(_distance(z, np.zeros(len(names)), np.asarray(p["precision"]))[0])
                if dist > p["threshold"]:
                    i = int(np.argmax(np.abs(z[0])))
                    lo, hi = p["range"][i]
                    out.append(f"intensity/texture profile unlike the training images (distance {_num(dist)}, limit "
                               f"{_num(p['threshold'])}; furthest: {names[i]} {_num(x[i])}, training {_num(lo)} to {_num(hi)})")
        return out

    def summary(self) -> dict[str, Any]:
        """What the service's metadata shows: everything but the profile's matrix."""
        d = self.to_dict()
        d["profile"] = {"stats": self.profile.get("stats", []), "threshold": self.profile.get("threshold")} if self.profile else {}
        return d

    def to_dict(self) -> dict[str, Any]:
        """The contract as meta.json stores it."""
        return {"modalities": list(self.modalities), "photometric": list(self.photometric),
                "channels": [int(c) for c in self.channels], "formats": list(self.formats),
                "rows": [int(r) for r in self.rows], "columns": [int(c) for c in self.columns],
                "intensity": {k: [float(a), float(b)] for k, (a, b) in self.intensity.items()},
                "n_images": int(self.n_images), "image_size": int(self.image_size), "profile": dict(self.profile)}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "InputContract":
        """From `to_dict` (a model folder's meta.json); missing keys are unknown, unknown keys ignored."""
        d = d or {}
        return cls(modalities=[str(m) for m in d.get("modalities") or []],
                   photometric=[str(p) for p in d.get("photometric") or []],
                   channels=[int(c) for c in d.get("channels") or []],
                   formats=[str(f) for f in d.get("formats") or []],
                   rows=[int(r) for r in d.get("rows") or []], columns=[int(c) for c in d.get("columns") or []],
                   intensity={str(k): [float(v[0]), float(v[1])] for k, v in (d.get("intensity") or {}).items()},
                   n_images=int(d.get("n_images") or 0), image_size=int(d.get("image_size") or 0),
                   profile=dict(d.get("profile") or {}))
