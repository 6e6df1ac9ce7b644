"""Results as DICOM: a Comprehensive 3D SR following TID 1500 (highdicom), in the source study.

One SR per processed batch (the instances of one series that arrived together). Each source image gets
its own measurement group (TID 1501) that references it and holds:
- the finding type: the decided class (coded), or, for an image outside the model's input contract or
  detector (OOD), "result not valid for this image"; and the algorithm (name, version, weights hash);
- one measurement per class: the calibrated probability (UCUM "1");
- the OOD score, when the model has a detector;
- qualitative evaluations: the decision at the stored operating point (coded class; left out for an OOD
  image, whose finding says the result is not valid) and the OOD flag (SNOMED CT Yes / No), and the method
  of decision;
- text: the OOD reasons, and that the result is not for diagnostic use (also in the series description;
  the SR is marked PRELIMINARY and UNVERIFIED).

UIDs are derived from the source UIDs and the model's weights, so processing the same batch again makes
the same SR (a PACS stores it once). Codes of our own use the private scheme `99REMEDIS` (code values of
at most 16 characters, as a Short String; the scheme is identified in the Coding Scheme Identification
Sequence). Header values the SR copies from the sources but that are outside the standard's defined terms
or formats (PatientSex `U`, a date like `19700000`) are left empty in the SR (`sanitised_header`), so that
an ordinary modality's header never stops a result.

Example:
    >>> sr = build_sr([ds], [answer], ModelInfo("remedis-busi", "1", "ab12...", ["benign", "malignant"]))
    >>> sr.SOPClassUID.name
    'Comprehensive 3D SR Storage'
"""

from __future__ import annotations

import copy
import datetime
import functools
import re
import warnings
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

from serving.answer import Answer
from serving.gateway.inference import ModelInfo

SCHEME = "99REMEDIS"
NOT_FOR_DIAGNOSIS = "remedis AI result: research use, not for diagnostic use"
SERIES_DESCRIPTION = "remedis AI result - not for diagnostic use"
MANUFACTURER = "remedis"
UID_PREFIX = PYDICOM_ROOT_UID  # derived UIDs; an organisation with its own root sets the gateway's `uid_root`
UNIT_ONE = hd.sr.CodedConcept("1", "UCUM", "no units")
YES = hd.sr.CodedConcept("373066001", "SCT", "Yes")
NO = hd.sr.CodedConcept("373067005", "SCT", "No")
CODE_DECISION = hd.sr.CodedConcept("decision", SCHEME, "Decision at operating point")
CODE_OOD = hd.sr.CodedConcept("ood", SCHEME, "Out of distribution")
CODE_OOD_SCORE = hd.sr.CodedConcept("ood-score", SCHEME, "Out-of-distribution score")
CODE_OOD_REASON = hd.sr.CodedConcept("ood-reason", SCHEME, "Out-of-distribution reason")
CODE_COMMENT = hd.sr.CodedConcept("121106", "DCM", "Comment")
CODE_PROCEDURE = hd.sr.CodedConcept("ai-classify", SCHEME, "AI image classification")
CODE_FRAMES = hd.sr.CodedConcept("frames-read", SCHEME, "Frames read")
CODE_NOT_VALID = hd.sr.CodedConcept("not-valid", SCHEME, "Result not valid for this image")
SCHEME_NAME = "remedis private codes"
SCHEME_ORGANISATION = "remedis"


# The coded concepts below are made once per name and shared by every group that uses them, as the module's
# constants are (highdicom puts them into the content items as they are; nothing changes them afterwards).
@functools.lru_cache(maxsize=256)
def class_code(name: str) -> hd.sr.CodedConcept:
    """A class name as a coded concept of the private scheme (value: the name made code-safe, 16 characters)."""
    value = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:16] or "class"
    return hd.sr.CodedConcept(value, SCHEME, name[:64])


@functools.lru_cache(maxsize=256)
def probability_code(name: str) -> hd.sr.CodedConcept:
    """The coded concept of one class's probability measurement."""
    value = ("p-" + re.sub(r"[^A-Za-z0-9_.-]", "_", name))[:16]
    return hd.sr.CodedConcept(value, SCHEME, f"Probability of {name}"[:64])


def derived_uid(*parts: str, root: str | None = None) -> str:
    """A UID that is a function of `parts` (same batch, same model -> same UID)."""
    return generate_uid(prefix=root or UID_PREFIX, entropy_srcs=list(parts))


# Type 2 attributes (present, may be empty) of the patient and study modules that highdicom copies from the
# evidence into the SR; some modalities and converters leave them out.
TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
         "ReferringPhysicianName", "StudyID", "AccessionNumber")


SEX_TERMS = ("M", "F", "O")  # PS3.3 C.7.1.1: Patient's Sex defined terms


def _valid(keyword: str, value: Any) -> bool:
    """Is a type 2 value one highdicom (and the standard) accepts in the SR: a defined term, a real date or time?"""
    text = str(value or "").strip()
    if not text:
        return True
    if keyword == "PatientSex":
        return text in SEX_TERMS
    if keyword.endswith("Date"):
        try:
            return len(text) == 8 and bool(datetime.date(int(text[:4]), int(text[4:6]), int(text[6:8])))
        except ValueError:
            return False
    if keyword.endswith("Time"):
        return bool(re.fullmatch(r"([01]\d|2[0-3])([0-5]\d([0-5]\d(\.\d{1,6})?)?)?", text))
    return True


def sanitised_header(ds: pydicom.Dataset) -> tuple[pydicom.Dataset, list[str]]:
    """A copy of a source header whose type 2 attributes an SR needs are present (empty when missing) and
    valid (values outside the defined terms or formats emptied); with the keywords emptied (never values)."""
    missing = [k for k in TYPE2 if k not in ds]
    invalid = [k for k in TYPE2 if k in ds and not _valid(k, ds[k].value)]
    if not missing and not invalid:
        return ds, []
    ds = copy.deepcopy(ds)
    for k in missing + invalid:
        setattr(ds, k, "")
    return ds, invalid


# Beside the Patient and Study modules: the UIDs, and what highdicom's Contributing Equipment Sequence takes
# from the first source (`ContributingEquipment.for_image_acquisition`).
_ALSO = frozenset(("SpecificCharacterSet", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID",
                   "Manufacturer", "ManufacturerModelName", "SoftwareVersions", "DeviceSerialNumber", "InstitutionName",
                   "InstitutionalDepartmentName", "InstitutionAddress", "StationName", "AcquisitionDateTime",
                   "AcquisitionDate", "AcquisitionTime"))


@functools.lru_cache(maxsize=64)
def _sr_header_tags(sop_class: str) -> frozenset[int] | None:
    """The tags an SR takes from a source of this SOP class: the root attributes of its IOD's Patient and Study
    modules (what highdicom copies from an SR's first evidence instance) and `_ALSO`; None for a SOP class
    highdicom does not know."""
    try:  # highdicom's tables of the standard (a private module: without it, the whole header is kept)
        from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map, get_sop_class_iod_map
    except ImportError:
        return None
    iod = get_sop_class_iod_map().get(sop_class)
    if iod is None:
        return None
    attributes = get_module_attribute_map()
    keywords = {str(item["keyword"]) for module in get_iod_module_map()[iod] if module["ie"] in ("Patient", "Study")
                for item in attributes[module["key"]] if not item["path"]} | _ALSO
    return frozenset(int(t) for t in map(pydicom.datadict.tag_for_keyword, keywords) if t is not None)


def sr_header(ds: pydicom.Dataset) -> pydicom.Dataset:
    """What an SR takes from a source header: its UIDs and character set, its Patient and Study modules' root
    attributes and its equipment (a series' history keeps these, not the whole header: serialising 100+
    elements per instance cost about 3 ms). The whole header for a SOP class highdicom does not know.

    Only the chosen elements are read (a header's other raw elements are never decoded)."""
    keep = _sr_header_tags(str(ds.get("SOPClassUID", "")))
    if keep is None:
        return ds
    out = pydicom.Dataset()
    for tag in sorted(keep.intersection(ds.keys())):
        out.add(ds[tag])
    return out


def _complete(ds: pydicom.Dataset) -> pydicom.Dataset:
    """`sanitised_header` without the list."""
    return sanitised_header(ds)[0]


@functools.lru_cache(maxsize=8)
def method_code(method: str) -> hd.sr.CodedConcept:
    """How the finding was decided ("operating point" or "argmax") as a coded concept."""
    return hd.sr.CodedConcept(method.replace(" ", "-"), SCHEME, f"Decision by {method}")


@functools.lru_cache(maxsize=16)
def _algorithm(name: str, version: str, weights_sha256: str) -> hd.sr.AlgorithmIdentification:
    """The model as TID 4019 Algorithm Identification (the same items in every group of the model)."""
    return hd.sr.AlgorithmIdentification(name=name[:64], version=(version or "unknown")[:64],
                                         parameters=[f"weights_sha256={weights_sha256}"] if weights_sha256 else None)


def _group(ds: pydicom.Dataset, answer: Answer, info: ModelInfo) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    algorithm = _algorithm(info.name, info.version, info.weights_sha256)
    probs: dict[str, float] = answer.probabilities
    # The algorithm is identified once, on the group (TID 1501); repeating it on every measurement
    # made each group about a third larger and slower to write.
    measurements = [hd.sr.Measurement(name=probability_code(c), value=float(p), unit=UNIT_ONE) for c, p in probs.items()]
    if answer.ood_score is not None and np.isfinite(answer.ood_score):
        measurements.append(hd.sr.Measurement(name=CODE_OOD_SCORE, value=float(answer.ood_score), unit=UNIT_ONE))
    # The finding is what the model decided; for an image outside its inputs, that no result holds for it.
    evaluations = [] if answer.ood else [hd.sr.QualitativeEvaluation(CODE_DECISION, class_code(answer.label))]
    if answer.ood is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(CODE_OOD, YES if answer.ood else NO))
    method = "operating point" if answer.decision == "operating_point" else "argmax"
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=derived_uid("group", ds.SOPInstanceUID, info.weights_sha256),
                                                     identifier=f"remedis {info.name}"[:64]),
        finding_type=CODE_NOT_VALID if answer.ood else class_code(answer.label),
        method=method_code(method),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup(ds.SOPClassUID, ds.SOPInstanceUID,
                                                            referenced_frame_numbers=answer.frames or None)],
    )
    content = group[0].ContentSequence
    if answer.frames:
        content.append(hd.sr.TextContentItem(
            CODE_FRAMES, f"{len(answer.frames)} frame(s) read; the result is frame {answer.frame}'s", relationship_type="CONTAINS"))
    for reason in answer.ood_reasons:
        content.append(hd.sr.TextContentItem(CODE_OOD_REASON, str(reason)[:1024], relationship_type="CONTAINS"))
    content.append(hd.sr.TextContentItem(CODE_COMMENT, NOT_FOR_DIAGNOSIS, relationship_type="CONTAINS"))
    return group


def build_sr(sources: list[pydicom.Dataset], answers: list[Answer], info: ModelInfo,  # long: docstring
             institution: str | None = None, root: str | None = None, assemble: bool = True,
             previous: list[pydicom.Dataset] | None = None) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 SR for `sources` (headers of one study; pixel data not needed) and their answers.

    Args:
        sources: the source instances' datasets, all of one study.
        answers: the model's answer for each source (same order).
        info: the model that answered.
        institution: written as Institution Name when given.
        root: the UID root for the SR's UIDs (default pydicom's).
        assemble: add the measurement groups after highdicom built the document around the first (same
            result, 3.6x faster at 100 images); False: hand highdicom every group (the reference).
        previous: earlier SRs of the same series (Study, Series, SOP Class and SOP Instance UIDs) that this one
            supersedes: they go into the Predecessor Documents Sequence and the Instance Number follows them.
    """
    pairs = [(_complete(ds), a) for ds, a in zip(sources, answers)]
    if not pairs:
        raise ValueError("no answered image to report")
    studies = {ds.StudyInstanceUID for ds, _ in pairs}
    if len(studies) != 1:
        raise ValueError(f"an SR covers one study; got {len(studies)}")
    groups = [_group(ds, a, info) for ds, a in pairs]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device,
                observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                    uid=derived_uid("device", info.name), name=info.name[:64], manufacturer_name=MANUFACTURER,
                    model_name=(info.version or "unknown")[:64]))),
        procedure_reported=CODE_PROCEDURE,
        imaging_measurements=groups[:1] if assemble else groups,
    )
    with warnings.catch_warnings():  # highdicom's person-name warnings quote the patient's name
        warnings.simplefilter("ignore")
        sr = _sr(pairs, report, info, institution, root, previous or [])
    # The other groups join the "Imaging Measurements" container after construction: highdicom's
    # constructor copies, re-parses and searches the whole content tree (about 60 ms per group here),
    # while the evidence (every source, recorded whatever the content) and the document are the same.
    # `tests/test_gateway.py` checks the result equals a full construction, item for item.
    if assemble and len(groups) > 1:
        container = next(item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "126010")
        for group in groups[1:]:
            container.ContentSequence.extend(group)
    scheme = pydicom.Dataset()
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = SCHEME_NAME
    scheme.CodingSchemeResponsibleOrganization = SCHEME_ORGANISATION
    sr.CodingSchemeIdentificationSequence = pydicom.Sequence([scheme])
    sr.ManufacturerModelName = info.name[:64]
    sr.SoftwareVersions = (info.version or "unknown")[:64]
    return sr


def _sr(pairs, report, info: ModelInfo, institution: str | None, root: str | None,
        previous: list[pydicom.Dataset]) -> hd.sr.Comprehensive3DSR:
    sop_uids = sorted(ds.SOPInstanceUID for ds, _ in pairs)
    series_uid = pairs[0][0].SeriesInstanceUID
    return hd.sr.Comprehensive3DSR(
        evidence=[ds for ds, _ in pairs],
        content=report,
        series_instance_uid=derived_uid("sr-series", series_uid, info.weights_sha256, root=root),
        series_number=9901,
        sop_instance_uid=derived_uid("sr", info.weights_sha256, *sop_uids, root=root),
        instance_number=len(previous) + 1,
        previous_versions=previous or None,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=institution or None,
        series_description=SERIES_DESCRIPTION,
    )


def read_results(sr: pydicom.Dataset) -> dict[str, dict[str, Any]]:
    """Per referenced SOP Instance UID: probabilities, decision, OOD flag and score, from an SR we wrote.

    Used by tests and by anyone checking a result; reads the content tree with highdicom.

    Example:
        >>> read_results(pydicom.dcmread("sr.dcm"))["1.2.3..."]["probabilities"]["malignant"]
        0.29
    """
    parsed = hd.sr.Comprehensive3DSR.from_dataset(sr)
    out: dict[str, dict[str, Any]] = {}
    for group in parsed.content.get_image_measurement_groups():
        source = group.source_images[0]
        ref = source.referenced_sop_instance_uid
        finding = group.finding_type
        entry: dict[str, Any] = {"probabilities": {}, "ood": None, "ood_score": None, "label": None,
                                 "finding": finding.meaning, "valid": finding.value != CODE_NOT_VALID.value,
                                 "frames": [int(x) for x in source.referenced_frame_numbers or []] or None}
        for m in group.get_measurements():
            if m.name.value.startswith("p-"):
                entry["probabilities"][m.name.meaning.removeprefix("Probability of ")] = float(m.value)
            elif m.name.value == CODE_OOD_SCORE.value:
                entry["ood_score"] = float(m.value)
        for q in group.get_qualitative_evaluations():
            if q.name.value == CODE_DECISION.value:
                entry["label"] = q.value.meaning
            elif q.name.value == CODE_OOD.value:
                entry["ood"] = q.value.value == YES.value
        out[ref] = entry
    return out


def _direction(v) -> str:
    """The patient-orientation letters of a direction cosine (DICOM PS3.3 C.7.6.1.1.1), major axis first."""
    letters = [("L", "R"), ("P", "A"), ("H", "F")]
    order = sorted(range(3), key=lambda i: -abs(v[i]))
    return "".join(letters[i][0] if v[i] > 0 else letters[i][1] for i in order if abs(v[i]) > 0.2) or "L"


def patient_orientation(ds: pydicom.Dataset) -> tuple[str, str] | None:
    """The source's (row, column) patient orientation: Patient Orientation, else from Image Orientation."""
    po = getattr(ds, "PatientOrientation", None)
    if po is not None and len(po) == 2 and all(str(x) for x in po):
        return str(po[0]), str(po[1])
    iop = getattr(ds, "ImageOrientationPatient", None)
    if iop is not None and len(iop) == 6:
        v = [float(x) for x in iop]
        return _direction(v[:3]), _direction(v[3:])
    return None


def result_lines(answer: Answer, info: ModelInfo) -> list[str]:
    """The result as short text lines (what the Secondary Capture shows)."""
    probs = answer.probabilities
    lines = [f"remedis {info.name} {info.version}"[:60],
             "  ".join(f"P({c})={p:.3f}" for c, p in probs.items())[:60],
             f"decision: {answer.label} ({'operating point' if answer.decision == 'operating_point' else 'argmax'})"[:60]]
    if answer.ood is not None:
        lines.append(f"out of distribution: {'YES' if answer.ood else 'no'}"
                     + (f" (score {answer.ood_score:.3g})" if answer.ood_score is not None else ""))
        lines += [f"  {r}"[:60] for r in answer.ood_reasons[:3]]
    lines.append("NOT FOR DIAGNOSTIC USE")
    return lines


def build_secondary_capture(source: pydicom.Dataset, image: np.ndarray, answer: Answer, info: ModelInfo,
                            root: str | None = None) -> hd.sc.SCImage:
    """A Secondary Capture of `image` (the source's decoded pixels, any range) with the result burned in,
    for viewers that cannot show SR. 8-bit MONOCHROME2, at most 512 px on the long side, text at the top.

    Args:
        source: the source instance's header (patient and study are copied from it).
        image: its pixels, (H, W) or (H, W, 3), as `remedis.data.readers` decodes them.
        answer: the model's answer for it.
        info: the model that answered.
    """
    from PIL import Image, ImageDraw, ImageFont

    orientation = patient_orientation(source)
    if orientation is None:
        raise ValueError("no Patient Orientation or Image Orientation (Patient) to give the capture")
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr @ np.array([0.299, 0.587, 0.114], np.float32)
    lo, hi = np.percentile(arr, [0.5, 99.5]) if arr.size else (0.0, 1.0)
    arr = np.clip((arr - lo) / max(float(hi - lo), 1e-6), 0, 1) * 255
    img = Image.fromarray(arr.astype(np.uint8))
    scale = 512 / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
    lines = result_lines(answer, info)
    font = ImageFont.load_default()
    band = 12 * len(lines) + 8
    canvas = Image.new("L", (max(img.width, 320), img.height + band), 0)
    canvas.paste(img, (0, band))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, 4 + 12 * i), line, fill=255, font=font)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=_complete(source), pixel_array=np.asarray(canvas, dtype=np.uint8),
            photometric_interpretation="MONOCHROME2", bits_allocated=8, coordinate_system="PATIENT", patient_orientation=orientation,
            series_instance_uid=derived_uid("sc-series", source.SeriesInstanceUID, info.weights_sha256, root=root),
            series_number=9902, sop_instance_uid=derived_uid("sc", source.SOPInstanceUID, info.weights_sha256, root=root),
            instance_number=int(getattr(source, "InstanceNumber", 1) or 1), manufacturer=MANUFACTURER,
            transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian, series_description=SERIES_DESCRIPTION)
    sc.BurnedInAnnotation = "YES"
    return sc
