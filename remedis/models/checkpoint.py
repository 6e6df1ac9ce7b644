"""Checkpoints are folders a user can carry: `model.safetensors` + `meta.json`.

`meta.json` holds the architecture and input spec (preprocessing), the config, the hashes of the
manifests the weights were trained on, library versions and the stage history. Folders are written
atomically: into a temporary sibling, then renamed into place, so a killed job never leaves a
half-written checkpoint where a reader would find it.

Example:
    >>> save_checkpoint("runs/x/backbones/remedis", model.backbone.state_dict(), meta)
    >>> weights, meta = load_checkpoint("runs/x/backbones/remedis")
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from remedis.files import file_sha256

WEIGHTS = "model.safetensors"
META = "meta.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or corrupt; the message names it."""


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the weights (recorded in every checkpoint)."""
    import lightning
    import monai
    import pydicom
    import timm

    import remedis

    return {
        "remedis": remedis.__version__, "python": platform.python_version(), "torch": torch.__version__,
        "timm": timm.__version__, "monai": monai.__version__, "lightning": lightning.__version__,
        "pydicom": pydicom.__version__,
    }


def save_checkpoint(folder: str | Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write a checkpoint folder atomically (a temporary sibling renamed into place); returns it."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / WEIGHTS))
        meta = {"format_version": FORMAT_VERSION, **meta, "weights_sha256": file_sha256(tmp / WEIGHTS)}
        meta.setdefault("versions", library_versions())
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        for f in (tmp / WEIGHTS, tmp / META):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def read_meta(folder: str | Path) -> dict[str, Any]:
    """A checkpoint folder's meta.json; CheckpointError when missing or corrupt."""
    folder = Path(folder)
    if not (folder / META).is_file():
        raise CheckpointError(f"{folder}: not a remedis checkpoint folder (no {META})")
    try:
        return json.loads((folder / META).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{folder / META}: corrupt metadata ({exc})") from None


def load_checkpoint(folder: str | Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and meta.json of a checkpoint folder; `verify` checks the weights against their recorded hash."""
    folder = Path(folder)
    meta = read_meta(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{folder}: weights file {WEIGHTS} is missing")
    if verify and meta.get("weights_sha256") and file_sha256(weights) != meta["weights_sha256"]:
        raise CheckpointError(f"{weights}: hash does not match meta.json (corrupt or modified checkpoint)")
    try:
        return load_file(str(weights)), meta
    except Exception as exc:
        raise CheckpointError(f"{weights}: cannot read weights ({exc})") from None


def load_matching(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict with an error that names missing and unexpected keys."""
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{what}: weights do not match the architecture: "
            f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
