"""Stage 1 — data: manifests, image readers, preprocessing, patient-level splits, label budgets, the
synthetic multi-site generator, and in-memory caching."""

from remedis.data.dataset import ImageCache, LabeledDataset, TwoViewDataset, load_images
from remedis.data.manifest import Manifest, ManifestError, Record, read_manifest, write_manifest
from remedis.data.preprocess import Preprocessing
from remedis.data.readers import ImageReadError, read_image, read_image_bytes
from remedis.data.splits import assign_splits, budget_subset

__all__ = [
    "ImageCache", "LabeledDataset", "TwoViewDataset", "load_images", "Manifest", "ManifestError", "Record",
    "read_manifest", "write_manifest", "Preprocessing", "ImageReadError", "read_image", "read_image_bytes",
    "assign_splits", "budget_subset",
]
