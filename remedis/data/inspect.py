"""What is in a manifest, before anyone trains on it.

Counts per site, label and split; image sizes and modalities; files that cannot be read, with the
reason; duplicate rows; patients found in more than one split (leakage); near-duplicate images across
splits and across patients (perceptual hash, `remedis.data.near_duplicates`; when decoding). Patients
are reported by manifest row, never by identifier.

Example:
    >>> summary = inspect_manifest("data/manifest.csv")
    >>> summary["unreadable"], summary["patients_in_several_splits"]
    >>> print(format_summary(summary))
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from remedis.data.manifest import read_manifest
from remedis.data.near_duplicates import MAX_DISTANCE, near_duplicate_summary, perceptual_hash
from remedis.data.readers import ImageReadError, read_image


def inspect_manifest(path: str | Path, decode: bool = True, max_listed: int = 20,
                     duplicate_bits: int = MAX_DISTANCE) -> dict[str, Any]:
    """Summary dict (JSON-ready). `decode=False` reads headers only (faster, fewer failures found, no
    near-duplicate check); `duplicate_bits`: hash bits two near-duplicates may differ in."""
    from remedis.data.index import probe

    manifest = read_manifest(path, check_files=False)
    records = manifest.records

    def by(key):
        return dict(sorted(Counter(key(r) for r in records).items()))

    labels = Counter(lab for r in records for lab in r.labels) if records else Counter()
    sizes: Counter = Counter()
    modalities: Counter = Counter()
    unreadable: list[dict[str, Any]] = []
    rows = manifest.row_numbers or list(range(2, len(records) + 2))
    hashes: list[int | None] = [None] * len(records)
    for k, (row, r) in enumerate(zip(rows, records)):
        try:
            arr = read_image(r.image) if decode else None  # decoding first: its reason is the precise one
            hashes[k] = perceptual_hash(arr) if arr is not None else None
            info = probe(r.image)
            modalities[info.modality] += 1
            sizes[f"{arr.shape[0]}x{arr.shape[1]}" if arr is not None else f"{info.rows}x{info.columns}"] += 1
        except (ValueError, ImageReadError) as exc:
            reason = str(exc)
            if reason.startswith(str(r.image)):
                reason = reason[len(str(r.image)) + 2:]
            unreadable.append({"row": row, "image": _rel(r.image, manifest.path), "reason": reason})
    splits_of: dict[tuple[str, str], set] = defaultdict(set)
    rows_of: dict[tuple[str, str], list[int]] = defaultdict(list)
    for row, r in zip(rows, records):
        if r.split:
            splits_of[(r.site, r.patient_id)].add(r.split)
        rows_of[(r.site, r.patient_id)].append(row)
    leaking = [k for k, s in splits_of.items() if len(s) > 1]
    return {
        "manifest": str(manifest.path),
        "sha256": manifest.sha256,
        "images": len(records),
        "patients": len({(r.site, r.patient_id) for r in records}),
        "sites": by(lambda r: r.site),
        "labels": dict(sorted(labels.items())),
        "multi_label_rows": sum(len(r.labels) > 1 for r in records),
        "unlabeled": sum(not r.labels for r in records),
        "splits": by(lambda r: r.split or "(none)"),
        "site_label_split": _nested(records),
        "sizes": dict(sizes.most_common(max_listed)),
        "distinct_sizes": len(sizes),
        "modalities": dict(sorted(modalities.items())),
        "unreadable_count": len(unreadable),
        "unreadable": unreadable[:max_listed],
        "duplicate_rows": manifest.duplicates_skipped,  # exact repeats; conflicting ones fail reading
        "patients_in_several_splits": len(leaking),
        "leaking_rows": [rows_of[k][:5] for k in leaking[:max_listed]],
        "near_duplicates": near_duplicate_summary(hashes, rows, [r.split for r in records],
                                                  [(r.site, r.patient_id) for r in records], duplicate_bits, max_listed,
                                                  [r.label for r in records])
        if decode else None,
    }


def _rel(image: Path, manifest: Path | None) -> str:
    try:
        return image.relative_to(manifest.parent.resolve()).as_posix() if manifest else str(image)
    except ValueError:
        return str(image)


def _nested(records) -> dict[str, dict[str, dict[str, int]]]:
    out: dict[str, dict[str, dict[str, int]]] = {}
    for r in records:
        for lab in r.labels or ("(unlabeled)",):
            cell = out.setdefault(r.site, {}).setdefault(lab, {})
            cell[r.split or "(none)"] = cell.get(r.split or "(none)", 0) + 1
    return out


def format_summary(s: dict[str, Any]) -> str:
    """The manifest summary as text for the terminal."""
    lines = [f"manifest: {s['manifest']}  ({s['images']} images, {s['patients']} patients)"]
    lines.append("site / label / split:")
    for site, labels in sorted(s["site_label_split"].items()):
        for label, splits in sorted(labels.items()):
            cells = "  ".join(f"{k}={v}" for k, v in sorted(splits.items()))
            lines.append(f"  {site:<22} {label:<16} {cells}")
    lines.append("splits: " + ", ".join(f"{k}={v}" for k, v in s["splits"].items()))
    if s["multi_label_rows"]:
        lines.append(f"multi-label rows: {s['multi_label_rows']}")
    lines.append("modalities: " + (", ".join(f"{k}={v}" for k, v in s["modalities"].items()) or "-"))
    sizes = ", ".join(f"{k}={v}" for k, v in list(s["sizes"].items())[:8])
    lines.append(f"image sizes ({s['distinct_sizes']} distinct): " + (sizes or "-"))
    lines.append(f"unreadable: {s['unreadable_count']}")
    for u in s["unreadable"]:
        lines.append(f"  row {u['row']}: {u['image']}: {u['reason']}")
    lines.append(f"duplicate rows (skipped): {s['duplicate_rows']}")
    lines.append(f"patients in more than one split: {s['patients_in_several_splits']}")
    for rows in s["leaking_rows"][:5]:
        lines.append("  rows " + ", ".join(map(str, rows)))
    nd = s.get("near_duplicates")
    if nd is None:
        lines.append("near-duplicates: not checked (--headers-only)")
    else:
        lines.append(f"near-duplicate pairs (perceptual hash within {nd['max_distance']} of 64 bits, {nd['hashed']} images): "
                     f"{nd['pairs']} ({nd['identical_pairs']} identical); of different patients: {nd['different_patients']}; "
                     f"with different labels: {nd['different_labels']}; "
                     f"across splits: {nd['across_splits']}"
                     + (" (" + ", ".join(f"{k}={v}" for k, v in nd["across_splits_by_split"].items()) + ")"
                        if nd["across_splits_by_split"] else ""))
        for site, per in nd["eval_images_with_train_twin"].items():
            lines.append(f"  {site}: " + ", ".join(f"{n} {sp} image(s)" for sp, n in per.items())
                         + " with a near-duplicate in train")
        for ex in nd["examples_across_splits"][:5]:
            lines.append(f"  rows {ex['rows'][0]} ({ex['splits'][0]}) and {ex['rows'][1]} ({ex['splits'][1]}): {ex['bits']} bits")
    return "\n".join(lines)
