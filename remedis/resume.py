"""Resume keys: one function per artifact, each naming what it hashes.

Every stage that writes an artifact records a key: the SHA-256 of everything that determines its output.
A rerun whose inputs hash to the key of a finished artifact reuses it (`reusable`), so a killed run resumes
at its first unfinished stage, a grown budget sweep trains only the new budgets, and a changed setting
retrains exactly what it changes. Training states of unfinished stages are keyed the same way
(`remedis.pretrain.jobs.resume_file`), so a changed config never resumes from a stale state.

`remedis run`, `remedis pretrain` and `remedis adapt` take their keys from here and nowhere else.

Example:
    >>> corpus = corpus_key(manifest.sha256, cfg.data, cfg.model, cfg.seed, ["site-A"])
    >>> key = backbone_key("supervised", corpus, cfg.pretrain.supervised, init_weights=None)
    >>> if not reusable(Path("runs/x/backbones/supervised"), key):
    ...     train_supervised(...)
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import is_dataclass, replace
from pathlib import Path
from typing import Any

from remedis.models.checkpoint import CheckpointError, read_meta

log = logging.getLogger("remedis")


def stage_key(*parts: Any) -> str:
    """SHA-256 of `parts` as sorted JSON (dataclasses and paths by their `str`): the primitive every key uses."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def reusable(folder: Path, key: str) -> bool:
    """True when `folder` holds a finished checkpoint (weights and meta.json) written under `key`."""
    try:
        meta = read_meta(folder)
    except CheckpointError:
        return False
    found = meta.get("stage_key") or meta.get("provenance", {}).get("stage_key")
    if found == key and (folder / "model.safetensors").is_file():
        log.info("reusing finished stage %s", folder)
        return True
    return False


def weights_of(folder: Path | None) -> str | None:
    """The weights hash a checkpoint folder records (None for no folder: random initialisation)."""
    return read_meta(folder)["weights_sha256"] if folder is not None else None


def prepared_key(stage: str, manifest_sha256: str | None, data: Any, in_chans: int | None, seed: int,
                 sites: Sequence[str]) -> str:
    """A prepared manifest (label map, patient-level splits, channels): the manifest's bytes, the `data`
    section, the network's input channels, the split seed and the sites kept."""
    return stage_key(stage, manifest_sha256, data, in_chans, seed, sorted(sites))


def shard_key(kind: str, images: Sequence[Any], preprocessing: dict, group_size: int, seed: int) -> str:
    """A pretraining corpus as shards (16 hex digits, a folder name): the image paths, the preprocessing,
    the MICLe group size and the grouping seed."""
    return stage_key(kind, sorted(str(i) for i in images), preprocessing, group_size, seed)[:16]


def corpus_key(manifest_sha256: str, data: Any, model: Any, seed: int, sites: Sequence[str]) -> list:
    """What a pretraining stage trains on and with: the manifest's hash, the `data` section (without
    `shard_dir`, a location that changes no pixel), the `model` section, the seed and the sites."""
    if is_dataclass(data) and hasattr(data, "shard_dir"):
        data = replace(data, shard_dir=None)
    return [manifest_sha256, data, model, seed, list(sites)]


def backbone_key(stage: str, corpus: list, section: Any, init_weights: str | None) -> str:
    """A pretrained backbone (`stage`: supervised or simclr): its corpus (`corpus_key`), the stage's config
    section and the weights it starts from (None: random initialisation)."""
    return stage_key(stage, corpus, section, init_weights)


def multitask_key(tasks: Sequence[tuple], data: Any, model: Any, seed: int, section: Any) -> str:
    """A multi-task upstream: per task its name, manifest hash and sites; the data and model sections,
    the seed and `pretrain.supervised`."""
    return stage_key("supervised-multitask", [list(t) for t in tasks], data, model, seed, section)


def adapt_key(manifest_sha256: str, site: str, data: Any, adapt: Any, ood_method: str, ood_accept_rate: float, seed: int,
              budget: float | int, start: Any, preprocessing: dict) -> str:
    """An adapted model folder: the manifest, the site, the data and adapt sections, the OOD detector's
    settings, the seed, the label budget, what adaptation starts from (the backbone's weights hash, or the
    random-init network) and the preprocessing."""
    return stage_key("adapt", manifest_sha256, site, data, adapt, ood_method, ood_accept_rate, seed, budget, start,
                     preprocessing)


def distill_key(teacher_key: str, teacher_weights: str, student: str, epochs: int, temperature: float, ood_method: str,
                ood_accept_rate: float, init_weights: str | None = None) -> str:
    """A distilled student: its teacher (stage key, which covers the site's data, and weights), the student
    architecture, the distillation epochs and temperature, the OOD detector's settings, and the weights the
    student starts from (None: random)."""
    return stage_key("distill", teacher_key, teacher_weights, student, epochs, temperature, ood_method, ood_accept_rate,
                     init_weights or "random", "labels-v2")
