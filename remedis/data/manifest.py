"""Manifests: the CSV that names every image of a run (`image,label,site,patient_id[,split]`).

Paths are relative to the CSV's folder (absolute paths also work). Extra columns are kept as
metadata. Reading a manifest checks columns and files up front and names the file, row and field
of anything wrong, so a job fails in its first second rather than after an hour of training.

Example:
    >>> m = read_manifest("runs/quickstart/data/manifest.csv")
    >>> m.sites(), len(m.select(site="site-B", split="train"))
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

REQUIRED_COLUMNS = ("image", "label", "site", "patient_id")
OPTIONAL_COLUMNS = ("split",)
SPLITS = ("train", "val", "test")


class ManifestError(ValueError):
    """A manifest is malformed; the message names the file, row and field."""


@dataclass(frozen=True)
class Record:
    image: Path  # absolute path
    label: str  # "" when unlabeled
    site: str
    patient_id: str
    split: str | None = None
    meta: dict[str, str] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class Manifest:
    records: list[Record]
    path: Path | None = None
    sha256: str | None = None  # hash of the CSV bytes: provenance for every artifact built from it

    def __len__(self) -> int:
        return len(self.records)

    def sites(self) -> list[str]:
        return sorted({r.site for r in self.records})

    def labels(self) -> list[str]:
        return sorted({r.label for r in self.records if r.label != ""})

    def select(self, site: str | None = None, split: str | None = None, labeled: bool | None = None) -> list[Record]:
        out = []
        for r in self.records:
            if site is not None and r.site != site:
                continue
            if split is not None and r.split != split:
                continue
            if labeled is not None and (r.label != "") != labeled:
                continue
            out.append(r)
        return out

    def with_records(self, records: list[Record]) -> "Manifest":
        return replace(self, records=list(records))


def read_manifest(path: str | Path, check_files: bool = True) -> Manifest:
    """Read and validate a manifest CSV.

    Raises ManifestError naming the file and the missing columns, or the rows whose image file is
    missing (up to five listed, with the total).
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest file not found")
    raw = path.read_bytes()
    text = raw.decode("utf-8-sig", errors="strict") if raw else ""
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ManifestError(
            f"{path}: missing required column(s) {', '.join(missing)}; a manifest needs "
            f"{','.join(REQUIRED_COLUMNS)}[,split] (found: {','.join(header) or 'no header'})"
        )
    base = path.parent.resolve()
    records: list[Record] = []
    missing_files: list[str] = []
    for row_no, row in enumerate(reader, start=2):  # row 1 is the header
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        for col in ("image", "site", "patient_id"):
            if not row.get(col):
                raise ManifestError(f"{path}: row {row_no}: empty '{col}'")
        split = row.get("split") or None
        if split is not None and split not in SPLITS:
            raise ManifestError(f"{path}: row {row_no}: split {split!r} is not one of {', '.join(SPLITS)}")
        image = Path(row["image"])
        image = image if image.is_absolute() else base / image
        if check_files and not image.is_file():
            missing_files.append(f"row {row_no}: {row['image']}")
        meta = {k: v for k, v in row.items() if k not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS}
        records.append(Record(image, row["label"], row["site"], row["patient_id"], split, meta))
    if missing_files:
        shown = "; ".join(missing_files[:5])
        raise ManifestError(f"{path}: {len(missing_files)} image file(s) not found ({shown})")
    if not records:
        raise ManifestError(f"{path}: manifest has a header but no rows")
    return Manifest(records, path=path, sha256=hashlib.sha256(raw).hexdigest())


def write_manifest(manifest: Manifest | list[Record], path: str | Path) -> Path:
    """Write records as a manifest CSV with image paths relative to the CSV's folder."""
    records = manifest.records if isinstance(manifest, Manifest) else manifest
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.resolve()
    extra = sorted({k for r in records for k in r.meta})
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*REQUIRED_COLUMNS, "split", *extra])
        for r in records:
            try:
                image = r.image.resolve().relative_to(base).as_posix()
            except ValueError:
                image = str(r.image.resolve())
            writer.writerow([image, r.label, r.site, r.patient_id, r.split or "", *(r.meta.get(k, "") for k in extra)])
    tmp.replace(path)
    return path
