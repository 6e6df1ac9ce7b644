"""Run configuration: typed dataclasses loaded strictly from YAML.

A config file fully describes a run (data, image size, model, steps per stage, seeds). Unknown or
mistyped keys are an error that names the key, because a silently ignored typo ("epoch: 50") would
make a run quietly differ from what its author believes it is.

Example:
    >>> cfg = RunConfig.from_yaml("configs/quickstart.yaml")
    >>> cfg.pretrain.simclr.temperature
    0.1
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

UNLABELED_USES = ("none", "simclr", "distill", "simclr+distill")  # adapt.unlabeled


class ConfigError(ValueError):
    """A config file or value is invalid; the message names the key."""


@dataclass
class SyntheticDataConfig:
    """The embedded synthetic multi-site dataset (used when no manifest is given)."""

    patients_per_site: int = 150
    site_patients: dict[str, int] = field(default_factory=dict)  # per-site override, e.g. {site-A: 400}
    max_images_per_patient: int = 3
    image_size: int = 96


@dataclass
class DataConfig:
    """The `data` section: the manifest (or synthetic data), the sites, labels, image size, channels and splits."""

    manifest: str | None = None  # a manifest CSV; None generates the synthetic dataset
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    source_site: str = "site-A"  # labeled upstream site (supervised pretraining)
    target_site: str = "site-B"  # the new hospital we adapt to
    positive_label: str | None = None  # binary AUROC positive class; None = last class sorted
    label_map: dict[str, str] = field(default_factory=dict)  # e.g. {normal: not_malignant, benign: not_malignant}
    image_size: int = 64  # network input size (square)
    channels: int | str = "auto"  # 1 grey, 3 colour (RGB kept end to end), auto: 3 when any sampled image is colour
    aspect: str = "pad"  # non-square images: pad (nothing cut or stretched), crop (short side, centre crop) or stretch
    split_fractions: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])
    # per-site override, e.g. {BUS-BRA: [0.8, 0.1, 0.1]}: more upstream labels for the source site
    # while the target site keeps a test split large enough for CIs
    site_split_fractions: dict[str, list[float]] = field(default_factory=dict)
    # a manifest with train and test splits but no val: this share of the train patients becomes val
    val_fraction: float = 0.2
    stream: bool = True  # pretraining streams from shards written once (litdata); false decodes all into memory
    shard_dir: str | None = None  # where shards go (null: <output>/shards); reused when records and preprocessing match


@dataclass
class ModelConfig:
    """The `model` section: the network, its input channels and optional external starting weights."""

    backbone: str = "resnet18"  # any name known to remedis.models.create_backbone
    in_chans: int | None = None  # network input channels; None follows data.channels (3 for RGB weights on grey data)
    weights: str | None = None  # local file with external weights (timm / torch state_dict)


@dataclass
class UpstreamTaskConfig:
    """One labeled task of a multi-task supervised upstream (`pretrain.supervised.tasks`)."""

    name: str = ""  # the task's name (its head; unique)
    manifest: str = ""  # its manifest CSV
    sites: list[str] = field(default_factory=list)  # its labeled sites (empty: all of the manifest's)
    label_map: dict[str, str] = field(default_factory=dict)  # as data.label_map, for this task's labels
    positive_label: str | None = None  # binary AUROC positive class; None = last class sorted
    multi_label: bool = False  # rows hold several labels ("a|b"): binary cross-entropy per class
    weight: float = 1.0  # the task's share of every batch, relative to the other tasks


@dataclass
class SupervisedConfig:
    """The `pretrain.supervised` section: the supervised upstream (schedule, optimiser, augmentation, multi-task corpora)."""

    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    augment_strength: float = 1.0  # FineTuneAugment magnitude (1 light; 2-3 adds rotation, blur, noise)
    max_steps_per_epoch: int | None = None
    # Multi-task upstream (`remedis pretrain supervised --config`): one backbone, a head per task, batches
    # mixing the tasks by weight. Empty: the single task of data.manifest's source site.
    tasks: list[UpstreamTaskConfig] = field(default_factory=list)


@dataclass
class SimCLRConfig:
    """The `pretrain.simclr` section: contrastive pretraining (temperature, batch, MICLe, augmentation, optimiser)."""

    epochs: int = 5
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 1e-4
    temperature: float = 0.1
    projection_dim: int = 128
    min_crop_scale: float = 0.5  # random resized crop keeps 50-100% of the side
    micle: bool = True  # positives from two different images of one patient when the patient has several
    micle_group_size: int = 4  # streaming: a shard sample holds up to this many images of one patient (one pair per epoch)
    projection_layers: int = 2  # MLP projection head depth (SimCLR v1: 2, SimCLR v2: 3)
    optimizer: str = "adamw"  # "adamw" or "lars" (SimCLR's; lr is then the LARS base lr, e.g. 0.3 * batch / 256)
    hist_eq_prob: float = 0.0  # probability of histogram equalisation per view
    elastic_prob: float = 0.0  # probability of an elastic deformation per view
    max_steps_per_epoch: int | None = None


@dataclass
class PretrainConfig:
    """The `pretrain` section: the supervised upstream and SimCLR stages."""

    supervised: SupervisedConfig = field(default_factory=SupervisedConfig)
    simclr: SimCLRConfig = field(default_factory=SimCLRConfig)


@dataclass
class AdaptConfig:
    """The `adapt` section: the fine-tuning recipe at each label budget (sweep, schedule, soup, WiSE-FT, operating point, distillation)."""

    fractions: list[float] = field(default_factory=lambda: [0.1, 1.0])
    backbones: list[str] = field(default_factory=lambda: ["remedis", "supervised"])
    epochs: int = 10
    # Small budgets get more epochs so that every budget trains for at least this many optimizer steps
    # (as BiT-HyperRule sizes its schedule by dataset size): 15 epochs of 48 labels were only 30 steps,
    # and the longer schedule raised 21 of 24 small-budget results on BUSI and NIH (README).
    # 0 = `epochs` for every budget.
    min_steps: int = 200
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 1e-4
    # "full", "partial" (train blocks after `fine_tune_after_block`), "linear" (head only) or "lp-ft"
    # (full fine-tuning from a linear-probe head; the probe is kept as a sweep member)
    mode: str = "full"
    fine_tune_after_block: int = -1  # partial: -1 trains all; k trains blocks after block k (0 = stem)
    backbone_lr_scale: float = 1.0  # discriminative learning rate: backbone lr = lr * scale
    label_smoothing: float = 0.0
    patience: int | None = None  # early stopping: validations without AUROC gain (one per epoch unless min_steps stretches)
    augment_strength: float = 1.0  # FineTuneAugment magnitude (1 light; 2-3 adds rotation, blur, noise)
    # The sweep is the grid [lr, *sweep_lrs] x [weight_decay, *sweep_weight_decays] x
    # [augment_strength, *sweep_augment_strengths]; every member is kept for the soup.
    sweep_lrs: list[float] = field(default_factory=list)
    sweep_weight_decays: list[float] = field(default_factory=list)
    sweep_augment_strengths: list[float] = field(default_factory=list)
    soup: str = "greedy"  # how sweep members combine: "best", "uniform" or "greedy" (by validation AUROC)
    wise_ft: bool = True  # interpolate with the initial backbone, alpha chosen on validation
    wise_alphas: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    operating_sensitivity: float = 0.9  # the stored operating point: threshold for this validation sensitivity
    max_steps_per_epoch: int | None = None
    # Distillation (SimCLRv2): each REMEDIS-adapted model teaches a small student on all of the target
    # site's train images (labels unused), reported next to its teacher as "<teacher>-student-<arch>".
    distill_student: str | None = None  # e.g. resnet18; None = off (with unlabeled: distill, the model's own architecture)
    # What the site's unlabeled train images (rows without a label) do: none; simclr (continue SimCLR +
    # MICLe on the site's train images, labeled or not, from the backbone before fine-tuning: the REMEDIS
    # variant); distill (each adapted model teaches a student on them: SimCLRv2); simclr+distill (both)
    unlabeled: str = "none"  # none, simclr, distill or simclr+distill: what the site's unlabeled train images do
    distill_epochs: int = 20
    distill_temperature: float = 1.0
    # Which train images a budget labels: stratified (a random, label-stratified draw, nested across budgets:
    # what a benchmark with every label known does) or a `remedis select` strategy (typiclust, probcover,
    # kcenter, random) choosing on the REMEDIS backbone's embeddings without seeing labels, as a site would
    selection: str = "stratified"


@dataclass
class EvaluateConfig:
    """The `evaluate` section: bootstrap resamples, subgroups, the OOD detector's method and acceptance rate, far-OOD sets."""

    bootstrap: int = 200  # bootstrap resamples for 95% confidence intervals (patient level)
    # The OOD detector stored with every adapted model. A fixed choice, never picked on OOD test data
    # (that would leak); Mahalanobis on embeddings also catches far-OOD inputs that get confident logits.
    ood_method: str = "mahalanobis"  # a registered OOD score: msp, max_logit, energy, mahalanobis or knn
    ood_accept_rate: float = 0.95  # share of in-distribution validation images the threshold accepts
    subgroups: list[str] = field(default_factory=list)  # manifest columns reported per value, e.g. [device]
    far_ood_manifests: list[str] = field(default_factory=list)  # other-modality manifests (far-OOD sets)
    noise_images: int = 64  # synthetic noise images (far-OOD)
    cka_images: int = 256  # test images used for CKA

    def __post_init__(self) -> None:  # checked at load time, not after hours of training
        from remedis.ood_scores import score_names  # the registry; imported here, config loads first

        methods = score_names()
        if self.ood_method not in methods:
            raise ConfigError(f"evaluate.ood_method: expected one of {', '.join(methods)}, got {self.ood_method!r}")
        if not 0.0 < self.ood_accept_rate < 1.0:
            raise ConfigError(f"evaluate.ood_accept_rate: must be in (0, 1), got {self.ood_accept_rate}")


@dataclass
class ServeConfig:
    """The `serve` section: which adapted model `remedis run` exports, under what name, and whether it builds the bento."""

    model: str = "remedis@1.0"  # which adapted model to export: "<backbone>@<fraction>"
    name: str = "remedis-quickstart"  # BentoML model name
    build: bool = True  # run `bentoml build` after export


@dataclass
class RuntimeConfig:
    # "auto": bf16 autocast where the hardware has bf16 (GPUs, AVX-512 BF16 / AMX CPUs), else fp32
    # (emulated bf16 is 10-30x slower); or "bf16" / "fp32" to force one.
    """The `runtime` section: devices, nodes, precision, loader workers, logger, progress."""

    precision: str = "auto"
    accelerator: str = "auto"  # "cpu", "gpu" or "auto"
    num_workers: int = 0  # DataLoader workers; data is cached in memory so 0 is usually best
    threads: int | None = None  # torch intra-op threads; None leaves torch's default
    # Data-parallel training (Lightning DDP; gloo on CPU, NCCL on GPU). SimCLR gathers embeddings across
    # processes, so negatives come from the global batch (batch_size x devices x num_nodes), and on GPUs
    # BatchNorm is synchronised: the loss equals a one-process run on the same global batch (on CPU,
    # torch has no SyncBatchNorm: exact with GroupNorm backbones and a 1-layer projection head).
    devices: int = 1
    num_nodes: int = 1
    logger: str = "csv"  # training metrics: "csv" (logs/<stage>/metrics.csv), "tensorboard" or "mlflow" (file store in logs/)
    # Streaming (shard) stages also write their resume file every N optimizer steps, so a job killed mid-epoch
    # resumes there with the same final weights; None: at epoch ends only (in-memory stages always).
    checkpoint_every_steps: int | None = None


@dataclass
class RunConfig:
    """A whole run's config: every section, the seed; loaded strictly from YAML with `--set` overrides."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> "RunConfig":
        """Load a config file (None: the defaults); `overrides` are `dotted.key=value` strings (value
        parsed as YAML), e.g. `data.image_size=128`, applied before validation so they are checked like the file."""
        raw: dict = {}
        if path is not None:
            path = Path(path)
            try:
                raw = yaml.safe_load(path.read_text()) or {}
            except FileNotFoundError:
                raise ConfigError(f"{path}: config file not found") from None
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        for item in overrides:
            apply_override(raw, item)
        try:
            cfg = from_dict(cls, raw)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}" if path is not None else str(exc)) from None
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (what a run folder's config.yaml and every artifact's provenance record)."""
        return dataclasses.asdict(self)

    def with_preprocessing(self, pre) -> "RunConfig":
        """This config with `data.channels` and `model.in_chans` taken from the images' `Preprocessing`
        (the data decides what the network sees; `remedis.stages.resolve_channels` made it)."""
        return dataclasses.replace(self, data=dataclasses.replace(self.data, channels=int(pre.channels)),
                                   model=dataclasses.replace(self.model, in_chans=int(pre.in_chans)))

    def validate(self) -> None:  # noqa: C901 - one independent check per key; long: one check per key, in section order
        """Check values that types alone cannot (choices, ranges, consistent sections); ConfigError names the key."""
        if self.runtime.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"runtime.precision: expected 'auto', 'bf16' or 'fp32', got {self.runtime.precision!r}")
        if self.data.channels not in ("auto", 1, 3):
            raise ConfigError(f"data.channels: must be auto, 1 or 3, got {self.data.channels!r}")
        if self.data.aspect not in ("pad", "crop", "stretch"):
            raise ConfigError(f"data.aspect: must be pad, crop or stretch, got {self.data.aspect!r}")
        if self.model.in_chans not in (None, 1, 3):
            raise ConfigError(f"model.in_chans: must be 1, 3 or null (follow data.channels), got {self.model.in_chans!r}")
        if self.data.channels == 3 and self.model.in_chans == 1:
            raise ConfigError("model.in_chans: 1 cannot take colour images (data.channels 3); use 3 or null")
        if self.pretrain.simclr.micle_group_size < 2:
            raise ConfigError(f"pretrain.simclr.micle_group_size: must be >= 2, got {self.pretrain.simclr.micle_group_size}")
        if self.data.image_size < 16:
            raise ConfigError(f"data.image_size: must be >= 16, got {self.data.image_size}")
        for where, fr in [("data.split_fractions", self.data.split_fractions),
                          *((f"data.site_split_fractions.{k}", v) for k, v in self.data.site_split_fractions.items())]:
            if len(fr) != 3 or abs(sum(fr) - 1.0) > 1e-6 or min(fr) < 0:
                raise ConfigError(f"{where}: need three non-negative fractions (train, val, test) summing to 1, got {fr}")
        if not 0.0 < self.data.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction: must be in (0, 1), got {self.data.val_fraction}")
        if self.runtime.logger not in ("csv", "tensorboard", "mlflow"):
            raise ConfigError(f"runtime.logger: expected csv, tensorboard or mlflow, got {self.runtime.logger!r}")
        sim = self.pretrain.simclr
        if sim.optimizer not in ("adamw", "lars"):
            raise ConfigError(f"pretrain.simclr.optimizer: expected 'adamw' or 'lars', got {sim.optimizer!r}")
        if sim.projection_layers < 1:
            raise ConfigError(f"pretrain.simclr.projection_layers: must be >= 1, got {sim.projection_layers}")
        for key in ("hist_eq_prob", "elastic_prob"):
            if not 0.0 <= getattr(sim, key) <= 1.0:
                raise ConfigError(f"pretrain.simclr.{key}: must be in [0, 1], got {getattr(sim, key)}")
        for f in self.adapt.fractions:
            if not 0.0 < f <= 1.0:
                raise ConfigError(f"adapt.fractions: {f} is not in (0, 1]")
        if self.adapt.mode not in ("full", "partial", "linear", "lp-ft"):
            raise ConfigError(f"adapt.mode: expected full, partial, linear or lp-ft, got {self.adapt.mode!r}")
        if self.adapt.unlabeled not in UNLABELED_USES:
            raise ConfigError(f"adapt.unlabeled: expected one of {', '.join(UNLABELED_USES)}, got {self.adapt.unlabeled!r}")
        if self.adapt.soup not in ("best", "uniform", "greedy"):
            raise ConfigError(f"adapt.soup: expected best, uniform or greedy, got {self.adapt.soup!r}")
        for a in self.adapt.wise_alphas:
            if not 0.0 <= a <= 1.0:
                raise ConfigError(f"adapt.wise_alphas: {a} is not in [0, 1]")
        ac = self.adapt
        if ac.min_steps < 0:
            raise ConfigError(f"adapt.min_steps: must be >= 0, got {ac.min_steps}")
        for key, values, zero_ok in (("lr", [ac.lr, *ac.sweep_lrs], False),
                                     ("weight_decay", [ac.weight_decay, *ac.sweep_weight_decays], True),
                                     ("augment_strength", [ac.augment_strength, *ac.sweep_augment_strengths], True)):
            for v in values:
                if v < 0 or (v == 0 and not zero_ok):
                    raise ConfigError(f"adapt.{key} / adapt.sweep_{key}s: {v} must be {'>= 0' if zero_ok else '> 0'}")
            if len(set(values)) != len(values):
                raise ConfigError(f"adapt.sweep_{key}s: {values[1:]} repeats a value (adapt.{key} = {values[0]} is already a member)")
        names = [t.name for t in self.pretrain.supervised.tasks]
        for i, t in enumerate(self.pretrain.supervised.tasks):
            where = f"pretrain.supervised.tasks[{i}]"
            if not t.name or not t.manifest:
                raise ConfigError(f"{where}: needs a name and a manifest")
            if names.count(t.name) > 1:
                raise ConfigError(f"{where}.name: {t.name!r} names two tasks")
            if not t.weight > 0:
                raise ConfigError(f"{where}.weight: must be > 0, got {t.weight}")
        if self.pretrain.supervised.augment_strength < 0:
            raise ConfigError(f"pretrain.supervised.augment_strength: must be >= 0, got {self.pretrain.supervised.augment_strength}")
        for b in self.adapt.backbones:
            if b not in ("remedis", "supervised", "random"):
                raise ConfigError(f"adapt.backbones: unknown backbone {b!r} (remedis, supervised, random)")
        backbone, _, frac = self.serve.model.partition("@")
        if backbone not in self.adapt.backbones or not frac or float(frac) not in self.adapt.fractions:
            raise ConfigError(
                f"serve.model: {self.serve.model!r} is not one of the adapted models "
                f"(<backbone>@<fraction> with backbone in {self.adapt.backbones} and fraction in {self.adapt.fractions})"
            )


def apply_override(raw: dict, item: str) -> None:
    """Set `a.b.c=value` in a raw config dict (value parsed as YAML: numbers, lists, null)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected key.path=value, e.g. data.image_size=128")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from None
    parts = key.strip().split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type, raw: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types by name."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        where = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known keys: {', '.join(names)})"
            raise ConfigError(f"unknown config key '{where}'{hint}")
        kwargs[key] = _coerce(hints[key], value, where)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:  # noqa: C901 - one branch per kind of type annotation
    """`value` as type `tp` (dataclass, list, dict, union, literal, scalar); ConfigError names `where`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=f"{where}.")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_t, val_t = typing.get_args(tp)
        return {_coerce(key_t, k, f"{where}"): _coerce(val_t, v, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value
