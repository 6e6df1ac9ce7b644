"""Manifests: the CSV that names every image of a run (`image,label,site,patient_id[,split]`).

Paths are relative to the CSV's folder (absolute paths also work). Extra columns are kept as
metadata. A multi-label row lists its labels separated by `|` (`effusion|nodule`); `Record.labels`
gives them as a tuple, `Manifest.classes()` the individual class names. An exact repeated row is
skipped and counted (`Manifest.duplicates_skipped`); the same image with different fields is an
error. Reading a manifest checks columns and files up front and names the file, row and field
of anything wrong, so a job fails in its first second rather than after an hour of training.

Example:
    >>> m = read_manifest("runs/quickstart/data/manifest.csv")
    >>> m.sites(), len(m.select(site="site-B", split="train"))
"""

from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("image", "label", "site", "patient_id")
LABEL_SEPARATOR = "|"
OPTIONAL_COLUMNS = ("split",)
SPLITS = ("train", "val", "test")


class ManifestError(ValueError):
    """A manifest is malformed; the message names the file, row and field."""


@dataclass(frozen=True)
class Record:
    """One manifest row: image path, label (empty: unlabeled), site, patient pseudonym, split and free metadata."""

    image: Path  # absolute path
    label: str  # "" when unlabeled
    site: str
    patient_id: str
    split: str | None = None
    meta: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def labels(self) -> tuple[str, ...]:
        """The row's labels: () when unlabeled, several for a multi-label row ("a|b")."""
        return tuple(x for x in self.label.split(LABEL_SEPARATOR) if x) if self.label else ()


@dataclass
class Manifest:
    """A manifest as read: its records, the file it came from and the hash of its bytes."""

    records: list[Record]
    path: Path | None = None
    sha256: str | None = None  # hash of the CSV bytes: provenance for every artifact built from it
    duplicates_skipped: int = 0  # exact repeated rows dropped on reading
    row_numbers: list[int] = field(default_factory=list)  # CSV row of each record as read (for messages)

    def __len__(self) -> int:
        return len(self.records)

    def sites(self) -> list[str]:
        """The sites, sorted."""
        return sorted({r.site for r in self.records})

    def labels(self) -> list[str]:
        """The labels that occur, sorted (multi-label rows contribute each label)."""
        return sorted({r.label for r in self.records if r.label != ""})

    def classes(self) -> list[str]:
        """Individual class names (multi-label rows contribute each of their labels)."""
        return sorted({lab for r in self.records for lab in r.labels})

    def is_multilabel(self) -> bool:
        """True when any row holds several labels (`a|b`)."""
        return any(len(r.labels) > 1 for r in self.records)

    def select(self, site: str | None = None, split: str | None = None, labeled: bool | None = None) -> list[Record]:
        """The records of one site and/or split (None: any)."""
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
        """The same manifest (path, hash) with other records (after splits or label maps)."""
        return replace(self, records=list(records), row_numbers=[])


def read_manifest(path: str | Path, check_files: bool = True, labels=None) -> Manifest:
    """Read and validate a manifest CSV.

    Raises ManifestError naming the file and the missing columns, the row and field of a bad value,
    the rows whose image file is missing (up to five listed, with the total), or — when `labels`
    (the allowed class names) is given — the rows with an unknown label.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest file not found")
    raw = path.read_bytes()
    reader = _csv_reader(path, raw)
    allowed = set(labels) if labels is not None else None
    base = path.parent.resolve()
    records: list[Record] = []
    missing_files: list[str] = []
    unknown: list[str] = []
    first_row: dict[Path, tuple[int, tuple]] = {}
    duplicates = 0
    row_numbers: list[int] = []
    for row_no, row in _rows(path, reader):
        record = _record(path, row_no, row, base)
        parts = record.label.split(LABEL_SEPARATOR) if record.label else []
        if allowed is not None and any(x not in allowed for x in parts):
            unknown.append(f"row {row_no}: {record.label!r}")
        key = (record.label, record.site, record.patient_id, record.split)
        if record.image in first_row:
            prev_row, prev_key = first_row[record.image]
            if prev_key == key:
                duplicates += 1  # an exact repeat would count one image twice: drop it
                continue
            raise ManifestError(f"{path}: row {row_no}: image {row['image']} already listed in row {prev_row} "
                                "with different label/site/patient/split")
        first_row[record.image] = (row_no, key)
        if check_files and not record.image.is_file():
            missing_files.append(f"row {row_no}: {row['image']}")
        records.append(record)
        row_numbers.append(row_no)
    if unknown:
        raise ManifestError(f"{path}: {len(unknown)} row(s) with a label not among {sorted(allowed)} ({'; '.join(unknown[:5])})")
    if missing_files:
        shown = "; ".join(missing_files[:5])
        raise ManifestError(f"{path}: {len(missing_files)} image file(s) not found ({shown})")
    if not records:
        raise ManifestError(f"{path}: manifest has a header but no rows")
    if duplicates:
        log.warning("%s: skipped %d duplicate row(s)", path, duplicates)
    return Manifest(records, path=path, sha256=hashlib.sha256(raw).hexdigest(), duplicates_skipped=duplicates, row_numbers=row_numbers)


def _csv_reader(path: Path, raw: bytes) -> csv.DictReader:
    """A reader over the CSV's rows once its text and header are checked (UTF-8, no NUL, required columns once)."""
    try:
        text = raw.decode("utf-8-sig", errors="strict") if raw else ""
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text (byte {exc.start}); save the manifest as UTF-8 CSV") from None
    if "\x00" in text:
        raise ManifestError(f"{path}: contains NUL bytes; not a CSV file")
    reader = csv.DictReader(text.splitlines())
    try:
        header = [h.strip() for h in (reader.fieldnames or [])]
    except csv.Error as exc:
        raise ManifestError(f"{path}: malformed CSV header ({exc})") from None
    repeated = sorted({h for h in header if header.count(h) > 1 and h})
    if repeated:
        raise ManifestError(f"{path}: column(s) {', '.join(repeated)} appear more than once in the header")
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ManifestError(
            f"{path}: missing required column(s) {', '.join(missing)}; a manifest needs "
            f"{','.join(REQUIRED_COLUMNS)}[,split] (found: {','.join(header) or 'no header'})"
        )
    return reader


def _rows(path: Path, reader: csv.DictReader):
    """(row number, stripped row) for every non-blank row; a malformed row stops with its number."""
    rows = iter(enumerate(reader, start=2))  # row 1 is the header
    while True:
        try:
            row_no, row = next(rows)
        except StopIteration:
            return
        except csv.Error as exc:
            raise ManifestError(f"{path}: malformed CSV near row {reader.line_num} ({exc})") from None
        if None in row:
            raise ManifestError(f"{path}: row {row_no}: more fields than the header has columns")
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        if any(row.values()):  # else a blank line
            yield row_no, row


def _record(path: Path, row_no: int, row: dict[str, str], base: Path) -> Record:
    """One row as a `Record`: required fields present, a known split, a well-formed label, the image path
    resolved against the manifest's folder, the other columns as metadata."""
    for col in ("image", "site", "patient_id"):
        if not row.get(col):
            raise ManifestError(f"{path}: row {row_no}: empty '{col}'")
    split = row.get("split") or None
    if split is not None and split not in SPLITS:
        raise ManifestError(f"{path}: row {row_no}: split {split!r} is not one of {', '.join(SPLITS)}")
    label = row["label"]
    if label:
        parts = [x.strip() for x in label.split(LABEL_SEPARATOR)]
        if any(not x for x in parts):
            raise ManifestError(f"{path}: row {row_no}: label {label!r} has an empty part between '{LABEL_SEPARATOR}'")
        label = LABEL_SEPARATOR.join(parts)
    image = Path(row["image"])
    image = image if image.is_absolute() else base / image
    meta = {k: v for k, v in row.items() if k not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS}
    return Record(image, label, row["site"], row["patient_id"], split, meta)


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


def merge_manifests(paths: list[str | Path], output: str | Path) -> Manifest:
    """Several manifests as one CSV (image paths absolute or relative to `output`'s folder; splits and
    extra columns kept), e.g. every kit's train images as one SimCLR corpus.

    Each site must come from one manifest only (two kits that both call a site "site-A" would
    silently become one site), and an image may appear once.

    Example:
        >>> merge_manifests(["bus/manifest.csv", "cxr/manifest.csv"], "runs/all.csv").sites()

    Raises:
        ManifestError: a site in two manifests, or an image listed by two of them.
    """
    records: list[Record] = []
    owner: dict[str, Path] = {}
    images: dict[Path, Path] = {}
    for path in map(Path, paths):
        m = read_manifest(path)
        for site in m.sites():
            if site in owner:
                raise ManifestError(f"{path}: site {site!r} is also in {owner[site]}; rename one of them")
            owner[site] = path
        for r in m.records:
            if r.image in images:
                raise ManifestError(f"{path}: image {r.image.name} is also listed by {images[r.image]}")
            images[r.image] = path
        records.extend(m.records)
    write_manifest(records, output)
    return read_manifest(output)
