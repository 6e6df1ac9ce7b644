"""Distillation to a small serving model (SimCLRv2 style).

A large adapted teacher labels the site's images, labeled or not, with soft probabilities; a student
learns to match them (KL divergence at a distillation temperature). The site's unlabeled images thus
become training signal (SimCLRv2's third step), and with a small student serving gets cheap. Images that
the teacher was trained on are matched to their labels instead of to the teacher (`labeled_images`). A student of the backbone's
own architecture starts from the pretrained backbone (`init`) rather than from random weights: with a
few hundred site images a random student cannot reach its teacher. The student is then calibrated and
given an operating threshold on the validation split like any adapted model.

Example:
    >>> student = distill(teacher, site_images, val, "resnet18", epochs=10)
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from remedis.adapt.calibration import fit_temperature
from remedis.adapt.model import AdaptedModel
from remedis.config import RuntimeConfig
from remedis.data.dataset import ImageCache, LabeledDataset
from remedis.metrics import threshold_for_sensitivity
from remedis.models.checkpoint import load_checkpoint, load_matching
from remedis.models.classifier import Classifier
from remedis.models.layout import memory_format
from remedis.training import make_trainer
from remedis.training.transforms import FineTuneAugment


class _SoftTargets(Dataset):
    def __init__(self, cache: ImageCache, targets: torch.Tensor, augment):
        self.cache, self.targets, self.augment = cache, targets, augment

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i):
        x = self.cache.image(i).float()
        return self.cache.preprocessing.normalize(self.augment(x)), self.targets[i]


class DistillModule(L.LightningModule):
    """Lightning module of distillation: the student matches the teacher's softened probabilities (KL divergence)."""

    def __init__(self, student: Classifier, temperature: float = 1.0, lr: float = 1e-3, weight_decay: float = 1e-4):
        super().__init__()
        self.student, self.temperature, self.lr, self.weight_decay = student, temperature, lr, weight_decay
        self.losses: list[float] = []

    def setup(self, stage: str) -> None:
        # channels_last before the strategy wraps the model: converting after DDP has built its gradient
        # buckets gave wrong averaged gradients (tests/test_ddp.py)
        """Put the student in the device's memory layout."""
        self.memory_format = memory_format(self.student, self.trainer.strategy.root_device)
        self.student.to(memory_format=self.memory_format)

    def training_step(self, batch, batch_idx):
        """KL divergence between the student's and the teacher's softened probabilities."""
        x, teacher_probs = batch
        logits = self.student(x.contiguous(memory_format=self.memory_format)).float()
        t = self.temperature
        loss = F.kl_div(F.log_softmax(logits / t, 1), teacher_probs, reduction="batchmean") * t * t
        self.losses.append(loss.detach().item())
        self.log("kl", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        """AdamW with a cosine schedule."""
        opt = torch.optim.AdamW(self.student.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=self.lr, total_steps=steps, pct_start=0.15), "interval": "step"}}


def teacher_probabilities(teacher: AdaptedModel, cache: ImageCache, temperature: float = 1.0) -> torch.Tensor:
    """The teacher's softened probabilities (temperature `temperature`) on every cached image."""
    x = teacher.preprocessing.normalize(cache.pixels.float())
    logits = torch.cat([teacher.logits(x[i:i + 256]) for i in range(0, len(x), 256)])
    return (logits / temperature).softmax(1)


def distill(teacher: AdaptedModel, images: ImageCache, val: ImageCache, student_arch: str, epochs: int = 10,
            lr: float = 1e-3, batch_size: int = 64, temperature: float = 1.0, runtime: RuntimeConfig | None = None,
            seed: int = 0, sensitivity: float = 0.9, progress: bool = False, init: Path | None = None,
            labeled_images: Collection[str] = ()) -> AdaptedModel:
    """Distil `teacher` into a `student_arch` network on `images`, then calibrate it on `val`.

    Args:
        teacher: the adapted model whose probabilities the student learns.
        images: the site's train images, labeled or not, decoded with the teacher's preprocessing.
        val: labeled validation images (temperature, operating point).
        student_arch: the student's architecture.
        epochs, lr, batch_size: the distillation schedule.
        temperature: softens the teacher's probabilities.
        runtime, seed, progress: as fine-tuning.
        sensitivity: the operating point chosen on `val`.
        init: a backbone folder the student starts from (its architecture must be `student_arch`); None: random.
        labeled_images: the images (paths) whose label the student may see, the teacher's own training
            images: they are matched to their label, not to the teacher. Other images' labels stay unused
            (a label budget simulated on a fully labeled manifest must not leak the rest).
    """
    if images.preprocessing != teacher.preprocessing:
        raise ValueError("distill: images must be cached with the teacher's preprocessing")
    runtime = runtime or RuntimeConfig()
    L.seed_everything(seed, verbose=False)
    soft = teacher_probabilities(teacher, images, temperature)
    labeled = 0
    if labeled_images:
        index, allowed = {name: i for i, name in enumerate(teacher.class_names)}, set(labeled_images)
        for i, r in enumerate(images.records):
            if r.image in allowed and r.label in index:
                soft[i] = F.one_hot(torch.tensor(index[r.label]), len(index)).to(soft.dtype)
                labeled += 1
    student = Classifier(student_arch, len(teacher.class_names), teacher.preprocessing.in_chans)
    if init is not None:
        state, _ = load_checkpoint(init)
        load_matching(student.backbone, state, str(init))
    module = DistillModule(student, temperature, lr)
    loader = DataLoader(_SoftTargets(images, soft, FineTuneAugment(teacher.preprocessing.image_size, seed=seed,
                                                                     channels=teacher.preprocessing.channels)),
                        batch_size=min(batch_size, len(images)), shuffle=True,
                        generator=torch.Generator().manual_seed(seed), drop_last=len(images) > batch_size)
    make_trainer(runtime, epochs, progress=progress, stage="distill").fit(module, loader)
    result = AdaptedModel(student, list(teacher.class_names), teacher.preprocessing, positive_index=teacher.positive_index)
    val_ds = LabeledDataset(val, result.class_names)
    logits = torch.cat([result.logits(x) for x, _ in DataLoader(val_ds, batch_size=256)])
    result.temperature = fit_temperature(logits, val_ds.targets)
    if len(result.class_names) == 2:
        probs = result.probs_from_logits(logits).numpy()
        result.threshold = threshold_for_sensitivity(val_ds.targets.numpy() == result.positive_index,
                                                     probs[:, result.positive_index], sensitivity)
        result.operating_point = {"sensitivity": sensitivity, "chosen_on": "validation"}
    result.provenance = {**teacher.provenance, "distilled_from": teacher.architecture, "distill_images": len(images),
                         "distill_labeled_images": labeled, "distill_init": str(init) if init else "random",
                         "distill_temperature": temperature, "distill_loss": module.losses[-5:]}
    return result
