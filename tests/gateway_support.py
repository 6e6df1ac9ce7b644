"""Shared pieces of the gateway tests: a small model folder, DICOM studies to send, a free port."""

from __future__ import annotations

import copy
import socket
import time
from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom.uid import generate_uid

PLANTED = {"PatientName": "Quixote^Dulcinea", "PatientID": "PID-93417", "PatientBirthDate": "19610203",
           "AccessionNumber": "ACC-55123", "OtherPatientIDs": "OTHER-77210"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(folder: Path, ct_files: list[Path] | None = None, size: int = 32, arch: str = "resnet18") -> Path:
    """A small CT classifier folder: a linear head fitted for a few steps on the given CT images (contrast
    vs not, from the file names), an input contract and a kNN OOD detector fitted on them (`arch`: any
    backbone of the registry, e.g. resnet50 for the benchmarks' large arm)."""
    from remedis.adapt.model import AdaptedModel
    from remedis.adapt.ood import fit_ood_detector
    from remedis.data.contract import InputContract, describe_file
    from remedis.data.preprocess import Preprocessing
    from remedis.data.readers import read_image
    from remedis.models import Classifier

    torch.manual_seed(0)
    pre = Preprocessing(image_size=size)
    model = AdaptedModel(Classifier(arch, 2, in_chans=1), ["no_contrast", "contrast"], pre, temperature=1.3)
    if ct_files:
        images = [read_image(f) for f in ct_files]
        pixels = torch.stack([pre.resize(img) for img in images])
        y = torch.tensor([1 if "CONTRAST_1" in f.name else 0 for f in ct_files])
        x = pre.normalize(pixels.float())
        head = model.classifier.head
        opt = torch.optim.SGD(head.parameters(), lr=0.1)
        with torch.no_grad():
            feats = model.classifier.embed(x)
        for _ in range(30):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(head(feats), y).backward()
            opt.step()
        model.input_contract = InputContract.fit([describe_file(f) for f in ct_files], pixels)
        emb = model.embed(x).numpy()
        model.ood_detector = fit_ood_detector("knn", emb, y.numpy(), model.logits(x).numpy(), emb, k=3)
    return model.save(folder)


def ct_files(shared: Path, n: int) -> list[Path]:
    return sorted((shared / "ct-dicom" / "dicom").glob("*.dcm"))[:n]


def study_from(source: Path, n: int, series: int = 1, planted: bool = True, size: int | None = 64) -> list[pydicom.Dataset]:
    """`n` instances in `series` series of one new study, made from one real CT file (pixels cropped to
    `size` so hundreds stay small), with planted patient identifiers."""
    base = pydicom.dcmread(source)
    if size:
        arr = base.pixel_array[:size, :size].copy()
        base.PixelData = arr.tobytes()
        base.Rows, base.Columns = arr.shape
        implicit = base.original_encoding[0] if base.original_encoding else False
        base.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian if implicit else pydicom.uid.ExplicitVRLittleEndian
    if planted:
        for k, v in PLANTED.items():
            setattr(base, k, v)
    base.StudyInstanceUID = generate_uid()
    series_uids = [generate_uid() for _ in range(series)]
    out = []
    for i in range(n):
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID = series_uids[i % series]
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        out.append(ds)
    return out


def to_bytes(ds: pydicom.Dataset) -> bytes:
    """A dataset as a DICOM Part-10 file's bytes (what a C-STORE or STOW-RS part carries)."""
    import io

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_all(datasets: list[pydicom.Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        p = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def sr_results(folder: Path) -> dict[str, dict]:
    """Every SR under `folder` read back: referenced SOP Instance UID -> list of results (one per SR)."""
    from serving.gateway.report import read_results

    refs: dict[str, list] = {}
    for p in folder.rglob("*.dcm"):
        for uid, r in read_results(pydicom.dcmread(p)).items():
            refs.setdefault(uid, []).append(r)
    return refs


def current_sr_results(folder: Path) -> dict[str, dict]:
    """Like `sr_results`, from the SRs not superseded by a later one (a series that grew gets an SR covering all of
    it whose Predecessor Documents Sequence names the earlier SR)."""
    from serving.gateway.report import read_results

    srs = [pydicom.dcmread(p) for p in folder.rglob("*.dcm")]
    srs = [d for d in srs if str(d.SOPClassUID) == "1.2.840.10008.5.1.4.1.1.88.34"]
    superseded = {ref.ReferencedSOPInstanceUID for d in srs for item in getattr(d, "PredecessorDocumentsSequence", [])
                  for series in item.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    refs: dict[str, list] = {}
    for d in srs:
        if d.SOPInstanceUID not in superseded:
            for uid, r in read_results(d).items():
                refs.setdefault(uid, []).append(r)
    return refs


def no_identifiers(text: str) -> list[str]:
    return [v for v in PLANTED.values() if v in text]


def expected_probs(folder: Path, paths: list[Path]) -> np.ndarray:
    from serving.gateway.inference import LocalInference

    model = LocalInference(folder)
    return np.array([[r.probabilities[c] for c in model.info.class_names] for r in model.predict([p.read_bytes() for p in paths])])


def dcmtk_tool(name: str) -> str | None:
    """The path of dcmtk's `name` (storescu, dsrdump, ...), found by what it is: with a virtual environment
    activated, pynetdicom's own `storescu` comes first on PATH and takes other options."""
    import os
    import shutil
    import subprocess

    seen = set()
    for folder in [*os.get_exec_path(), "/usr/bin", "/usr/local/bin"]:
        path = shutil.which(name, path=folder)
        if path is None or path in seen:
            continue
        seen.add(path)
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "dcmtk" in (out.stdout + out.stderr).lower():
            return path
    return None


def wait_until(predicate, timeout: float = 60.0, what: str = "condition", every: float = 0.05) -> None:
    """Poll `predicate` every `every` seconds until it holds; AssertionError naming `what` after `timeout`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")
