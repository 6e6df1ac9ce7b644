"""Build a manifest from a folder a hospital hands over: DICOM files, or class sub-folders of images.

DICOM: site from a header tag (default: Manufacturer, else InstitutionName), patient from PatientID
keyed-hashed with a site secret (HMAC-SHA256, so the manifest never holds the identifier and nobody
without the secret can test a guess), label from a tag, a regular expression on the path, or the
class sub-folder. PNG/JPEG/TIFF: label from the class sub-folder (`FOLDER/<label>/*.png`), patient
from a regular expression on the file name (else every image is its own patient, with a warning).
Only header fields are read (no pixel decoding), so indexing is fast; `remedis data inspect` decodes.

Example:
    >>> result = index_folder("incoming/", salt=load_salt("site.salt"), label_regex=r"CONTRAST_(\\d)",
    ...                       label_map={"0": "no_contrast", "1": "contrast"})
    >>> write_manifest(result.records, "incoming/manifest.csv"); result.skipped   # [(file, reason)]
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from remedis.data.formats import ImageReadError, format_of_file
from remedis.data.manifest import Record

DEFAULT_SALT_FILE = Path(os.environ.get("REMEDIS_SALT_FILE", "~/.config/remedis/patient-salt")).expanduser()


def load_salt(path: str | Path = DEFAULT_SALT_FILE, create: bool = True) -> bytes:
    """The site's secret for pseudonymising patients; created (mode 600) on first use.

    Keep it at the site and out of shared copies: with it, a short PatientID can be guessed back.
    The same secret gives the same pseudonyms, so re-indexing keeps patients (and splits) stable."""
    path = Path(path).expanduser()
    if path.is_file():
        salt = path.read_bytes().strip()
        if len(salt) < 16:
            raise ValueError(f"{path}: patient salt is shorter than 16 bytes")
        return salt
    if not create:
        raise FileNotFoundError(f"{path}: patient salt file not found")
    path.parent.mkdir(parents=True, exist_ok=True)
    salt = secrets.token_hex(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(salt + b"\n")
    return salt


def pseudonym(value: str, salt: bytes) -> str:
    """Stable, non-reversible patient key: HMAC-SHA256(salt, value), 16 hex digits."""
    return "p-" + hmac.new(salt, value.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


@dataclass
class Probe:
    """What a file's header says, without decoding pixels."""

    kind: str  # "dicom" or the PIL format ("PNG", "JPEG", ...)
    modality: str
    rows: int
    columns: int
    frames: int = 1
    tags: dict[str, str] = field(default_factory=dict)  # DICOM fields asked for (site, patient, label)


def probe(path: Path, tags: tuple[str, ...] = ()) -> Probe:
    """Header of one file, whatever its registered format (`remedis.data.formats`); ValueError with a one-line
    reason when it is not an image. `modality`: the DICOM Modality (OT when absent), else the format's name."""
    try:
        fmt, head = format_of_file(path)
        if not head:
            raise ValueError("empty file")
        info = fmt.describe(path, path.name, tags=tags, require_pixels=True)
    except ImageReadError as exc:
        raise ValueError(str(exc).split(": ", 1)[-1]) from None
    kind = info.format
    modality = info.modality or ("OT" if kind == "dicom" else kind.upper())
    return Probe(kind, modality, info.rows, info.columns, info.frames, dict(info.tags))


@dataclass
class IndexResult:
    """What `index_folder` found: the manifest records, the files skipped with their reasons, and warnings."""

    records: list[Record]
    skipped: list[tuple[str, str]]  # (file relative to the folder, reason)
    warnings: list[str]


def index_folder(  # long: one pass: site, label, patient rules per file
    folder: str | Path,
    salt: bytes,
    *,
    site_tag: str | None = None,
    site: str | None = None,
    label_tag: str | None = None,
    label_regex: str | None = None,
    label_map: dict[str, str] | None = None,
    label_from_folder: bool | None = None,
    patient_regex: str | None = None,
) -> IndexResult:
    """Index every file under `folder` (recursively, sorted); non-images are skipped and counted.

    site: `site` if given, else the DICOM tag `site_tag` (default Manufacturer, then
    InstitutionName), else the folder's name. label: `label_tag`, else group 1 of `label_regex` on
    the path relative to the folder, else the class sub-folder (default for PNG/JPEG), else empty.
    `label_map` renames labels ("1" -> "contrast")."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: folder not found")
    lab_re = re.compile(label_regex) if label_regex else None
    pat_re = re.compile(patient_regex) if patient_regex else None
    site_tags = (site_tag,) if site_tag else ("Manufacturer", "InstitutionName")
    tags = tuple(dict.fromkeys([*site_tags, "PatientID", *((label_tag,) if label_tag else ())]))
    records, skipped, notes = [], [], []
    own_patient = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if rel.name.startswith(".") or rel.suffix.lower() in (".csv", ".salt", ".md", ".txt", ".json"):
            continue  # the manifest itself, notes: not candidate images
        try:
            info = probe(path, tags)
        except ValueError as exc:
            skipped.append((rel.as_posix(), str(exc)))
            continue
        is_dicom = info.kind == "dicom"
        # site
        s = site or next((info.tags[t] for t in site_tags if info.tags.get(t)), "") or root.resolve().name
        # label
        if label_tag:
            label = info.tags.get(label_tag, "")
        elif lab_re is not None:
            m = lab_re.search(rel.as_posix())
            label = (m.group(1) if m.groups() else m.group(0)) if m else ""
        elif (label_from_folder if label_from_folder is not None else not is_dicom) and len(rel.parts) > 1:
            label = rel.parts[0]
        else:
            label = ""
        if label_map:
            label = label_map.get(label, label)
        if "," in label or "\n" in label:
            label = label.replace(",", " ").replace("\n", " ")
        # patient
        raw_pid = info.tags.get("PatientID", "") if is_dicom else ""
        if not raw_pid and pat_re is not None:
            m = pat_re.search(rel.name)
            raw_pid = (m.group(1) if m.groups() else m.group(0)) if m else ""
        if not raw_pid:
            own_patient += 1
            raw_pid = "file:" + rel.as_posix()  # its own patient: no identifier to group by
        meta = {"modality": info.modality, "rows": str(info.rows), "columns": str(info.columns)}
        if info.frames > 1:
            meta["frames"] = str(info.frames)
        records.append(Record(path.resolve(), label, s, pseudonym(raw_pid, salt), None, meta))
    if own_patient:
        notes.append(f"{own_patient} file(s) without a patient identifier are each their own patient; "
                     "images of one patient may then land in different splits (give --patient-regex)")
    return IndexResult(records, skipped, notes)
