"""Training pieces every stage shares: the Lightning runtime (devices, precision, resumable fits), the
classifier module and class weights (supervised upstream, fine-tuning), and the augmentation recipes
(fine-tuning, distillation, SimCLR). `remedis.pretrain` and `remedis.adapt` both take them from here.
"""

from remedis.training.runtime import (
    EpochCheckpoint,
    accelerator,
    fit_resumable,
    make_logger,
    make_trainer,
    quiet_lightning,
    setup_runtime,
    use_bf16,
)

__all__ = ["EpochCheckpoint", "accelerator", "fit_resumable", "make_logger", "make_trainer", "quiet_lightning",
           "setup_runtime", "use_bf16"]
