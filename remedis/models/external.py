"""Import external backbone weights (timm / BiT / torchvision-style state_dicts) from a local file.

No downloads at run time: the user points at a file (`.pth`, `.pt`, `.bin` or `.safetensors`). Wrapper
prefixes (`module.`, `model.`, `backbone.`, `encoder.`) are stripped, classifier heads dropped, and the
first convolution adapted to the model's channel count with timm's own `adapt_input_conv`: RGB weights
load unchanged into an RGB (`in_chans` 3) backbone, 3 -> 1 channel sums the RGB filters (a grey image
then gives what the RGB network gives on that image repeated), and 1 -> 3 spreads a grey filter over
the three channels (divided by 3). Anything still missing or unexpected is an error that names the keys.

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
    """Weights from a local file (safetensors or a torch state_dict), never a download."""
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
    """Load a local state_dict into `backbone` (in place), adapting the first convolution's channels.

    Args:
        backbone: a `create_backbone` model (timm; its `pretrained_cfg["first_conv"]` names the stem).
        path: the weights file (.pth, .pt, .bin or .safetensors).

    Raises:
        CheckpointError: unreadable file, a first convolution that cannot be adapted, or missing /
            unexpected keys (named).

    Example:
        >>> import tempfile, torch
        >>> from remedis.models import create_backbone
        >>> rgb = create_backbone("resnet18", in_chans=3)
        >>> path = Path(tempfile.mkdtemp()) / "r18.pth"
        >>> torch.save(rgb.state_dict(), path)
        >>> grey = create_backbone("resnet18", in_chans=1)
        >>> load_external_weights(grey, path)
        >>> tuple(grey.conv1.weight.shape)
        (64, 1, 7, 7)
    """
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
        want, have = own[key].shape[1], cleaned[key].shape[1]
        if have != want:
            try:  # base_chans: the file's own channel count (3 for ImageNet weights, 1 for grey ones)
                adapted = adapt_input_conv(want, cleaned[key].float(), base_chans=have if want > 1 else 3)
            except (NotImplementedError, AssertionError, ValueError):
                adapted = None
            if adapted is None or adapted.shape[1] != want:
                raise CheckpointError(f"{path}: first convolution {key} has {have} input channel(s) and cannot be "
                                      f"adapted to the model's {want}")
            cleaned[key] = adapted.to(cleaned[key].dtype)
    load_matching(backbone, cleaned, str(path))
