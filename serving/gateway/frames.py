"""Multi-frame instances (ultrasound cine loops, multi-frame CT/XA): which frames the model reads, and one
answer per instance from them.

A multi-frame instance is split into single-frame instances (the same header, one frame's pixels, native
explicit VR little endian), so that every route (a local model folder or the deployed service) classifies
frames with its ordinary single-image code, and a long cine loop is never refused for its total size.
`frames.mode` chooses the frames:
    all      up to `frames.max_frames`, evenly spaced over the loop (all of them when fewer);
    first    frame 1;
    middle   the middle frame.
The instance's answer is that of the frame with the highest probability of the positive class, with the
frames read and the chosen one recorded (`Answer.frames`, `Answer.frame`), so the SR can reference them
(Referenced Frame Number) and say which frame gave the result.

Example:
    >>> numbers = frames_to_read(120, FrameSettings("all", 16))
    >>> parts = split_frames(pydicom.dcmread("cine.dcm"), numbers)
"""

from __future__ import annotations

import copy
import io
from dataclasses import replace

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian

from serving.answer import Answer, Refusal
from serving.gateway.settings import FrameSettings


def frame_count(ds: pydicom.Dataset) -> int:
    """Number of frames of an instance (1 when the header has no Number of Frames)."""
    try:
        return max(1, int(getattr(ds, "NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def frames_to_read(count: int, settings: FrameSettings) -> list[int]:
    """The 1-based frame numbers `settings` reads of an instance with `count` frames."""
    if count <= 1:
        return [1]
    if settings.mode == "first":
        return [1]
    if settings.mode == "middle":
        return [(count + 1) // 2]
    n = min(count, settings.max_frames)
    return sorted({int(round(x)) + 1 for x in np.linspace(0, count - 1, n)})


def split_frames(ds: pydicom.Dataset, numbers: list[int]) -> list[bytes]:
    """Single-frame DICOM files (bytes) of the frames `numbers` (1-based) of a multi-frame instance, decoded
    once: colour frames as RGB, every frame native explicit VR little endian."""
    pixels = ds.pixel_array  # (F, H, W) or (F, H, W, 3); YBR is converted to RGB by pydicom
    out = []
    for number in numbers:
        frame = np.ascontiguousarray(pixels[number - 1])
        one = copy.deepcopy(ds)
        for keyword in ("PixelData", "NumberOfFrames", "FrameIncrementPointer", "FrameTime", "FrameTimeVector",
                        "PerFrameFunctionalGroupsSequence"):
            if keyword in one:
                delattr(one, keyword)
        if frame.ndim == 3:
            one.PhotometricInterpretation, one.SamplesPerPixel, one.PlanarConfiguration = "RGB", 3, 0
        one.PixelData = frame.tobytes()
        one.file_meta = copy.deepcopy(ds.file_meta)
        one.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        buf = io.BytesIO()
        one.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


def combine(answers: list[Answer | Refusal], numbers: list[int], positive: str | None) -> Answer | Refusal:
    """One instance's answer from its frames': the frame with the highest probability of `positive` (the first
    class when None), with every frame read and the chosen one; a refusal when no frame was answered."""
    good = [(n, a) for n, a in zip(numbers, answers) if isinstance(a, Answer)]
    if not good:
        return next((a for a in answers if isinstance(a, Refusal)), Refusal("no frame answered", 422))
    key = positive if positive in good[0][1].probabilities else next(iter(good[0][1].probabilities))
    number, best = max(good, key=lambda na: na[1].probabilities.get(key, 0.0))
    reasons = list(best.ood_reasons)
    flagged = sum(bool(a.ood) for _, a in good)
    if flagged and not best.ood:
        reasons.append(f"{flagged} of {len(good)} frames read are out of distribution")
    return replace(best, ood_reasons=reasons, frames=[n for n, _ in good], frame=number)
