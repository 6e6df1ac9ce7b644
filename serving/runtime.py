"""The model side of the service: one adapted model on one device, logits and embedding in one pass.

`forward` takes a preprocessed batch (what `Preprocessing` makes, stacked) and returns one float32
array `[logits | embedding]` per image, so the service's batched call carries both and the OOD
detector and `embed` need no second pass. With precision "auto" on CPU it runs exactly the ops of
`AdaptedModel.logits` (bf16 autocast, channels_last input), so a served answer equals the offline one.

Example:
    >>> rt = ModelRuntime.load("runs/quickstart/adapted/remedis@1", device="cpu")
    >>> out = rt.forward(np.stack([rt.model.preprocessing(img).numpy()]))
    >>> logits, emb = rt.split(out)
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from remedis.adapt.model import AdaptedModel
from remedis.models.layout import memory_format

log = logging.getLogger("bentoml.remedis")


def pick_device(gpu: int) -> torch.device:
    """CUDA when GPUs are asked for and visible, else the CPU (with a warning)."""
    if gpu > 0:
        if not torch.cuda.is_available():
            log.warning("resources.gpu=%d but no CUDA device is visible; running on CPU", gpu)
            return torch.device("cpu")
        return torch.device("cuda")
    return torch.device("cpu")


class ModelRuntime:
    """The served model on its device: precision, memory layout, threads; one forward pass gives logits and embeddings."""

    def __init__(self, model: AdaptedModel, device: str | torch.device = "cpu", precision: str = "auto",
                 channels_last: bool = True):
        self.model = model
        self.device = torch.device(device)
        self.channels_last = channels_last
        if channels_last and self.device.type == "cuda":
            model.to(self.device)  # channels_last weights: tensor-core friendly convs
        else:
            # On CPU the weights stay as offline evaluation has them; the input takes the layout
            # `AdaptedModel` gives it (remedis.models.layout: NCHW for GroupNorm nets on CPU).
            model.classifier.to(self.device)
            model.device = self.device
        self.memory_format = memory_format(model.classifier, self.device)
        self.dtype = self._dtype(precision)
        self.num_classes = len(model.class_names)

    def _dtype(self, precision: str) -> torch.dtype | None:
        if precision == "fp32":
            return None
        if precision == "fp16":
            return torch.float16
        if precision == "bf16":
            return torch.bfloat16
        # auto: what offline evaluation uses on CPU (bf16 autocast when the model asks for it);
        # AMP on GPU, bf16 where the GPU supports it.
        if self.device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if self.model.autocast else None

    @classmethod
    def load(cls, folder: str | Path, gpu: int = 0, precision: str = "auto", channels_last: bool = True,
             threads: int | None = None) -> "ModelRuntime":
        """Load an adapted model folder onto the chosen device (GPU when asked and present)."""
        if threads:
            torch.set_num_threads(threads)
        return cls(AdaptedModel.load(folder), pick_device(gpu), precision, channels_last)

    @torch.inference_mode()
    def forward(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N, C, S, S) preprocessed batch -> (N, num_classes + embedding_dim) float32."""
        x = torch.as_tensor(x, dtype=torch.float32).to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=self.memory_format)
        amp = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else nullcontext()
        with amp:
            return self.model.classifier.logits_and_embedding(x).float().cpu().numpy()

    def split(self, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Split a forward output into logits and embeddings."""
        return out[:, :self.num_classes], out[:, self.num_classes:]

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Run each batch size once so the first requests do not pay for kernel selection."""
        pre = self.model.preprocessing
        for n in sorted(set(batch_sizes)):
            self.forward(np.zeros((n, pre.in_chans, pre.image_size, pre.image_size), np.float32))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
