"""Stage 1 — data: manifests (`data index` / `data inspect`), image readers (full-fidelity DICOM),
preprocessing, patient-level splits, label budgets, the synthetic multi-site generator, and caching
(in memory, and on disk keyed by file content)."""

from remedis.data.cache import DiskCache
from remedis.data.dataset import ImageCache, LabeledDataset, TwoViewDataset, load_images
from remedis.data.manifest import Manifest, ManifestError, Record, read_manifest, write_manifest
from remedis.data.preprocess import Preprocessing
from remedis.data.readers import ImageReadError, read_image, read_image_bytes
from remedis.data.splits import assign_splits, budget_subset

__all__ = [
    "DiskCache", "ImageCache", "LabeledDataset", "TwoViewDataset", "load_images", "Manifest", "ManifestError", "Record",
    "read_manifest", "write_manifest", "Preprocessing", "ImageReadError", "read_image", "read_image_bytes",
    "assign_splits", "budget_subset",
]
