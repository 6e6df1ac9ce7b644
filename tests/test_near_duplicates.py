"""Near-duplicate images across splits (issue 29): the perceptual hash against imagehash's own distance and a
brute-force pair search, and `remedis data inspect` finding a resaved twin that crosses splits."""

from __future__ import annotations

import csv
import json

import imagehash
import numpy as np
from PIL import Image

from remedis.data.inspect import inspect_manifest
from remedis.data.near_duplicates import near_duplicate_pairs, perceptual_hash


def _scan(seed: int, size: int = 160) -> np.ndarray:
    """A smooth random 'scan': blobs on a dark background, unlike any other seed's."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    img = np.zeros((size, size))
    for _ in range(6):
        cy, cx, r, a = rng.random(4)
        img += a * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.02 + 0.05 * r))
    return (255 * img / img.max()).astype(np.uint8)


def test_hash_distance_is_imagehashs_and_pairs_match_brute_force():
    scans = [_scan(s) for s in range(12)]
    ours = [perceptual_hash(s) for s in scans]
    ref = [imagehash.phash(Image.fromarray(s)) for s in scans]
    for i in range(12):
        for j in range(12):
            assert bin(ours[i] ^ ours[j]).count("1") == ref[i] - ref[j]
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, 300, dtype=np.uint64)
    hashes[[7, 150, 299]] = hashes[3] ^ np.uint64(0b101)  # three copies two bits from row 3
    want = {(i, j, bin(int(hashes[i]) ^ int(hashes[j])).count("1")) for i in range(300) for j in range(i + 1, 300)
            if bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= 4}
    assert set(near_duplicate_pairs(hashes, 4, chunk=64)) == want and len(want) >= 6


def test_inspect_finds_a_resaved_twin_across_splits_and_lists_rows_not_patients(tmp_path):
    rows = []
    for i in range(8):
        Image.fromarray(_scan(i)).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "label": "a" if i % 2 else "b", "site": "S", "patient_id": f"secret-{i}",
                     "split": "train" if i < 6 else "test"})
    twin = Image.fromarray(_scan(2)).resize((120, 120))  # a downsized JPEG copy of a train image, given to a test patient
    twin.save(tmp_path / "twin.jpg", quality=80)
    rows.append({"image": "twin.jpg", "label": "b", "site": "S", "patient_id": "secret-99", "split": "test"})
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    nd = inspect_manifest(tmp_path / "m.csv")["near_duplicates"]
    assert nd["hashed"] == 9 and nd["across_splits"] == 1 and nd["across_splits_by_split"] == {"test/train": 1}
    assert nd["different_patients"] == 1 and nd["examples_across_splits"][0]["rows"] == [4, 10]  # rows of the CSV
    assert "secret" not in json.dumps(nd) and nd["different_labels"] == 0
    strict = inspect_manifest(tmp_path / "m.csv", duplicate_bits=0)["near_duplicates"]
    assert strict["pairs"] <= nd["pairs"]
    assert inspect_manifest(tmp_path / "m.csv", decode=False)["near_duplicates"] is None
