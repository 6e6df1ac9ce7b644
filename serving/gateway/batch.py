"""One claimed batch through its routes' models into results: the gateway's compute, apart from the spool.

`run_batch` reads a batch's spooled instances, asks each route's model (frames of a multi-frame instance as
the `frames` setting says), and runs every enabled result writer per study; for a series that grew, the SR
covers its earlier instances too and supersedes the earlier SRs. It changes nothing on disk: the gateway
applies the `BatchOutcome` (outbox, failed/, the series history, counters). That is what lets it run in a
worker process (`serving.gateway.workers`) while the gateway's own process keeps receiving.

Example:
    >>> outcome = run_batch(Path("spool/work/3f9c..."), settings, {0: open_model("models/site-b")})
    >>> outcome.answered, sorted(outcome.results)
    (50, ['sr-0-8a1e....dcm'])
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom

from serving.answer import Answer
from serving.gateway.frames import combine, frame_count, frames_to_read, split_frames
from serving.gateway.inference import Inference, InferenceRejected, InferenceUnavailable, ModelInfo
from serving.gateway.report import sanitised_header, sr_header
from serving.gateway.settings import GatewaySettings, Route
from serving.gateway.spool import Spool
from serving.gateway.writers import StudyAnswers, enabled_writers

log = logging.getLogger("remedis.gateway")


@dataclass
class BatchOutcome:
    """What a batch gave, for the gateway to apply.

    Args:
        results: result file name -> bytes (the outbox).
        failed: (spooled file, reason) of instances no route took or the model refused.
        answered: instances answered.
        sanitised: header values left empty in the results (outside the defined terms).
        histories: (route, series or study UID, history) to record (`Spool.record_series`).
        unavailable: why the model could not answer now (the batch waits and is retried), or None.
        rejected: why the model refused the batch as a client error (it goes to failed/ at once), or None.
    """

    results: dict[str, bytes] = field(default_factory=dict)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    answered: int = 0
    sanitised: int = 0
    histories: list[tuple[int, str, dict]] = field(default_factory=list)
    unavailable: str | None = None
    rejected: str | None = None


def route_for(ds: pydicom.Dataset, routes: list[Route]) -> int | None:
    """The index of the first route whose rules match this instance, or None."""
    modality = str(getattr(ds, "Modality", "") or "").upper()
    sop = str(getattr(ds, "SOPClassUID", ""))
    part = str(getattr(ds, "BodyPartExamined", "") or "").upper()
    for i, r in enumerate(routes):
        if r.modalities and modality not in {m.upper() for m in r.modalities}:
            continue
        if r.sop_classes and sop not in r.sop_classes:
            continue
        if r.body_parts and part not in {b.upper() for b in r.body_parts}:
            continue
        return i
    return None


def run_batch(batch: Path, settings: GatewaySettings, models: dict[int, Inference]) -> BatchOutcome:
    """Answer a claimed batch and write its results (nothing changes on disk).

    Args:
        batch: the claimed batch folder (spool work/<batch>/, its instances as *.dcm).
        settings: the gateway's settings (routes, frames, batch size, writers' options).
        models: route index -> its model.
    """
    spool = Spool(settings.spool)
    by_route, failed = _routes_of(sorted(batch.glob("*.dcm")), settings.routes)
    outcome = BatchOutcome(failed=failed)
    for r, items in by_route.items():
        try:
            got = _answers(models[r], items, settings)
        except InferenceRejected as exc:  # a client error: the same request cannot succeed later
            return BatchOutcome(rejected=str(exc))
        except InferenceUnavailable as exc:
            return BatchOutcome(unavailable=str(exc))
        good = [(ds, a) for (_, ds), a in zip(items, got) if isinstance(a, Answer)]
        outcome.failed += [(f, a.reason) for (f, _), a in zip(items, got) if not isinstance(a, Answer)]
        outcome.answered += len(good)
        _write_results(spool, r, items, good, models[r].info, settings, outcome)
    return outcome


def warm_up(info: ModelInfo) -> None:
    """Write and read back the SR of one made-up CT image for `info`'s model, so that the first batch does not pay
    for what Python loads on first use (highdicom's SR templates and tables of the standard, pydicom's code
    dictionary and writers): about a second of a worker's CPU. Nothing is kept or sent."""
    from pydicom.uid import CTImageStorage, generate_uid

    from serving.gateway.dicom_bytes import encode
    from serving.gateway.report import build_sr

    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID, ds.StudyDate, ds.StudyTime = "CT", "WARM^UP", "0", "20000101", "000000"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    names = info.class_names or ["positive"]
    answer = Answer({c: 1.0 / len(names) for c in names}, names[0], "argmax", False, 0.0, [])
    header = pydicom.dcmread(io.BytesIO(encode(ds)), stop_before_pixels=True)
    sr = build_sr([sr_header(header)], [answer], info)
    pydicom.dcmread(io.BytesIO(encode(sr)), stop_before_pixels=True)


def _routes_of(files: list[Path], routes: list[Route]) -> tuple[dict[int, list[tuple[Path, pydicom.Dataset]]], list[tuple[Path, str]]]:
    """The batch's instances by route (header only), and those no route takes or that cannot be read."""
    by_route: dict[int, list[tuple[Path, pydicom.Dataset]]] = {}
    skipped = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception as exc:
            skipped.append((f, f"unreadable ({type(exc).__name__})"))
            continue
        r = route_for(ds, routes)
        if r is None:
            skipped.append((f, "no route takes it"))
        else:
            by_route.setdefault(r, []).append((f, ds))
    return by_route, skipped


def _answers(model: Inference, items: list[tuple[Path, pydicom.Dataset]], settings: GatewaySettings) -> list:
    """The route's model on the instances, `batch_size` at a time (raises `InferenceUnavailable` when it cannot
    answer now, `InferenceRejected` for a client error)."""
    info = model.info
    positive = info.class_names[info.positive_index] if len(info.class_names) > info.positive_index else None
    # Every instance as one or more single images (a multi-frame instance: the frames `frames` chooses).
    parts: list[bytes] = []
    spans: list[tuple[int, int, list[int] | None]] = []
    for f, ds in items:
        count = frame_count(ds)
        if count > 1:
            numbers = frames_to_read(count, settings.frames)
            try:
                split = split_frames(pydicom.dcmread(f), numbers)
            except Exception as exc:  # pixels that do not decode: the model refuses the file itself below
                log.info("instance %s: frames not split (%s)", f.stem[:12], type(exc).__name__)
                split, numbers = [f.read_bytes()], None
        else:
            split, numbers = [f.read_bytes()], None
        spans.append((len(parts), len(split), numbers))
        parts += split
    flat: list = []
    step = settings.batch_size
    for i in range(0, len(parts), step):
        flat += model.predict(parts[i:i + step])
    return [flat[start] if numbers is None else combine(flat[start:start + n], numbers, positive)
            for start, n, numbers in spans]


def _write_results(spool: Spool, r: int, items: list[tuple[Path, pydicom.Dataset]], good: list[tuple[pydicom.Dataset, Answer]],
                   info: Any, settings: GatewaySettings, outcome: BatchOutcome) -> None:
    """Every enabled result writer on each study's answers, into `outcome` (results, histories, sanitised)."""
    files_of = {ds.SOPInstanceUID: f for f, ds in items}
    by_study: dict[str, list[tuple[pydicom.Dataset, Answer]]] = {}
    for ds, a in good:
        by_study.setdefault(ds.StudyInstanceUID, []).append((ds, a))
        outcome.sanitised += len(sanitised_header(ds)[1])
    for study, pairs in by_study.items():
        series_uid = study if settings.trigger == "study" else pairs[0][0].SeriesInstanceUID  # the batch's group
        history = spool.series_history(r, series_uid)
        earlier, previous = _earlier(history, {ds.SOPInstanceUID for ds, _ in pairs})
        answers = StudyAnswers(r, study, pairs, files_of, info, settings, earlier, previous)
        made: dict[str, bytes] = {}
        for writer in enabled_writers(settings):
            made.update({res.name: res.data for res in writer.write(answers)})
        outcome.results.update(made)
        outcome.histories.append((r, series_uid, _grown(history, pairs, made)))


def _earlier(history: dict, now: set[str]) -> tuple[list[tuple[pydicom.Dataset, Answer]], list[pydicom.Dataset]]:
    """A series' instances answered in earlier batches (not those of this batch: a batch replayed after a crash
    is not its own predecessor), and the earlier SRs to supersede (not one covering exactly these instances)."""
    earlier = [(pydicom.Dataset.from_json(h["header"]), Answer.from_dict(h["answer"])) for h in history["instances"]
               if h["sop"] not in now]
    covered = {h["sop"] for h in history["instances"]} | now
    previous = []
    for sr in history["srs"]:
        if set(sr["covers"]) == covered:
            continue
        ds = pydicom.Dataset()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = sr["study"], sr["series"]
        ds.SOPClassUID, ds.SOPInstanceUID = sr["sop_class"], sr["sop"]
        previous.append(ds)
    return earlier, previous


def _grown(history: dict, pairs: list[tuple[pydicom.Dataset, Answer]], made: dict[str, bytes]) -> dict:
    """The series history after this batch: every answered instance (what an SR needs of its header; the earlier
    ones as recorded, this batch's added), and the SR just written."""
    now = {ds.SOPInstanceUID for ds, _ in pairs}
    instances = [h for h in history["instances"] if h["sop"] not in now]
    instances += [{"sop": ds.SOPInstanceUID, "header": sr_header(ds).to_json_dict(bulk_data_threshold=1 << 20),
                   "answer": a.to_dict()} for ds, a in pairs]
    srs = list(history["srs"])
    for name, data in made.items():
        if name.startswith("sr-"):
            sr = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            if all(p["sop"] != sr.SOPInstanceUID for p in srs):
                srs.append({"study": sr.StudyInstanceUID, "series": sr.SeriesInstanceUID, "sop_class": sr.SOPClassUID,
                            "sop": sr.SOPInstanceUID, "covers": [i["sop"] for i in instances]})
    return {"instances": instances, "srs": srs}
