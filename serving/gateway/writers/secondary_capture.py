"""A Secondary Capture per answered instance: its image with the result burned in, for viewers that do
not render SR (`secondary_capture: true` in the gateway settings)."""

from __future__ import annotations

import logging

from remedis.data.readers import ImageReadError, read_image
from serving.gateway.dicom_bytes import encode
from serving.gateway.report import build_secondary_capture
from serving.gateway.spool import uid_key
from serving.gateway.writers import DICOM, Result, StudyAnswers, register_writer

log = logging.getLogger("remedis.gateway")


@register_writer
class SecondaryCapture:
    """The source image, resized, with the decision, probabilities and OOD flag written on it."""

    name = "secondary_capture"
    media_type = DICOM
    suffix = ".dcm"

    def enabled(self, settings) -> bool:
        """When the settings ask for captures."""
        return bool(settings.secondary_capture)

    def write(self, study: StudyAnswers) -> list[Result]:
        """One capture per answered instance; an image that cannot be read or drawn is skipped (the SR
        carries its result anyway)."""
        out = []
        for ds, answer in study.pairs:
            try:
                sc = build_secondary_capture(ds, read_image(study.files[ds.SOPInstanceUID]), answer, study.info,
                                             root=study.settings.uid_root or None)
            except (ValueError, ImageReadError) as exc:
                log.info("no secondary capture for an instance of study %s: %s", uid_key(study.study_uid)[:12],
                         str(exc) if isinstance(exc, ValueError) and not isinstance(exc, ImageReadError) else type(exc).__name__)
                continue
            out.append(Result(f"sc-{study.route}-{uid_key(ds.SOPInstanceUID)}.dcm", DICOM, encode(sc)))
        return out
