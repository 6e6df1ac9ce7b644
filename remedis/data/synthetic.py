"""Embedded synthetic multi-site "breast ultrasound" dataset.

Lets the whole pipeline (pretraining, MICLe, fine-tuning, cross-site evaluation)
run with no real data.  Every patient has one hypoechoic lesion in textured
tissue; the label is a property of the image content:

* ``benign``    -- smooth, mostly elliptical margin, "wider than tall", posterior
  acoustic enhancement;
* ``malignant`` -- irregular / spiculated margin (radius modulated by random
  angular harmonics and spikes), slightly darker, less posterior enhancement.

The distributions overlap on purpose (mildly lobulated benign, mildly irregular
malignant) so the task is learnable but not trivial.  Each site re-renders the
same kind of anatomy through a different "scanner" (:class:`SiteSpec`: speckle,
gain, blur, resolution, gamma, file format), which gives a realistic domain
shift between sites.  A patient has 1..N images that are different views of the
*same* lesion (shifted / rotated / rescaled crop, fresh speckle) -- positives
for MICLe.

Usage::

    from remedis.data.synthetic import SyntheticSpec, generate_synthetic

    manifest = generate_synthetic("/tmp/synth", SyntheticSpec(patients_per_site=50), seed=0)
    # /tmp/synth/manifest.csv  columns: image,label,site,patient_id,split,view
    # /tmp/synth/images/site-A/A0000_v0.png ... images/site-C/C0000_v0.dcm

Output is fully deterministic in ``(spec, seed)``: each image is drawn from its
own RNG seeded by ``(seed, site index, patient index, stream)``, so nothing
depends on iteration order; PNGs (and DICOMs, whose UIDs are derived from the
same seeds) are byte-identical across runs.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

__all__ = [
    "SiteSpec",
    "SyntheticSpec",
    "DEFAULT_SITES",
    "MANIFEST_COLUMNS",
    "generate_synthetic",
    "write_dicom",
]

MANIFEST_COLUMNS = ("image", "label", "site", "patient_id", "split", "view", "modality")
SPLITS = ("train", "val", "test")
_FORMATS = ("png", "dcm")

# Fixed "stream" ids mixed into the seed sequence, so different random
# decisions never share a stream.
_STREAM_LABELS = 1_000_001
_STREAM_SPLITS = 1_000_002
_STREAM_ANATOMY = 1_000_003
# views use stream = view index (0..max_images-1)


@dataclass(frozen=True)
class SiteSpec:
    """Acquisition characteristics of one site ("scanner")."""

    name: str
    speckle: float  # multiplicative speckle noise strength (std of gamma noise with mean 1)
    gain: float  # overall brightness multiplier
    blur: float  # gaussian blur sigma in pixels (at output size)
    resolution: float  # 1.0 = native; 0.5 = rendered at half res and upsampled (loss of detail)
    gamma: float  # intensity curve exponent applied to [0,1] image
    file_format: str = "png"  # "png" or "dcm"
    patients: int | None = None  # overrides SyntheticSpec.patients_per_site (e.g. a larger source site)


DEFAULT_SITES: tuple[SiteSpec, ...] = (
    # clean-ish reference scanner
    SiteSpec("site-A", speckle=0.25, gain=1.0, blur=0.6, resolution=1.0, gamma=1.0, file_format="png"),
    # noisy, dark, contrast-compressing display curve
    SiteSpec("site-B", speckle=0.45, gain=0.75, blur=0.3, resolution=1.0, gamma=1.4, file_format="png"),
    # old low-resolution device, heavily smoothed, bright, exports DICOM
    SiteSpec("site-C", speckle=0.20, gain=1.3, blur=1.5, resolution=0.5, gamma=0.8, file_format="dcm"),
)


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate.  Validated by :func:`generate_synthetic`."""

    sites: tuple[SiteSpec, ...] = DEFAULT_SITES
    patients_per_site: int = 150
    max_images_per_patient: int = 3  # 1..max views of the SAME lesion per patient (MICLe positives)
    image_size: int = 96
    malignant_fraction: float = 0.4
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train/val/test, by patient

    def patients_of(self, site: SiteSpec) -> int:
        """Patients of one site (its own count, else `patients_per_site`)."""
        return site.patients if site.patients is not None else self.patients_per_site

    def validate(self) -> None:  # noqa: C901 - one independent check per field
        """Check the spec; a ValueError names the field."""
        if len(self.sites) == 0:
            raise ValueError("SyntheticSpec.sites must contain at least one SiteSpec")
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate site names in SyntheticSpec.sites: {names}")
        for s in self.sites:
            if not isinstance(s, SiteSpec):
                raise ValueError(f"sites must be SiteSpec instances, got {type(s).__name__}")
            if not s.name or any(c in s.name for c in "/\\") or s.name in (".", ".."):
                raise ValueError(f"site name {s.name!r} is not usable as a directory name")
            if s.file_format not in _FORMATS:
                raise ValueError(f"site {s.name!r}: unknown file_format {s.file_format!r} (expected one of {_FORMATS})")
            if not (s.speckle >= 0 and s.blur >= 0):
                raise ValueError(f"site {s.name!r}: speckle and blur must be >= 0")
            if not (s.gain > 0 and s.gamma > 0):
                raise ValueError(f"site {s.name!r}: gain and gamma must be > 0")
            if not (0 < s.resolution <= 1):
                raise ValueError(f"site {s.name!r}: resolution must be in (0, 1], got {s.resolution}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if self.patients_per_site < 1:
            raise ValueError(f"patients_per_site must be >= 1, got {self.patients_per_site}")
        for s in self.sites:
            if s.patients is not None and s.patients < 1:
                raise ValueError(f"site {s.name!r}: patients must be >= 1, got {s.patients}")
        if self.max_images_per_patient < 1:
            raise ValueError(f"max_images_per_patient must be >= 1, got {self.max_images_per_patient}")
        if not (0.0 <= self.malignant_fraction <= 1.0):
            raise ValueError(f"malignant_fraction must be in [0, 1], got {self.malignant_fraction}")
        fr = tuple(self.split_fractions)
        if len(fr) != 3 or any(f < 0 for f in fr) or not math.isclose(sum(fr), 1.0, abs_tol=1e-6):
            raise ValueError(f"split_fractions must be 3 non-negative numbers summing to 1, got {fr}")


# --------------------------------------------------------------------------- ids / splits


def _site_prefix(index: int) -> str:
    """0->A, 25->Z, 26->AA ... (letters only, so prefix+digits ids never collide)."""
    out = ""
    index += 1
    while index:
        index, r = divmod(index - 1, 26)
        out = chr(ord("A") + r) + out
    return out


def _patient_id(site_index: int, patient_index: int, n_patients: int) -> str:
    width = max(4, len(str(n_patients - 1)))
    return f"{_site_prefix(site_index)}{patient_index:0{width}d}"


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, stream)]))


def _split_counts(n: int, fractions: tuple[float, float, float]) -> list[int]:
    """Largest-remainder allocation; every split with a positive fraction gets >=1 item when possible."""
    raw = [f * n for f in fractions]
    counts = [int(math.floor(r)) for r in raw]
    for i in sorted(range(3), key=lambda i: raw[i] - counts[i], reverse=True)[: n - sum(counts)]:
        counts[i] += 1
    # Small strata: steal from the largest split so val/test are never empty.
    for i in range(3):
        if fractions[i] > 0 and counts[i] == 0:
            j = int(np.argmax(counts))
            if counts[j] > 1:
                counts[j] -= 1
                counts[i] += 1
    return counts


def _labels_and_splits(spec: SyntheticSpec, seed: int, site_index: int, n: int) -> tuple[np.ndarray, list[str]]:
    n_mal = int(round(spec.malignant_fraction * n))
    labels = np.zeros(n, dtype=bool)
    labels[_rng(seed, site_index, _STREAM_LABELS).permutation(n)[:n_mal]] = True
    splits = [""] * n
    split_rng = _rng(seed, site_index, _STREAM_SPLITS)
    for lab in (False, True):  # stratify by label within the site
        idx = np.flatnonzero(labels == lab)
        idx = idx[split_rng.permutation(len(idx))]
        counts = _split_counts(len(idx), tuple(spec.split_fractions))
        start = 0
        for name, c in zip(SPLITS, counts):
            for i in idx[start : start + c]:
                splits[i] = name
            start += c
    return labels, splits


# --------------------------------------------------------------------------- rendering


# Largest view reach: scale 1.15 * half-width 0.5 * (cos 15deg + sin 15deg) + shift 0.08 ~= 0.78.
_CANVAS_HALF_EXTENT = 0.8


def _canvas_pixels(size: int) -> int:
    return int(math.ceil(2 * _CANVAS_HALF_EXTENT * size))


def _unit_noise(rng: np.random.Generator, shape: tuple[int, int], sigma) -> np.ndarray:
    """Smoothed gaussian noise normalised to zero mean / unit std (a texture field)."""
    # float32 + truncate=3: texture only needs to look right, and this is the hot path.
    f = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap", truncate=3.0)
    return (f - f.mean()) / (f.std() + 1e-8)


def _render_patient(rng: np.random.Generator, malignant: bool, size: int) -> np.ndarray:  # long: one patient's anatomy, step by step
    """Noise-free echogenicity map of one patient's tissue + lesion.

    The canvas covers [-E, E]^2 in "view units" (a default view sees [-0.5, 0.5]^2;
    E = _CANVAS_HALF_EXTENT) at ~size pixels per unit, so rotated / rescaled /
    shifted views stay inside it.
    """
    n = _canvas_pixels(size)
    # float32 throughout: halves the cost of the full-canvas trig below.
    coords = (((np.arange(n) + 0.5) / n * 2 - 1) * _CANVAS_HALF_EXTENT).astype(np.float32)
    x, y = coords[None, :], coords[:, None]  # broadcast grids; y grows with depth

    # Tissue: horizontal fibro-glandular layers + fine blobby parenchyma.
    k = n / (2 * _CANVAS_HALF_EXTENT)  # canvas pixels per view unit; sigmas below are in view units
    layers = _unit_noise(rng, (n, n), (0.012 * k, 0.12 * k))
    blobs = _unit_noise(rng, (n, n), 0.02 * k)
    tissue = 0.55 + 0.09 * layers + 0.06 * blobs

    # Lesion geometry; benign tends to be "wider than tall" (parallel orientation).
    cx, cy = rng.uniform(-0.15, 0.15), rng.uniform(-0.10, 0.15)
    a = rng.uniform(0.09, 0.21)
    b = a * rng.uniform(0.5, 0.95)
    theta = rng.normal(0.0, 0.35) if not malignant else rng.uniform(-math.pi / 2, math.pi / 2)

    # Irregularity level q in [0,1]; overlapping distributions keep the task non-trivial.
    q = rng.beta(1.3, 6.0) if not malignant else rng.beta(3.0, 2.5)

    dx, dy = x - cx, y - cy
    ct, st = math.cos(theta), math.sin(theta)
    u = (dx * ct + dy * st) / a
    v = (-dx * st + dy * ct) / b
    rho = np.hypot(u, v)
    phi = np.arctan2(v, u)

    # Boundary radius R(phi): gentle lobulation for everyone, + harmonics and spikes scaled by q.
    # Built on a 1-D angular grid and interpolated (cheap: no per-harmonic full-image trig).
    ang = np.linspace(-math.pi, math.pi, 1025)
    radius_1d = np.ones_like(ang)
    for h in (2, 3):
        radius_1d += rng.uniform(0.0, 0.06) * np.cos(h * ang + rng.uniform(0, 2 * math.pi))
    for h in rng.choice(np.arange(4, 13), size=4, replace=False):
        radius_1d += q * rng.uniform(0.03, 0.12) * np.cos(h * ang + rng.uniform(0, 2 * math.pi))
    for _ in range(rng.poisson(1 + 9 * q)):
        d = np.angle(np.exp(1j * (ang - rng.uniform(-math.pi, math.pi))))  # wrapped angular distance
        width = rng.uniform(0.05, 0.15)
        radius_1d += q * rng.uniform(0.2, 0.6) * np.exp(-0.5 * (d / width) ** 2)
    radius = np.interp(phi, ang, radius_1d).astype(np.float32)
    # Malignant margins are less sharp (angular / indistinct); soft edge width in rho units.
    edge = rng.uniform(0.03, 0.06) + (0.04 * q)
    mask = 0.5 + 0.5 * np.tanh((radius - rho) / (2 * edge))  # logistic sigmoid, overflow-free

    # Hypoechoic interior with weak internal echoes; malignant a little darker.
    level = rng.normal(0.16, 0.04) if malignant else rng.normal(0.22, 0.04)
    interior = float(np.clip(level, 0.05, 0.4)) * (1 + 0.25 * blobs)

    # Posterior acoustic enhancement (benign) vs none / mild shadowing (malignant).
    pe = rng.uniform(-0.15, 0.12) if malignant else rng.uniform(0.08, 0.35)
    half_w = math.hypot(a * ct, b * st)
    half_h = math.hypot(a * st, b * ct)
    depth_below = dy - half_h * 0.5
    column = np.exp(-((dx / (0.9 * half_w)) ** 4))
    posterior = np.clip(depth_below / half_h, 0, 1) * np.exp(-np.maximum(depth_below - half_h, 0) / 0.35)
    tissue = tissue * (1 + pe * column * posterior)

    return tissue * (1 - mask) + interior * mask


def _view_of(canvas: np.ndarray, rng: np.random.Generator, view: int, out_size: int) -> np.ndarray:
    """Crop one view (rotation / scale / shift of the probe) from the patient canvas."""
    n = canvas.shape[0]
    if view == 0:
        angle, scale, shift = 0.0, 1.0, np.zeros(2)
    else:
        angle = rng.uniform(-15, 15) * math.pi / 180
        scale = rng.uniform(0.85, 1.15)
        shift = rng.uniform(-0.08, 0.08, size=2)
    # Output pixel (i, j) -> view coords in [-0.5, 0.5] * scale, rotated, shifted -> canvas pixel.
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]]) * scale
    k = n / (2 * _CANVAS_HALF_EXTENT)  # canvas pixels per view unit
    matrix = rot * (k / out_size)
    centre_out = (out_size - 1) / 2.0
    centre_in = (n - 1) / 2.0 + shift * k
    offset = centre_in - matrix @ np.array([centre_out, centre_out])
    return ndimage.affine_transform(canvas, matrix, offset=offset, output_shape=(out_size, out_size), order=1, mode="reflect")


def _acquire(canvas: np.ndarray, rng: np.random.Generator, view: int, site: SiteSpec, size: int) -> np.ndarray:
    """Image the canvas through one site's scanner; returns float image in [0, 1]."""
    n_r = max(8, int(round(size * site.resolution)))
    img = _view_of(canvas, rng, view, n_r)
    # Depth attenuation is tied to the probe (view), not to the tissue.
    img = img * (1.0 - 0.3 * np.linspace(0, 1, n_r))[:, None]
    if site.speckle > 0:
        k = 1.0 / site.speckle**2  # gamma(k, 1/k): mean 1, std = speckle
        img = img * rng.gamma(k, 1.0 / k, size=img.shape)
    if n_r != size:  # low-resolution device: detail lost, then upsampled
        img = ndimage.zoom(img, size / n_r, order=1, mode="nearest", grid_mode=True)
        img = img[:size, :size]
        if img.shape != (size, size):
            img = np.pad(img, [(0, size - img.shape[0]), (0, size - img.shape[1])], mode="edge")
    if site.blur > 0:
        img = ndimage.gaussian_filter(img, site.blur, mode="nearest")
    img = np.clip(img * site.gain, 0.0, 1.0) ** site.gamma
    return img


# --------------------------------------------------------------------------- writers


def write_dicom(  # long: a DICOM header, attribute by attribute
    path: str | Path,
    pixels_uint16: np.ndarray,
    patient_id: str,
    site: str,
    modality: str = "US",
    *,
    uid_seed: str | None = None,
) -> None:
    """Write a single-frame MONOCHROME2 DICOM Part-10 file (Ultrasound Image Storage).

    ``pixels_uint16`` is a 2-D non-negative integer array.  Values 0..4095 are
    stored with BitsStored 12 (the normal case); larger values up to 65535 fall
    back to BitsStored 16.  ``site`` goes into Manufacturer / InstitutionName.
    If ``uid_seed`` is given the UIDs are derived from it (reproducible files),
    otherwise they are random.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    arr = np.asarray(pixels_uint16)
    if arr.ndim != 2:
        raise ValueError(f"write_dicom expects a 2-D array, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise ValueError(f"write_dicom expects integer pixels, got dtype {arr.dtype}")
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise ValueError(f"pixel values must be in [0, 65535], got [{lo}, {hi}]")
    arr = np.ascontiguousarray(arr, dtype="<u2")
    bits_stored = 12 if hi <= 4095 else 16

    def uid(tag: str) -> str:
        return generate_uid(entropy_srcs=[uid_seed, tag]) if uid_seed is not None else generate_uid()

    sop_class = "1.2.840.10008.5.1.4.1.1.6.1"  # Ultrasound Image Storage
    sop_instance = uid("sop")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.PatientID = str(patient_id)
    ds.PatientName = str(patient_id)
    ds.Modality = modality
    ds.Manufacturer = site
    ds.InstitutionName = site
    ds.StudyDate = "20240101"  # fixed so files are reproducible
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(arr.shape[0]), int(arr.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope = 1
    ds.RescaleIntercept = 0
    top = (1 << bits_stored) - 1
    ds.WindowCenter = top / 2 + 0.5
    ds.WindowWidth = top + 1
    ds.PixelData = arr.tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def _write_png(path: Path, img01: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.round(img01 * 255).astype(np.uint8), mode="L").save(path, format="PNG")


# --------------------------------------------------------------------------- main entry point


def generate_synthetic(output_dir: str | Path, spec: SyntheticSpec = SyntheticSpec(), seed: int = 0) -> Path:
    """Write images under output_dir/images/<site>/ and output_dir/manifest.csv; return the manifest path."""
    spec.validate()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = spec.image_size
    rows: list[dict[str, str]] = []

    for si, site in enumerate(spec.sites):
        site_dir = out / "images" / site.name
        site_dir.mkdir(parents=True, exist_ok=True)
        n_patients = spec.patients_of(site)
        labels, splits = _labels_and_splits(spec, seed, si, n_patients)
        for pi in range(n_patients):
            pid = _patient_id(si, pi, n_patients)
            # One anatomy per patient, shared by all its views (MICLe positives);
            # each view then gets its own probe pose and speckle realisation.
            arng = _rng(seed, si, pi, _STREAM_ANATOMY)
            n_views = int(arng.integers(1, spec.max_images_per_patient + 1))
            canvas = _render_patient(arng, bool(labels[pi]), size)
            for view in range(n_views):
                img = _acquire(canvas, _rng(seed, si, pi, view), view, site, size)
                fname = f"{pid}_v{view}.{site.file_format}"
                path = site_dir / fname
                if site.file_format == "png":
                    _write_png(path, img)
                else:
                    write_dicom(
                        path,
                        np.round(img * 4095).astype(np.uint16),
                        patient_id=pid,
                        site=site.name,
                        uid_seed=f"remedis-synthetic/{seed}/{site.name}/{pid}/{view}",
                    )
                rows.append(
                    {
                        "image": f"images/{site.name}/{fname}",
                        "label": "malignant" if labels[pi] else "benign",
                        "site": site.name,
                        "patient_id": pid,
                        "split": splits[pi],
                        "view": str(view),
                        "modality": "US",  # the DICOM sites' header says so too; the input contract reads it
                    }
                )

    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(MANIFEST_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return manifest
