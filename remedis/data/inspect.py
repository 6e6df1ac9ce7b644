"""What is in a manifest, before anyone trains on it.

Counts per site, label and split; image sizes and modalities; files that cannot be read, with the
reason; duplicate rows; patients found in more than one split (leakage). Patients are reported by
manifest row, never by identifier.

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
from remedis.data.readers import ImageReadError, read_image


def inspect_manifest(path: str | Path, decode: bool = True, max_listed: int = 20) -> dict[str, Any]:
    """Summary dict (JSON-ready). `decode=False` reads headers only (faster, fewer failures found)."""
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
    for row, r in zip(rows, records):
        try:
            arr = read_image(r.image) if decode else None  # decoding first: its reason is the precise one
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
    return "\n".join(lines)
