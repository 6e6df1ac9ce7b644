"""The TID 1500 Comprehensive 3D SR of a study's answers, back into the source study (always written)."""

from __future__ import annotations

from serving.gateway.dicom_bytes import encode
from serving.gateway.report import build_sr
from serving.gateway.spool import uid_key
from serving.gateway.writers import DICOM, Result, StudyAnswers, register_writer


@register_writer
class StructuredReport:
    """One SR per study of a batch: a measurement group per answered image (`serving.gateway.report`)."""

    name = "sr"
    media_type = DICOM
    suffix = ".dcm"

    def enabled(self, settings) -> bool:
        """Always: the SR is the gateway's result."""
        return True

    def write(self, study: StudyAnswers) -> list[Result]:
        """The SR, named after the route and the study; for a series that grew, one covering all its instances
        that supersedes the earlier SRs (Predecessor Documents Sequence, the next Instance Number)."""
        pairs = study.earlier + study.pairs
        sr = build_sr([ds for ds, _ in pairs], [a for _, a in pairs], study.info, study.settings.institution or None,
                      root=study.settings.uid_root or None, previous=study.previous)
        return [Result(f"sr-{study.route}-{uid_key(study.study_uid)}.dcm", DICOM, encode(sr))]
