"""NIfTI-1/2 volumes (.nii, .nii.gz), claimed by name; 2-D slices through nibabel: the middle slice of the
last axis by default, a chosen slice, or all of them (`frame="all"`)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from remedis.data.formats import register_format
from remedis.data.formats.base import ImageReadError, SourceInfo, code, one_line, to_unit

SUFFIXES = (".nii", ".nii.gz")


def _load(source: Path | bytes, name: str):
    """The nibabel image of a file (memory-mapped) or of its bytes (gzip when the name ends .gz)."""
    import nibabel as nib

    if not isinstance(source, bytes):
        return nib.load(str(source))
    raw = gzip.decompress(source) if name.lower().endswith(".gz") else source
    try:
        return nib.Nifti1Image.from_bytes(raw)
    except Exception:
        return nib.Nifti2Image.from_bytes(raw)


@register_format
class Nifti:
    """NIfTI volumes and images."""

    name = "nifti"
    suffixes = SUFFIXES
    fallback = False

    def claims(self, name, head):
        """A NIfTI file name (.nii, .nii.gz)."""
        return name.lower().endswith(SUFFIXES)

    def kind(self, head):
        """Never proven from leading bytes alone (a .nii.gz is gzip): None."""
        return None

    def read(self, source, name, *, window, frame, channels, limit):
        """One slice (or all with frame "all") of the volume, min-max scaled; 4-D and up: the first volume."""
        try:
            img = _load(source, name)
            shape = tuple(int(s) for s in img.shape)
        except Exception as exc:
            raise ImageReadError(f"{name}: not a readable NIfTI file ({type(exc).__name__}: {one_line(exc)})") from None
        if int(np.prod(shape)) > limit:
            raise ImageReadError(f"{name}: image too large ({'x'.join(map(str, shape))} voxels, limit {limit})")
        try:
            vol = np.asarray(img.get_fdata(), dtype=np.float32)
        except Exception as exc:
            raise ImageReadError(f"{name}: cannot decode NIfTI data ({type(exc).__name__}: {one_line(exc)})") from None
        while vol.ndim > 3:
            vol = vol[..., 0]  # time / extra dimensions: first volume
        if vol.ndim == 2:
            slices = [vol]
        elif frame == "all":
            slices = [vol[..., k] for k in range(vol.shape[-1])]
        else:
            k = vol.shape[-1] // 2 if frame in (None, "middle") else int(frame)
            if not 0 <= k < vol.shape[-1]:
                raise ImageReadError(f"{name}: slice {frame} out of range (the volume has {vol.shape[-1]})")
            slices = [vol[..., k]]
        out = [to_unit(s, name) for s in slices]
        if channels == 3:
            out = [np.repeat(o[..., None], 3, axis=-1) for o in out]
        return np.stack(out) if frame == "all" and vol.ndim == 3 else out[0]

    def describe(self, source, name, hint=None, tags=(), require_pixels=False):
        """Shape and voxel type from the header (RGB24 / RGBA32 voxels are colour)."""
        try:
            img = _load(source, name)
            shape = tuple(int(s) for s in img.header.get_data_shape())
            rgb = img.header.get_data_dtype().names is not None  # RGB24 / RGBA32 voxels are structured
        except Exception as exc:
            raise ImageReadError(f"{name}: not a readable NIfTI header ({type(exc).__name__})") from None
        if len(shape) < 2 or min(shape[:2]) < 1:
            raise ImageReadError(f"{name}: NIfTI header has no 2-D image (shape {shape})")
        frames = shape[2] if len(shape) > 2 else 1
        return SourceInfo("nifti", code(hint), "RGB" if rgb else "MONOCHROME2", 3 if rgb else 1, shape[0], shape[1], frames)

    def bits(self, source, name):
        """16: volumes hold more than 8 bits (CT, MR) and are kept at 16."""
        return 16
