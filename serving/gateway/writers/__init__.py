"""Gateway result writers: a registry where a new kind of result is one registered class in its own file.

After the model answered a batch (the instances of one series), every enabled writer turns the answers of
each study into results: named payloads with a media type. The spool keeps them in the outbox under their
names, and the sender hands each to the destination by its media type (`application/dicom` by C-STORE or
STOW-RS); a result the destination does not take is kept in the spool's results/ with the batch.

Writers today: `sr` (a TID 1500 Comprehensive 3D SR per study, always) and `secondary_capture` (the image
with the result burned in, one per instance, with `secondary_capture: true`). To add one: write
`serving/gateway/writers/<name>.py` with a class decorated by `@register_writer`, and import it below.

Example:
    >>> study = StudyAnswers(route=0, study_uid="1.2.3", pairs=[(ds, answer)], files={ds.SOPInstanceUID: path},
    ...                      info=model.info, settings=settings)
    >>> [r.name for w in enabled_writers(settings) for r in w.write(study)]
    ['sr-0-3f9c...dcm']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from remedis.registry import Registry

DICOM = "application/dicom"


@dataclass(frozen=True)
class Result:
    """One result payload: its file name in the outbox (unique in the batch), media type and bytes."""

    name: str
    media_type: str
    data: bytes


@dataclass
class StudyAnswers:
    """What a writer gets: one study's answered instances of a batch, and where they came from.

    Args:
        route: the index of the route whose model answered.
        study_uid: the study's StudyInstanceUID.
        pairs: (header, `serving.answer.Answer`) per answered instance, in arrival order.
        files: SOPInstanceUID -> the spooled file (for writers that need the pixels).
        info: the model that answered (`serving.gateway.inference.ModelInfo`).
        settings: the gateway's settings.
        earlier: (header, answer) of the same series' instances answered in earlier batches (a series that grew
            after it was processed): a writer that summarises the series covers them too.
        previous: the earlier SRs of the series (their UIDs), which a new SR supersedes.
    """

    route: int
    study_uid: str
    pairs: list[tuple[Any, Any]]
    files: dict[str, Path] = field(default_factory=dict)
    info: Any = None
    settings: Any = None
    earlier: list[tuple[Any, Any]] = field(default_factory=list)
    previous: list[Any] = field(default_factory=list)


class ResultWriter(Protocol):
    """What a registered writer provides.

    Attributes:
        name: its name (logs, docs).
        media_type: the media type of every result it writes.
        suffix: the file-name ending of its results in the outbox (how the sender knows their media type).
    """

    name: ClassVar[str]
    media_type: ClassVar[str]
    suffix: ClassVar[str]

    def enabled(self, settings: Any) -> bool:
        """Whether the gateway's settings ask for this writer."""
        ...

    def write(self, study: StudyAnswers) -> list[Result]:
        """The results for one study (none when it has nothing to say)."""
        ...


class _Writers(Registry):
    """The writer registry: a suffix names one media type only."""

    def register(self, cls: type) -> type:
        """Class decorator: register one instance of `cls` under `cls.name`."""
        if any(w.suffix == cls.suffix and w.media_type != cls.media_type for w in self.values()):
            raise ValueError(f"result writer {cls.name!r}: suffix {cls.suffix} already names another media type")
        return super().register(cls)


WRITERS = _Writers("result writer")
register_writer = WRITERS.register


def enabled_writers(settings: Any) -> list[ResultWriter]:
    """The writers the settings ask for, in registration order."""
    return [w for w in WRITERS.values() if w.enabled(settings)]


def media_type_of(path: Path) -> str:
    """A result file's media type, from the suffix its writer gave it (application/octet-stream if unknown)."""
    return next((w.media_type for w in WRITERS.values() if path.name.endswith(w.suffix)), "application/octet-stream")


# The registered writers (importing a module registers it), in the order they run.
# isort: off
from serving.gateway.writers import sr  # noqa: E402,F401
from serving.gateway.writers import secondary_capture  # noqa: E402,F401
# isort: on
