"""What every training stage shares: seeding, the Lightning Trainer, fast CPU/GPU settings.

bf16 autocast and channels_last give 2-3x on convolutions on CPUs with AVX-512 BF16 (and are the
right default on GPUs); the Trainer is configured once here so every stage trains the same way.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint

from remedis.config import RuntimeConfig
from remedis.files import atomic_replace
from remedis.models.layout import fast_bf16

log = logging.getLogger("remedis")


def quiet_lightning() -> None:
    """Silence Lightning's start-up banners and tips (remedis prints its own progress)."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*treespec.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=".*tensorboardX.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory.*")
    warnings.filterwarnings("ignore", message=".*precision.*bf16.*")
    # litdata's datasets are iterable with a length; each rank/worker gets its own share (remedis.data.streaming)
    warnings.filterwarnings("ignore", message=".*IterableDataset.*has `__len__` defined.*")


def setup_runtime(runtime: RuntimeConfig, seed: int) -> None:
    """Seed everything, set threads and quiet Lightning before a stage runs."""
    if runtime.threads:
        torch.set_num_threads(runtime.threads)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    L.seed_everything(seed, workers=True, verbose=False)
    quiet_lightning()


def accelerator(runtime: RuntimeConfig) -> str:
    """Lightning's accelerator for the runtime section (cpu, gpu or auto)."""
    if runtime.accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return runtime.accelerator


def use_bf16(runtime: RuntimeConfig) -> bool:
    """`runtime.precision` resolved: "auto" is bf16 only where the device has it natively (`fast_bf16`)."""
    if runtime.precision == "auto":
        return fast_bf16("cuda" if accelerator(runtime) == "gpu" else "cpu")
    return runtime.precision == "bf16"


class EpochCheckpoint(Checkpoint):
    """Writes the full training state (weights, optimizer, schedule, loop counters, the module's and
    callbacks' histories) after every epoch, atomically: a temp file, fsync, then rename, so a killed
    job finds either the previous epoch's file or this one's, never half of one. A subclass of
    Lightning's `Checkpoint` so it runs after the module's own epoch-end hook.

    `every_n_steps` also writes it every N optimizer steps (mid-epoch resume; exact only with a loader
    that Lightning can checkpoint, e.g. `remedis.data.streaming.ShardLoader`). The module's
    partial-epoch loss buffers travel with it, so a resumed epoch's mean loss equals the uninterrupted one."""

    BUFFERS = ("_losses", "_train_loss")  # SimCLRModule, ClassifierModule: per-step losses of the current epoch

    def __init__(self, path: Path, every_n_steps: int | None = None):
        self.path = Path(path)
        self.every_n_steps = every_n_steps

    def _save(self, trainer: L.Trainer) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")  # one name on every rank: rank 0 writes it
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            atomic_replace(tmp, self.path)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save the resume state after every epoch."""
        self._save(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        # not after an epoch's last batch: its end-of-epoch hooks (histories, validation) must run
        # before the state is saved, and on_train_epoch_end saves it right after them
        """Save the resume state every `every_n_steps` steps (long epochs of streamed shards)."""
        last = batch_idx + 1 >= trainer.num_training_batches
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0 and not last:
            self._save(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """Record the step counter in the resume state."""
        checkpoint["remedis_partial_epoch"] = {k: list(getattr(pl_module, k)) for k in self.BUFFERS
                                               if isinstance(getattr(pl_module, k, None), list)}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """Restore the step counter of a resumed run."""
        for k, v in checkpoint.get("remedis_partial_epoch", {}).items():
            setattr(pl_module, k, list(v))


def fit_resumable(trainer: L.Trainer, module: L.LightningModule, train_loader, val_loader=None,
                  resume_file: Path | None = None) -> None:
    """`trainer.fit`, continuing from `resume_file` when a killed run left one (with `EpochSampler`
    data order and per-image augmentation seeds the result equals an uninterrupted run's). The file
    is removed once the stage has finished; the caller then writes the stage's checkpoint folder."""
    ckpt = None
    if resume_file is not None and Path(resume_file).is_file():
        try:
            # our own training state, written by this stage into the run folder (keyed): bandit B614 justified
            loops = torch.load(resume_file, map_location="cpu", weights_only=False)["loops"]  # nosec B614
            ckpt = str(resume_file)
            log.info("resuming from %s", resume_file)
            # A checkpointable loader (streaming shards) resumes at its saved position. Lightning loads it
            # only into a loader built after reading the checkpoint, and a module whose optimizer schedule
            # asks for `estimated_stepping_batches` has the loader built before: so it is loaded here.
            saved = loops.get("fit_loop", {}).get("state_dict", {}).get("combined_loader", [])
            if saved and callable(getattr(train_loader, "load_state_dict", None)):
                train_loader.load_state_dict(saved[0])
        except Exception as exc:  # unreadable resume state: start the stage again rather than fail
            log.warning("ignoring unreadable resume file %s (%s); starting the stage from scratch", resume_file, exc)
    trainer.fit(module, train_loader, val_loader, ckpt_path=ckpt)
    if resume_file is not None:
        Path(resume_file).unlink(missing_ok=True)


def make_logger(kind: str, log_dir: str | Path):
    """Lightning logger for a stage's metrics. TensorBoard and MLflow are optional installs."""
    from lightning.pytorch import loggers

    log_dir = Path(log_dir)
    if kind == "csv":
        return loggers.CSVLogger(save_dir=str(log_dir), name="", version="")
    try:
        if kind == "tensorboard":
            return loggers.TensorBoardLogger(save_dir=str(log_dir), name="", version="")
        if kind == "mlflow":
            # a local file store beside the stage's logs (no server, nothing leaves the machine)
            return loggers.MLFlowLogger(experiment_name="remedis", run_name=log_dir.name,
                                        tracking_uri=(log_dir.parent / "mlruns").resolve().as_uri())
    except ModuleNotFoundError as exc:
        raise ValueError(f"runtime.logger: {kind!r} needs the {kind!r} package (pip install {kind}): {exc}") from None
    raise ValueError(f"runtime.logger: unknown logger {kind!r}")


def make_trainer(runtime: RuntimeConfig, epochs: int, max_steps_per_epoch: int | None = None,
                 progress: bool = True, callbacks: list | None = None, log_dir: str | Path | None = None,
                 resume_file: str | Path | None = None, val_every: int = 1,
                 checkpoint_every_steps: int | None = None, stage: str | None = None) -> L.Trainer:
    """The Trainer every stage uses; `log_dir` gets Lightning's CSV metrics log (metrics.csv);
    `resume_file` gets the training state after every epoch (see `fit_resumable`), and also every
    `checkpoint_every_steps` optimizer steps when given (streaming stages: mid-epoch resume);
    validation runs every `val_every` epochs. Lightning's bar shows when `progress` and stderr is a
    terminal; otherwise `remedis.progress.ProgressLog` writes a line every 30 s, named `stage`
    (default: from the module's class)."""
    from remedis.progress import ProgressLog, interactive

    callbacks = list(callbacks or [])
    bar = progress and interactive()
    if not bar:  # a file or a cluster log (or --quiet): plain lines, not a bar of carriage returns
        callbacks.append(ProgressLog(stage))
    if resume_file is not None:
        callbacks.append(EpochCheckpoint(Path(resume_file), every_n_steps=checkpoint_every_steps))
    logger = make_logger(runtime.logger, log_dir) if log_dir is not None else False
    world = runtime.devices * runtime.num_nodes
    strategy = "auto"
    if world > 1:
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(process_group_backend="nccl" if accelerator(runtime) == "gpu" else "gloo")
    return L.Trainer(
        max_epochs=epochs,
        check_val_every_n_epoch=val_every,
        strategy=strategy,
        sync_batchnorm=world > 1 and accelerator(runtime) == "gpu",  # torch has no CPU SyncBatchNorm
        limit_train_batches=max_steps_per_epoch if max_steps_per_epoch else 1.0,
        accelerator=accelerator(runtime),
        devices=runtime.devices,
        num_nodes=runtime.num_nodes,
        precision="bf16-mixed" if use_bf16(runtime) else "32-true",
        logger=logger,
        log_every_n_steps=1,  # epochs here are short; every step goes to metrics.csv
        enable_checkpointing=resume_file is not None,  # only the epoch resume file; stage outputs are remedis folders
        enable_model_summary=False,
        enable_progress_bar=bar,
        num_sanity_val_steps=0,
        deterministic=False,
        callbacks=callbacks,
    )
