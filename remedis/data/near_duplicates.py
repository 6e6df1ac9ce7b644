"""Near-duplicate images across splits and across patients, by perceptual hash.

Public datasets often hold the same image twice (a resaved copy, a crop, an annotated twin) under two
file names, and some give every image its own patient id. Such twins in train and test make test
figures optimistic, and a "patient" bootstrap over them is an image bootstrap. Each decoded image gets
a 64-bit DCT perceptual hash (`imagehash.phash` of the image as 8-bit grey); two images whose hashes
differ in at most `max_distance` bits are near-duplicates (0: the same picture up to resizing and
compression). Pairs are reported by manifest row, never by patient identifier.

Example:
    >>> hashes = perceptual_hash(read_image("a.png"))
    >>> pairs = near_duplicate_pairs(np.array([h1, h2, h3], dtype=np.uint64), max_distance=4)
"""

from __future__ import annotations

from typing import Any

import numpy as np

MAX_DISTANCE = 4  # of 64 bits: resized, recompressed or lightly edited copies, not merely similar anatomy


def perceptual_hash(image: np.ndarray) -> int:
    """The 64-bit DCT perceptual hash of a decoded image ((H, W) or (H, W, C), any range), as grey."""
    import imagehash
    from PIL import Image

    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim == 3:
        arr = arr.mean(axis=2)
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    grey = np.zeros(arr.shape, np.uint8) if hi <= lo else np.round(255 * (arr - lo) / (hi - lo)).astype(np.uint8)
    bits = imagehash.phash(Image.fromarray(grey)).hash.flatten()
    return int(np.packbits(bits).view(">u8")[0])


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    as_bytes = x.view(np.uint8).reshape(*x.shape, 8)
    return np.unpackbits(as_bytes, axis=-1).sum(-1)


def near_duplicate_pairs(hashes: np.ndarray, max_distance: int = MAX_DISTANCE, chunk: int = 512) -> list[tuple[int, int, int]]:
    """All pairs (i, j, bits) with i < j whose hashes differ in at most `max_distance` bits.

    Args:
        hashes: (N,) uint64 perceptual hashes.
        max_distance: the largest Hamming distance that counts as a near-duplicate.
        chunk: rows compared at once (memory: chunk x N bytes x 8).
    """
    h = np.asarray(hashes, dtype=np.uint64)
    out: list[tuple[int, int, int]] = []
    for start in range(0, len(h), chunk):
        block = h[start:start + chunk]
        dist = _popcount(block[:, None] ^ h[None, :])
        rows, cols = np.nonzero(dist <= max_distance)
        for r, c in zip(rows, cols):
            i = start + int(r)
            if int(c) > i:
                out.append((i, int(c), int(dist[r, c])))
    return out


def near_duplicate_summary(hashes: list[int | None], rows: list[int], splits: list[str], patients: list[tuple[str, str]],
                           max_distance: int = MAX_DISTANCE, max_listed: int = 20,
                           labels: list[str] | None = None) -> dict[str, Any]:  # long: docstring
    """Near-duplicates among the hashed images: pairs across splits and pairs of different patients.

    Args:
        hashes: each record's hash (None: not decoded).
        rows: each record's manifest row.
        splits: each record's split ("" when the manifest has none).
        patients: each record's (site, patient id); only compared, never reported.
        max_distance: bits of difference that still count as a near-duplicate.
        max_listed: pairs listed per kind.
        labels: each record's label: near-duplicates with two different labels are counted (a label conflict).

    Returns:
        {max_distance, hashed, pairs, identical_pairs, across_splits, across_splits_by_split,
         across_splits_by_site (site, or "site A | site B" for pairs of two sites), different_patients,
         eval_images_with_train_twin (val/test images with a near-duplicate in train, per site and split),
         different_labels (pairs whose two labels differ, when `labels` is given),
         examples_across_splits, examples_different_patients}.
    """
    keep = [i for i, h in enumerate(hashes) if h is not None]
    pairs = [(keep[a], keep[b], d) for a, b, d in near_duplicate_pairs(np.array([hashes[i] for i in keep], dtype=np.uint64),
                                                                       max_distance)]
    across = [(i, j, d) for i, j, d in pairs if splits[i] and splits[j] and splits[i] != splits[j]]
    others = [(i, j, d) for i, j, d in pairs if patients[i] != patients[j]]
    by_split: dict[str, int] = {}
    by_site: dict[str, int] = {}
    twins: dict[str, dict[str, set]] = {}
    for i, j, _ in across:
        key = "/".join(sorted((splits[i], splits[j])))
        by_split[key] = by_split.get(key, 0) + 1
        sites = " | ".join(sorted({patients[i][0], patients[j][0]}))
        by_site[sites] = by_site.get(sites, 0) + 1
        for a, b in ((i, j), (j, i)):
            if splits[b] == "train" and splits[a] != "train":
                twins.setdefault(patients[a][0], {}).setdefault(splits[a], set()).add(a)

    def listed(found):
        return [{"rows": [rows[i], rows[j]], "bits": d, "splits": [splits[i], splits[j]]} for i, j, d in found[:max_listed]]

    return {"max_distance": max_distance, "hashed": len(keep), "pairs": len(pairs),
            "identical_pairs": sum(d == 0 for _, _, d in pairs), "across_splits": len(across),
            "across_splits_by_split": dict(sorted(by_split.items())), "across_splits_by_site": dict(sorted(by_site.items())),
            "eval_images_with_train_twin": {site: {sp: len(v) for sp, v in sorted(per.items())}
                                            for site, per in sorted(twins.items())},
            "different_patients": len(others),
            "different_labels": sum(labels[i] != labels[j] for i, j, _ in pairs) if labels is not None else None,
            "examples_across_splits": listed(across), "examples_different_patients": listed(others)}
