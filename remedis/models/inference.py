"""The one inference loop: a network over images in [0, 1], batch by batch, in the layout and precision
training used (bf16 autocast, `remedis.models.layout`'s memory format).

Evaluation, OOD fitting (`AdaptedModel.infer`) and the kNN monitor of SimCLR (`embed_cache`) call it, so
their embeddings and logits are computed the same way; the service's model worker runs the same
`Classifier.logits_and_embedding` with its own device and precision settings (`serving.runtime`).

Example:
    >>> emb = run_batches(backbone, lambda x: backbone.forward_head(backbone.forward_features(x)), cache.pixels,
    ...                   cache.preprocessing)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from remedis.models.layout import fast_bf16, memory_format


@torch.inference_mode()
def run_batches(module: torch.nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor, preprocessing,
                batch: int = 256, autocast: bool | None = None, device: torch.device | None = None) -> torch.Tensor:
    """`fn` over normalised batches of `pixels` (N, 1, S, S) in [0, 1]; float32 results on the CPU.

    Args:
        module: the network `fn` runs (its device and memory layout are used).
        fn: batch (B, C, S, S) -> (B, ...) tensor, e.g. the module itself or its embedding.
        pixels: resized images in [0, 1] (an `ImageCache`'s pixels).
        preprocessing: the `Preprocessing` that normalises them (and repeats channels).
        batch: images per forward pass.
        autocast: bf16 autocast on CPU and CUDA; None: where the device has bf16 natively (`fast_bf16`).
        device: where to run; default the module's.
    """
    device = device or next(module.parameters()).device
    fmt = memory_format(module, device)
    autocast = fast_bf16(device) if autocast is None else autocast
    out = []
    for i in range(0, len(pixels), batch):
        x = preprocessing.normalize(pixels[i:i + batch].float()).to(device).contiguous(memory_format=fmt)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast and device.type in ("cpu", "cuda")):
            out.append(fn(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


@torch.inference_mode()
def embed_cache(backbone: torch.nn.Module, cache, batch_size: int = 256) -> torch.Tensor:
    """Pooled embeddings of `cache` (the shared inference loop, in eval mode; training mode restored)."""
    was_training = backbone.training
    backbone.eval()
    try:
        return run_batches(backbone, lambda x: backbone.forward_head(backbone.forward_features(x)), cache.pixels,
                           cache.preprocessing, batch_size)
    finally:
        backbone.train(was_training)
