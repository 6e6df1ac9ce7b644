"""Import external backbone weights (timm / BiT / torchvision-style state_dicts) from a local file.

No downloads at run time: the user points at a file (`.pth`, `.pt`, `.bin` or `.safetensors`). Wrapper
prefixes (`module.`, `model.`, `backbone.`, `encoder.`) are stripped, classifier heads dropped, and the
first convolution adapted to the model's channel count with timm's own `adapt_input_conv` (3 -> 1 channel
sums the RGB filters). Anything still missing or unexpected is an error that names the keys.

Example:
    >>> backbone = create_backbone("resnetv2_50x1_bit", in_chans=1)
    >>> load_external_weights(backbone, "BiT-M-R50x1.pth")
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from timm.models import adapt_input_conv

from remedis.models.checkpoint import CheckpointError, load_matching

WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "encoder.")
HEAD_PREFIXES = ("fc.", "head.", "classifier.", "head.fc.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from None
    for key in ("state_dict", "model", "model_state"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state_dict of tensors")
    return state


def load_external_weights(backbone: nn.Module, path: str | Path) -> None:
    state = read_state_dict(path)
    cleaned = {}
    for key, value in state.items():
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.startswith(HEAD_PREFIXES):
            continue
        cleaned[key] = value
    first_conv = getattr(backbone, "pretrained_cfg", {}).get("first_conv")
    own = backbone.state_dict()
    if first_conv and f"{first_conv}.weight" in cleaned:
        key = f"{first_conv}.weight"
        want = own[key].shape[1]
        if cleaned[key].shape[1] != want:
            cleaned[key] = adapt_input_conv(want, cleaned[key].float()).to(cleaned[key].dtype)
    load_matching(backbone, cleaned, str(path))
