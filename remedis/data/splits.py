"""Patient-level splits and nested label budgets.

No patient is ever in two splits (images of one patient are correlated; leaking them inflates every
metric). Splits are stratified by label within each site and deterministic in the seed. Label-budget
subsets are nested (the 10% subset contains the 1% subset) because a data-efficiency curve compares
budgets, and nesting removes the noise of drawing unrelated subsets.

Example:
    >>> records = assign_splits(manifest.records, (0.6, 0.2, 0.2), seed=0)
    >>> few = budget_subset([r for r in records if r.split == "train"], 0.1, seed=0)
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, defaultdict
from dataclasses import replace

import numpy as np

from remedis.data.manifest import Record


def _rng(seed: int, *keys: str) -> np.random.Generator:
    # Derive a stream per (seed, key) so one site's split never depends on another site's rows.
    digest = hashlib.sha256("|".join([str(seed), *keys]).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def assign_splits(records: list[Record], fractions=(0.6, 0.2, 0.2), seed: int = 0, overwrite: bool = False) -> list[Record]:
    """Give every record a train/val/test split by patient, stratified by label within each site.

    Records that already have a split keep it unless `overwrite`. In a site with some labels, a patient
    with no labeled image is train (the site's unlabeled pool: nothing to evaluate it on); a patient's
    unlabeled images share the split of its labeled ones.
    """
    if all(r.split for r in records) and not overwrite:
        return list(records)
    patient_label: dict[tuple[str, str], str] = {}
    by_patient: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in records:
        by_patient[(r.site, r.patient_id)].append(r.label)
    labeled_sites = {r.site for r in records if r.label}
    split_of: dict[tuple[str, str], str] = {}
    for key, labels in by_patient.items():
        known = [lab for lab in labels if lab]
        if not known and key[0] in labeled_sites:
            split_of[key] = "train"
            continue
        patient_label[key] = Counter(known or labels).most_common(1)[0][0]  # majority label stratifies the patient
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for (site, pid), label in sorted(patient_label.items()):
        groups[(site, label)].append(pid)
    for (site, label), pids in sorted(groups.items()):
        order = _rng(seed, "split", site, label).permutation(len(pids))
        n = len(pids)
        n_train = int(round(fractions[0] * n))
        n_val = int(round(fractions[1] * n))
        if n >= 3:  # keep every split non-empty when the group allows it
            n_train = min(max(n_train, 1), n - 2)
            n_val = min(max(n_val, 1), n - n_train - 1)
        for rank, idx in enumerate(order):
            split = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
            split_of[(site, pids[idx])] = split
    return [r if (r.split and not overwrite) else replace(r, split=split_of[(r.site, r.patient_id)]) for r in records]


def budget_subset(records: list[Record], budget: float | int, seed: int = 0) -> list[Record]:
    """Labeled subset of `records`: a fraction in (0, 1] or an absolute count of images.

    Nested across budgets for one seed, stratified by label, at least one image per label.
    """
    labeled = [r for r in records if r.label != ""]
    if not labeled:
        raise ValueError("budget_subset: no labeled records")
    by_label: dict[str, list[Record]] = defaultdict(list)
    for r in sorted(labeled, key=lambda r: (str(r.image), r.patient_id)):
        by_label[r.label].append(r)
    total = len(labeled)
    if isinstance(budget, float):
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"budget fraction {budget} is not in (0, 1]")
        fraction = budget
    else:
        if budget < 1:
            raise ValueError(f"budget count {budget} must be >= 1")
        fraction = min(1.0, budget / total)
    chosen: list[Record] = []
    for label, items in sorted(by_label.items()):
        order = _rng(seed, "budget", label).permutation(len(items))  # fixed order per label => nested subsets
        k = max(1, math.ceil(fraction * len(items) - 1e-9))
        chosen.extend(items[i] for i in order[:k])
    return chosen


def carve_validation(records: list[Record], fraction: float = 0.2, seed: int = 0) -> list[Record]:
    """Move `fraction` of each site's train patients to a new `val` split, stratified by label.

    For manifests that come with train and test splits but no validation split (the usual layout of
    public datasets): the test split is never touched, and no patient ends up in two splits.

    Args:
        records: the records of one or more sites; only those with split "train" can move.
        fraction: share of the train patients (per site and majority label) that become validation.
        seed: the random stream (with the site and label), so the carve is reproducible.

    Example:
        >>> records = carve_validation(read_manifest("public.csv").records, 0.2, seed=0)
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction: must be in (0, 1), got {fraction}")
    by_patient: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in records:
        if r.split == "train":
            by_patient[(r.site, r.patient_id)].append(r.label)
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for (site, pid), labels in sorted(by_patient.items()):
        groups[(site, Counter(labels).most_common(1)[0][0])].append(pid)
    to_val: set[tuple[str, str]] = set()
    for (site, label), pids in sorted(groups.items()):
        n_val = int(round(fraction * len(pids)))
        if len(pids) >= 2:
            n_val = min(max(n_val, 1), len(pids) - 1)  # both sides keep at least one patient of the label
        order = _rng(seed, "carve-val", site, label).permutation(len(pids))
        to_val.update((site, pids[i]) for i in order[:n_val])
    return [replace(r, split="val") if r.split == "train" and (r.site, r.patient_id) in to_val else r for r in records]
