"""Typed configuration for every part of medssl, YAML loading and ``a.b=c`` overrides.

Every config is a pydantic model that forbids unknown keys, so a typo fails loudly with the key
and the file named. Method-specific hyperparameters live in ``MethodConfig.options`` and are
validated by the method's own ``Params`` model when the method is built.
"""

from __future__ import annotations

import hashlib
import json
import re
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticUndefined

from medssl.budget import Budget
from medssl.errors import ConfigError, closest_name, look_up_option
from medssl.limits import Limits, check

Modality = Literal["ct", "mri"]
Triple = tuple[float, float, float]


def _multiple_of_32(v: int) -> int:
    if v % 32:
        raise ValueError("must be a multiple of 32 (the encoder downsamples 32x)")
    return v


CropSize = Annotated[int, Field(ge=32), AfterValidator(_multiple_of_32)]
"""A cubic crop's edge in voxels: the encoder halves it five times."""

# Names that become path components (run ids, splits files, out folders): no separators, no '..',
# no NUL, short enough for any file system.
SLUG_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _slug(v: str) -> str:
    if not SLUG_PATTERN.fullmatch(v) or ".." in v:
        raise ValueError(
            f"{v[:80]!r} is not a plain name (1-64 letters, digits, '_', '.', '-'; no path separators or '..')"
        )
    return v


Slug = Annotated[str, AfterValidator(_slug)]
"""A name used as a file or folder name: validated so it can never leave its folder."""

Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]  # numpy and torch generators take 32-bit seeds everywhere


def _positive_spacing(v: tuple[float, float, float]) -> tuple[float, float, float]:
    if not all(s > 0 for s in v):
        raise ValueError(f"spacing {tuple(v)} must be three positive millimetre values")
    return v


Spacing = Annotated[Triple, AfterValidator(_positive_spacing)]


def added_field(default: Any = PydanticUndefined, **kwargs: Any) -> Any:
    """A field added after runs were recorded: at its default it is left out of config dumps, hashes and
    run ids (``config_dump``), so adding it changes no existing run id and no stored config.yaml differs."""
    return Field(default, json_schema_extra={"omit_at_default": True}, **kwargs)


def _drop_added_defaults(model: BaseModel, data: dict[str, Any]) -> None:
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        extra = info.json_schema_extra
        at_default = value == info.get_default(call_default_factory=True)
        if isinstance(extra, dict) and extra.get("omit_at_default") and at_default:
            data.pop(name, None)
            continue
        if isinstance(value, BaseModel) and isinstance(data.get(name), dict):
            _drop_added_defaults(value, data[name])
        elif isinstance(value, list | tuple) and isinstance(data.get(name), list):
            for item, dumped in zip(value, data[name], strict=False):
                if isinstance(item, BaseModel) and isinstance(dumped, dict):
                    _drop_added_defaults(item, dumped)


def config_dump(model: BaseModel) -> dict[str, Any]:
    """``model.model_dump(mode="json")`` without the fields made by :func:`added_field` that hold their
    default: what config.yaml stores, what a config hash and a benchmark's identity cover."""
    data = model.model_dump(mode="json")
    _drop_added_defaults(model, data)
    return data


class StrictModel(BaseModel):
    # allow_inf_nan=False: lr=.inf or spacing=.nan are refused at the door, not met mid-training
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)


ModelT = TypeVar("ModelT", bound=BaseModel)


# --------------------------------------------------------------------------- model

ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(feature_size=12, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "base": dict(feature_size=48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "smit": dict(feature_size=48, depths=(2, 2, 8, 2), num_heads=(4, 4, 8, 16), window_size=4),
}


class EncoderConfig(StrictModel):
    """The Swin encoder (MONAI ``SwinTransformer`` layout). Preset values fill unset fields."""

    preset: Literal["tiny", "base", "smit"] = "tiny"
    in_channels: int = Field(1, ge=1)
    feature_size: int | None = None
    depths: tuple[int, int, int, int] | None = None
    num_heads: tuple[int, int, int, int] | None = None
    window_size: int | None = None
    patch_size: int = 2
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)
    use_checkpoint: bool = False
    # "fast": medssl's forward over MONAI's modules (same weights, outputs equal to float rounding);
    # "monai": MONAI's own forward. Never changes the state dict.
    implementation: Literal["monai", "fast"] = "fast"
    # SwinUNETR v2 (MONAI ``SwinUNETR(use_v2=True)``): a residual conv block before each Swin stage
    # (``layers{1..4}c``), the encoder VoCo and Large-Scale-Medical publish. Part of the state dict.
    use_v2: bool = added_field(False)

    @model_validator(mode="after")
    def _fill_from_preset(self) -> EncoderConfig:
        preset = ENCODER_PRESETS[self.preset]
        for key, value in preset.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if self.feature_size is not None and self.feature_size % 12 != 0:
            raise ValueError("feature_size must be a multiple of 12 (MONAI SwinUNETR requirement)")
        return self


# --------------------------------------------------------------------------- data


AXIS_PAIRS = ("LR", "PA", "IS")


def _axcodes(v: str) -> str:
    """Three orientation letters, one from each of L/R, P/A, I/S (``RAS``, ``LPS``, ``SAR``...): the
    only values MONAI's ``Orientationd(axcodes=...)`` takes, and never an expression."""
    pairs = [next((p for p in AXIS_PAIRS if c in p), None) for c in v]
    if len(v) != 3 or None in pairs or len(set(pairs)) != 3:
        raise ValueError(f"{v[:40]!r} is not an orientation: three letters, one of L/R, one of P/A, one of I/S")
    return v


Axcodes = Annotated[str, AfterValidator(_axcodes)]


class PreprocessConfig(StrictModel):
    """How raw volumes become training arrays; part of every cache key and checkpoint."""

    spacing: Spacing = (1.5, 1.5, 1.5)
    orientation: Axcodes = "RAS"
    ct_window: tuple[float, float] = (-175.0, 250.0)
    mri_percentiles: tuple[float, float] = (0.5, 99.5)

    def key(self) -> str:
        return config_hash(self)


RANDOM_INIT = "none"  # the method name of a randomly initialised encoder (no pretraining run)
SUPERVISED = "supervised"  # the positive control's row and family: a supervised encoder (medssl.train.supervised)
IDENTITY_TRANSFORMER = "identity-transformer"  # the row of the transformer->identity control (family "control")


class MethodConfig(StrictModel):
    """An SSL method by registry name, with method-specific options (validated by the method)."""

    name: Slug = "simmim"
    options: dict[str, Any] = Field(default_factory=dict)


class ScheduleConfig(StrictModel):
    """Optimiser and loop settings shared by pretraining and fine-tuning."""

    steps: int = Field(200, ge=0)
    batch_size: int = Field(2, ge=1)
    lr: float = Field(1e-4, gt=0)
    min_lr: float = Field(1e-6, ge=0)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(1e-5, ge=0)
    weight_decay_end: float | None = None
    grad_clip: float | None = 1.0
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW (beta1, beta2)
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    checkpoint_every: int = Field(50, ge=1)
    log_every: int = Field(10, ge=1)
    num_workers: int = Field(0, ge=0)
    compile: bool = False
    seed: Seed = 0


LR_SCALING_RULE = "linear"
"""The one rule by which every packaged published recipe (``configs/methods/*.yaml``) moves its learning rate
to a run's global batch: linear, ``lr = base_lr * batch / lr_batch``, from the method's published point, the
rule each reference's own code applies (``main_dino.py``, ``main_ibot.py``, ``main_moco.py``: ``lr *
batch / 256``; ``main_simmim.py``: ``/ 512``; SMIT's ``train_self_supervised.py``: ``0.0001 * batch_size``).
With it the nine resolved learning rates lie within ``LR_SPREAD_LIMIT`` of each other at any batch
(``tests/bench/test_recipes.py``); the one point that is not the method's own is SMIT's (``lr_from``)."""

LR_SPREAD_LIMIT = 10.0
"""Largest ratio allowed between the resolved pretraining learning rates of the packaged published recipes."""


class OptimiserRecipe(StrictModel):
    """A method's published optimiser recipe (``configs/methods/<name>.yaml``, ``published_recipe``).

    The published batch sizes (256-4096 images) do not fit 3D crops, so a run keeps its own batch and
    derives the learning rate by a scaling rule: ``lr = base_lr * batch / lr_batch`` (linear, every packaged
    recipe: ``LR_SCALING_RULE``), ``base_lr * sqrt(batch / lr_batch)`` (sqrt) or ``base_lr`` (none); ``min_lr``
    scales alike unless ``scale_min_lr`` is false. ``lr_from`` names the recipe the learning-rate point is
    taken from when it is not the method's own (a declared departure, cited in ``sources``). Warm-up is the
    published fraction of the run (recipes count epochs). ``sources`` cites the reference per field.
    """

    optimizer: Literal["adamw"] = "adamw"
    published_optimizer: str = "AdamW"  # what the reference used (LARS, SGD): a departure when not AdamW
    base_lr: float = Field(gt=0)
    lr_batch: int = Field(256, ge=1)
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    base_min_lr: float = Field(0.0, ge=0)
    scale_min_lr: bool = True  # False: min_lr is used as published (DINO, iBOT), not batch-scaled
    weight_decay: float = Field(ge=0)
    weight_decay_end: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_fraction: float = Field(ge=0, lt=1)
    grad_clip: float | None = None
    published_batch_size: int = Field(ge=1)
    lr_from: str | None = None  # the recipe whose learning-rate point this one uses (None: its own)
    sources: dict[str, str] = Field(default_factory=dict)

    def scaled(self, value: float, batch_size: int) -> float:
        ratio = batch_size / self.lr_batch
        return value * {"linear": ratio, "sqrt": ratio**0.5, "none": 1.0}[self.lr_scaling]

    def lr_rule(self, batch_size: int | None = None) -> str:
        """The learning rate as a formula, ``5e-04 x 8 / 256 (linear)``; ``batch`` when no batch is given."""
        batch = "batch" if batch_size is None else str(batch_size)
        factor = {"linear": f" x {batch} / {self.lr_batch}", "sqrt": f" x ({batch} / {self.lr_batch})^0.5", "none": ""}
        origin = f", {self.lr_from}'s point" if self.lr_from else ""
        return f"{self.base_lr:.3g}{factor[self.lr_scaling]} ({self.lr_scaling}{origin})"

    def schedule_fields(self, batch_size: int, steps: int) -> dict[str, Any]:
        """The ScheduleConfig fields this recipe sets for a run of ``steps`` steps at ``batch_size``."""
        return {
            "lr": self.scaled(self.base_lr, batch_size),
            "min_lr": self.scaled(self.base_min_lr, batch_size) if self.scale_min_lr else self.base_min_lr,
            "weight_decay": self.weight_decay,
            "weight_decay_end": self.weight_decay_end,
            "betas": self.betas,
            "grad_clip": self.grad_clip,
            "warmup_steps": int(round(self.warmup_fraction * steps)),
        }


METHOD_CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "methods"


def published_recipe(method: str) -> OptimiserRecipe | None:
    """The ``published_recipe`` block of ``configs/methods/<method>.yaml`` (None: the method has none)."""
    path = METHOD_CONFIG_DIR / f"{method}.yaml"
    if not path.is_file():
        return None
    block = load_yaml(path).get("published_recipe")
    return None if block is None else validate_config(OptimiserRecipe, block, path)


class ProbeConfig(StrictModel):
    """The frozen-encoder probe's design (``medssl.evaluate.probe``): which encoder outputs it reads
    (0 the patch embedding, 1-4 the Swin stages, each upsampled to voxels), its head (``hidden`` 0: a
    linear map; > 0: one hidden layer of that width), the class-balanced voxel sample it trains on and
    its optimiser. The defaults (a linear head on all five outputs) are the design, not a selection: the
    README's "Frozen-encoder probe" gives what they measure on the controls."""

    stages: tuple[int, ...] = Field((0, 1, 2, 3, 4), min_length=1)
    hidden: int = Field(0, ge=0)
    points_per_class: int = Field(1000, ge=1)  # voxels per class and training case
    steps: int = Field(200, ge=1)
    lr: float = Field(1e-2, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_points: int = Field(8192, ge=1)
    overlap: float = Field(0.25, ge=0.0, lt=1.0)  # sliding windows of the crop size for the features
    logit_adjust: bool = True  # shift logits by log(true class frequency / sampled frequency)

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(s not in range(5) for s in v) or len(set(v)) != len(v):
            raise ValueError("stages are distinct encoder outputs 0-4 (0: patch embedding, 1-4: Swin stages)")
        return tuple(sorted(v))


class OnlineProbeConfig(ProbeConfig):
    """The probe during pretraining: every ``every`` steps the current encoder is probed on a small
    held-out labelled set (the first ``n_train`` cases of ``task`` train the head, the next ``n_test``
    score it), logged as ``probe/dice`` (metrics.jsonl and TensorBoard). ``every`` None: off. A run with
    ``every`` and no ``task`` is refused when it starts; a benchmark fills ``task`` with its control phantoms."""

    every: int | None = Field(None, ge=1)
    task: Path | None = None
    n_train: int = Field(2, ge=1)
    n_test: int = Field(2, ge=1)
    cache_dir: Path | None = None  # preprocessed probe cases; default <run>/cache


class PretrainConfig(StrictModel):
    method: MethodConfig = Field(default_factory=MethodConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    corpus: Path | None = None
    crop_size: CropSize = 64
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    schedule: ScheduleConfig = Field(default_factory=lambda: ScheduleConfig(lr=1e-4, weight_decay=0.05))
    # "shared": the schedule as given (one for every method: a controlled comparison); "published": the
    # optimiser fields of the schedule come from ``published_recipe`` (the method's own, scaled to the batch)
    recipe: Literal["published", "shared"] = "shared"
    published_recipe: OptimiserRecipe | None = None
    probe: OnlineProbeConfig = added_field(default_factory=OnlineProbeConfig)  # the online frozen-encoder probe
    # The factor a benchmark applied to its shared learning rate (and min_lr) for this method
    # (``methods[].lr_scale``): already in ``schedule``, recorded so the operating point says where the lr came from.
    shared_lr_scale: float = added_field(1.0, gt=0, le=1)

    @model_validator(mode="after")
    def _apply_recipe(self) -> PretrainConfig:
        if self.recipe == "published" and self.shared_lr_scale != 1.0:
            raise ValueError("shared_lr_scale scales the shared schedule; recipe 'published' sets its own lr")
        if self.recipe == "shared":
            if self.published_recipe is not None:  # unused: kept out of the config and its hash
                self.published_recipe = None
            return self
        if self.published_recipe is None:  # the method's own, from configs/methods/<name>.yaml
            recipe = published_recipe(self.method.name)
            if recipe is None:
                raise ValueError(
                    f"recipe 'published': method '{self.method.name}' has no published_recipe "
                    f"(configs/methods/{self.method.name}.yaml); use recipe 'shared'"
                )
            self.published_recipe = recipe
        # The optimiser fields of the schedule are the recipe's (scaled to this run's batch), whatever the
        # schedule said: what ran is what the config records.
        # A copy, set without re-running this validator: the given schedule may be shared with other configs.
        fields = self.published_recipe.schedule_fields(self.schedule.batch_size, self.schedule.steps)
        self.__dict__["schedule"] = self.schedule.model_copy(update=fields)
        return self

    limits: Limits = Field(default_factory=Limits)  # resource limits; not part of the config hash


class AugmentConfig(StrictModel):
    """Fine-tuning augmentation; defaults follow MONAI research-contributions' SwinUNETR recipe."""

    flip_prob: float = Field(0.1, ge=0.0, le=1.0)  # per axis
    rot90_prob: float = Field(0.1, ge=0.0, le=1.0)  # k*90 degrees in a random plane
    intensity_prob: float = Field(0.5, ge=0.0, le=1.0)  # scale and shift, each
    intensity_scale: float = Field(0.1, ge=0.0)  # x (1 + u), u ~ U(-s, s)
    intensity_shift: float = Field(0.1, ge=0.0)  # + u, u ~ U(-s, s) on [0, 1] data


LESION_WORDS = ("lesion", "tumor", "tumour", "metasta", "nodule", "cancer", "carcinoma", "neoplasm", "cyst", "mass")


class LesionMetricsConfig(StrictModel):
    """Lesion-wise detection metrics (medssl.evaluate.lesions) for the structures of a lesion or tumour task.

    ``labels``: the structure names scored lesion-wise; ``"auto"`` takes every label of the task's
    dataset.json whose name contains one of ``LESION_WORDS`` (``tumour``, ``lesion``, ``cyst``...); an empty
    list turns them off. A true lesion counts as detected when a predicted lesion overlaps it by at least
    ``threshold`` (``overlap``: IoU or Dice), each matched once; nnDetection evaluates 3D detection from IoU 0.1
    (``nndet/evaluator/det.py``, ``DetectionEvaluator.create``), the default here."""

    labels: Literal["auto"] | list[Slug] = "auto"
    overlap: Literal["iou", "dice"] = "iou"
    threshold: float = Field(0.1, gt=0.0, le=1.0)
    # lesions are connected components: 1 = faces (6-connected), 2 = +edges (18), 3 = +corners (26)
    connectivity: Literal[1, 2, 3] = 3

    def lesion_structures(self, structures: dict[int, str]) -> dict[int, str]:
        """The structures (value -> name, background excluded) to score lesion-wise."""
        if self.labels == "auto":
            return {v: n for v, n in structures.items() if any(w in n.lower() for w in LESION_WORDS)}
        return {v: n for v, n in structures.items() if n in self.labels}


class FinetuneConfig(StrictModel):
    task: Path | None = None
    encoder_checkpoint: Path | None = None  # None = random init (method RANDOM_INIT)
    cache_dir: Path | None = None  # preprocessed volumes; default <run>/cache (shared across a benchmark)
    splits_path: Path | None = None  # default <run>/splits.json (shared per task across a benchmark)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    budget: Budget = Budget.all()  # training cases: a positive number or "all"
    seed: Seed = 0
    crop_size: CropSize = 64
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    val_every: int = Field(25, ge=1)
    n_test: int = Field(4, ge=1)
    n_val: int = Field(2, ge=1)
    sw_batch_size: int = Field(2, ge=1)
    sw_overlap: float = Field(0.5, ge=0.0, lt=1.0)
    nsd_tolerance_mm: float = Field(2.0, gt=0)
    norm: Literal["auto", "instance", "group", "batch"] = "auto"
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    # docs/design.md §7: Dice + cross-entropy, crops centred on foreground/background 1:1 (MONAI's
    # RandCropByPosNegLabeld). "dice" and "class_balanced" (a foreground class drawn uniformly, as
    # RandCropByLabelClassesd with equal ratios) learn small structures in far fewer steps.
    loss: Literal["dice_ce", "dice"] = "dice_ce"
    crop_sampling: Literal["pos_neg", "class_balanced"] = "pos_neg"
    # Options for fine-tuning pretrained transformers (docs/design.md §7), off by default, the same for every
    # encoder of a benchmark. The encoder (``swinViT.*``) learns at ``encoder_lr_scale`` x the scheduled lr;
    # ``layer_decay`` < 1 scales it further per Swin block as SimMIM's fine-tuning does
    # (microsoft/SimMIM ``optimizer.py``: ``get_swin_layer`` / ``build_finetune_optimizer``: block b of
    # L gets decay**(L + 1 - b), the patch embedding decay**(L + 1), the decoder 1).
    encoder_lr_scale: float = Field(1.0, gt=0, le=10.0)
    layer_decay: float = Field(1.0, gt=0, le=1.0)
    # Decoder first: the encoder's weights are held (no gradient, no optimiser update) for this many steps.
    freeze_encoder_steps: int = Field(0, ge=0)
    # Stop when validation Dice has not improved by ``early_stop_min_delta`` for this many validations
    # (None: never); the run records where it stopped, and its curve ends there.
    early_stop_patience: int | None = Field(None, ge=1)
    early_stop_min_delta: float = Field(0.0, ge=0.0)
    # "identity": the transformer->identity control (Wald et al. 2025, "Primus"): every Swin block is
    # replaced by identity; the patch embedding, the patch mergings and the SwinUNETR decoder are kept, so
    # the run measures the Dice the segmenter reaches without the transformer. Random init only.
    transformer: Literal["swin", "identity"] = added_field("swin")
    # An encoder and a task with different input channels: "match" refuses at the start; "repeat" and
    # "average" adapt the pretrained patch embedding as timm's ``adapt_input_conv`` (medssl.models.adapt).
    input_channels: Literal["match", "repeat", "average"] = added_field("match")
    lesion_metrics: LesionMetricsConfig = added_field(default_factory=LesionMetricsConfig)
    limits: Limits = Field(default_factory=Limits)  # resource limits; not part of the config hash

    @model_validator(mode="after")
    def _identity_is_random_init(self) -> FinetuneConfig:
        if self.transformer == "identity" and self.encoder_checkpoint is not None:
            raise ValueError("transformer 'identity' has no Swin blocks to load: it takes no encoder_checkpoint")
        return self


CKAComparison = Literal["pretrained_vs_finetuned", "fewshot_vs_manyshot", "custom"]


class CKARunConfig(StrictModel):
    """Everything that determines a CKA run's result (its hash is the run's ``config_hash``):
    two models (encoder checkpoints or fine-tuned segmenters) compared stage by stage on fixed crops
    of ``task`` (``medssl.analysis.cka_run.run_cka``)."""

    model_a: Path
    model_b: Path
    task: Path
    cache_dir: Path | None = None  # preprocessed volumes; default <run>/cache (a benchmark's <out>/cache)
    n_crops: int = Field(16, ge=1)
    crop_size: CropSize = 32
    batch_size: int = Field(4, ge=1)
    max_tokens: int = Field(64, ge=1)
    seed: Seed = 0
    comparison: CKAComparison = "custom"
    method: str | None = None
    cases: list[str] | None = None
    limits: Limits = Field(default_factory=Limits)  # resource limits; not part of the config hash


class ProbeRunConfig(StrictModel):
    """A probe run (``medssl probe``, run kind ``probe``): the frozen encoder of ``encoder_checkpoint``
    (None: random init of ``encoder`` at ``seed``) probed on ``task`` with ``budget`` training cases of
    the split of ``seed``, scored on that split's test cases (the same ``splits.json`` as fine-tuning)."""

    task: Path
    encoder_checkpoint: Path | None = None
    cache_dir: Path | None = None  # preprocessed volumes; default <run>/cache
    splits_path: Path | None = None  # default <run>/splits.json
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    budget: Budget = Budget.all()
    seed: Seed = 0
    crop_size: CropSize = 32
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    n_test: int = Field(4, ge=1)
    n_val: int = Field(2, ge=1)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    limits: Limits = Field(default_factory=Limits)  # resource limits; not part of the config hash


# --------------------------------------------------------------------------- helpers


NOT_HASHED = frozenset({"limits"})  # settings that never change what a run computes


def hashed_fields(model: BaseModel) -> dict[str, Any]:
    """The config as a JSON-able dict without the settings that do not affect results."""
    return {k: v for k, v in config_dump(model).items() if k not in NOT_HASHED}


def config_hash(model: BaseModel, length: int = 12) -> str:
    """Stable hash of a config's content (sorted JSON), used for run ids and cache keys."""
    payload = json.dumps(hashed_fields(model), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


def format_validation_error(err: ValidationError, prefix: str = "", model: type[BaseModel] | None = None) -> str:
    """One line for a pydantic error: ``key.path: problem`` per field, joined by ``; ``."""
    return "; ".join(validation_problems(err, prefix, model))


def validation_problems(
    err: ValidationError, prefix: str = "", model: type[BaseModel] | None = None, data: Any = None
) -> list[str]:
    """One ``dotted.key: problem`` line per field of a pydantic error (``prefix`` goes before each key).

    With the ``model`` that was validated: an unknown key gets the nearest valid dotted key ("did
    you mean schedule.lr?"), and the errors pydantic reports once per member of a union (``int``,
    ``literal['all']``, ...) become one line saying what was given (from ``data``, the validated input)
    and what is expected. A union whose errors continue inside one member (a list item, a mapping's
    key) was meant as that member: its deeper errors are shown instead."""
    entries: list[tuple[str, str, tuple[Any, ...] | None]] = []  # (key, problem, union it mismatches)
    passed: set[tuple[Any, ...]] = set()  # unions some error went through into a member
    for e in err.errors():
        where = _locate(model, tuple(e["loc"])) if model is not None else _Location(list(e["loc"]), None)
        passed.update(where.through)
        key = prefix + (".".join(str(p) for p in where.keys) or "<root>")
        if e["type"] == "extra_forbidden":
            hint = _nearest_key(model, where.annotation, where.keys, prefix) if model is not None else None
            entries.append((key, "unknown key" + (f"; did you mean {hint}?" if hint else ""), None))
        elif where.mismatch is not None:
            given = _value_at(data, where.keys) if data is not None else e.get("input")
            entries.append((key, f"expected {describe_type(where.mismatch)}, given {_given(given)}", tuple(where.keys)))
        else:
            problem, given = e["msg"].removeprefix("Value error, "), _given(e.get("input"))
            shown = e["type"] == "missing" or given in problem  # nothing given, or the message names it
            entries.append((key, problem if shown else f"{problem} (given {given})", None))
    lines: dict[str, str] = {}
    for key, problem, union in entries:
        if union not in passed:
            lines.setdefault(key, problem)
    return [f"{key}: {problem}" for key, problem in lines.items()]


@dataclass
class _Location:
    """Where a pydantic error's ``loc`` points in a model: the keys and indices (union member tags left
    out), the type found there, the union the value did not fit (its type; None when it is no union
    mismatch), and the unions the ``loc`` went through into one of their members."""

    keys: list[Any]
    annotation: Any
    mismatch: Any = None
    through: list[tuple[Any, ...]] = field(default_factory=list)


def _unwrap(annotation: Any) -> Any:
    """The type under ``Annotated[...]`` and ``X | None`` (a null is accepted wherever None is)."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return _unwrap(members[0])
    return annotation


def _union_member(union: Any, tag: object) -> Any:
    """The member of ``union`` that pydantic's ``loc`` tag names (``MethodConfig``, ``list[...]``, ``str``; a
    model with a validator is tagged ``function-after[validator(), Model]``)."""
    wrapped = re.fullmatch(r"function-(?:after|before|wrap|plain)\[.*, (\w+)\]", str(tag))
    tag = wrapped.group(1) if wrapped else tag
    for member in get_args(union):
        inner = _unwrap(member)
        name = getattr(inner, "__name__", "") if isinstance(inner, type) else ""
        origin = get_origin(inner)
        if (name and tag == name) or (origin is not None and str(tag).startswith(f"{origin.__name__}[")):
            return inner
    return None


def _locate(model: type[BaseModel], loc: tuple[Any, ...]) -> _Location:
    annotation: Any = model
    where = _Location([], model)
    for i, part in enumerate(loc):
        current = _unwrap(annotation)
        origin = get_origin(current)
        if origin in (Union, types.UnionType):
            member = _union_member(current, part)
            if member is None or i == len(loc) - 1:  # the value fits no member of this union
                return _Location(where.keys, current, current, where.through)
            where.through.append(tuple(where.keys))
            annotation = member
            continue
        if isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            annotation = current.model_fields[part].annotation
        elif origin in (list, tuple, set, frozenset) and isinstance(part, int):
            items = [a for a in get_args(current) if a is not Ellipsis] or [Any]
            annotation = items[part] if origin is tuple and len(items) > 1 and part < len(items) else items[0]
        elif origin is dict and isinstance(part, str):
            annotation = get_args(current)[1] if get_args(current) else Any
        else:  # an unknown key of a model, or something this walk does not know: stop here
            return _Location([*where.keys, *loc[i:]], current, None, where.through)
        where.keys.append(part)
    return _Location(where.keys, annotation, None, where.through)


def _dotted_keys(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    for name, info in model.model_fields.items():
        yield prefix + name
        inner = _unwrap(info.annotation)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            yield from _dotted_keys(inner, f"{prefix}{name}.")


def _nearest_key(model: type[BaseModel], parent: Any, keys: list[Any], prefix: str = "") -> str | None:
    """The valid dotted key nearest an unknown one: a key of the same section first (``schedule.lrr`` ->
    ``schedule.lr``), else any key of the config ending in a name like it (``lr`` -> ``schedule.lr``)."""
    unknown = str(keys[-1])
    parent = _unwrap(parent)
    if isinstance(parent, type) and issubclass(parent, BaseModel):
        sibling = closest_name(unknown, parent.model_fields)
        if sibling is not None:
            return prefix + ".".join(str(p) for p in [*keys[:-1], sibling])
    by_leaf: dict[str, str] = {}
    for dotted in _dotted_keys(model):
        by_leaf.setdefault(dotted.rsplit(".", 1)[-1], dotted)
    leaf = closest_name(unknown, by_leaf, cutoff=0.8)
    return prefix + by_leaf[leaf] if leaf is not None else None


def describe_type(annotation: Any) -> str:
    """What a config field takes, in words: ``a positive integer or 'all'``, ``a list of text``."""
    if get_origin(annotation) is Annotated:
        return describe_type(get_args(annotation)[0])
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(describe_type(a) for a in args))
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin in (list, tuple, set, frozenset):
        items = [a for a in args if a is not Ellipsis]
        if origin is tuple and len(items) > 1:
            return f"a list of {len(items)} values ({', '.join(describe_type(a) for a in items)})"
        return f"a list of ({describe_type(items[0])})" if items else "a list"
    if origin is dict or annotation is dict:
        return "a mapping"
    simple = {
        type(None): "null",
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "text",
        Path: "a path",
        Budget: "a positive integer or 'all'",
        Any: "anything",
    }
    if annotation in simple:
        return simple[annotation]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "a mapping"
    return getattr(annotation, "__name__", str(annotation))


def _value_at(data: Any, path: list[Any]) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _given(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validate_config(model_cls: type[ModelT], data: dict[str, Any], source: str | Path | None) -> ModelT:
    """Build ``model_cls`` from ``data``; on failure raise ``ConfigError`` naming file, key and problem
    (one line per field: ``ConfigError.lines``)."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(source or "<config>", problems=validation_problems(err, model=model_cls, data=data)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], value parsed as YAML so numbers, lists and booleans work)."""
    if "=" not in text:
        raise ConfigError("<command line>", f"override '{text}' is not of the form key.path=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError("<command line>", f"override '{text}' has an empty key")
    try:
        value = safe_load_yaml(raw, "<command line>") if raw != "" else ""
    except ConfigError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides to a nested dict (a copy is returned)."""
    out = json.loads(json.dumps(data, default=str))
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError("<command line>", f"override '{text}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return out


def deep_merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` merged in: nested mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class _CountingLoader(yaml.SafeLoader):
    """A SafeLoader that refuses documents whose node graph, aliases expanded, exceeds
    ``limits.yaml_nodes``: an alias bomb is a few hundred bytes that expand to billions of nodes."""

    source: str = "<config>"

    def construct_document(self, node: yaml.Node) -> Any:
        sizes: dict[int, int] = {}

        def expanded(n: yaml.Node) -> int:  # memoised on node identity: linear in the document
            if id(n) not in sizes:
                sizes[id(n)] = 1  # a recursive alias counts once instead of looping
                if isinstance(n, yaml.SequenceNode):
                    sizes[id(n)] = 1 + sum(expanded(c) for c in n.value)
                elif isinstance(n, yaml.MappingNode):
                    sizes[id(n)] = 1 + sum(expanded(k) + expanded(v) for k, v in n.value)
            return sizes[id(n)]

        check(self.source, "YAML nodes after expanding aliases:", expanded(node), "yaml_nodes")
        return super().construct_document(node)


def safe_load_yaml(text: str, source: str | Path) -> Any:
    """``yaml.safe_load`` within the limits; any problem is a ``ConfigError`` naming ``source``."""
    check(source, "config size in bytes", len(text.encode("utf-8", "surrogatepass")), "yaml_bytes")
    try:
        loader = _CountingLoader(text)  # the reader already rejects control characters here
    except yaml.YAMLError as err:
        raise ConfigError(source, f"not valid YAML ({str(err).splitlines()[0][:120]})") from None
    loader.source = str(source)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(source, f"not valid YAML{where}") from None
    except RecursionError:
        raise ConfigError(source, "YAML nested too deeply") from None
    except (ValueError, OverflowError, TypeError) as err:  # e.g. a timestamp out of range
        raise ConfigError(source, f"not valid YAML ({type(err).__name__}: {str(err)[:120]})") from None
    finally:
        loader.dispose()


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; unreadable or malformed files raise ``ConfigError`` naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        check(path, "config size in bytes", size, "yaml_bytes")  # before reading it into memory
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(path, f"cannot read config ({err.strerror or err})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(path, f"not UTF-8 text (byte {err.start})") from None
    data = safe_load_yaml(text, path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(path, "top level must be a mapping of keys to values")
    return data


def load_config(model_cls: type[ModelT], path: str | Path | None, overrides: list[str] | None = None) -> ModelT:
    """Load a config model from an optional YAML file plus command-line overrides."""
    data = load_yaml(path) if path is not None else {}
    if overrides:
        data = apply_overrides(data, overrides)
    source = path if path is not None else "<command line>"
    return validate_config(model_cls, data, source)


def dump_yaml(model: BaseModel) -> str:
    return yaml.safe_dump(config_dump(model), sort_keys=False)


# --------------------------------------------------------------------------- benchmark
# A benchmark YAML (``medssl bench``): data, tasks, methods, shared model/preprocessing, the
# pretrain/finetune recipes, budgets, seeds, CKA and the executor. The bench engine expands it
# into one PretrainConfig/FinetuneConfig per run (``medssl.bench.plan``).

SYNTH_TASK_PREFIX = "synth:"
SYNTH_TASK_KINDS = ("ct_organs", "ct_lesions", "mri_organs")


def _section_model(name: str, source: type[StrictModel], exclude: set[str], doc: str) -> type[StrictModel]:
    """A bench section with ``source``'s fields minus those the bench sets per run.

    Derived rather than copied so a field added to PretrainConfig/FinetuneConfig is settable from a
    benchmark YAML at once; the full per-run config is validated again when the plan is built, so
    ``source``'s validators that span several fields still apply.
    """
    from pydantic import create_model  # kept local: the bench section is appended to this module

    fields: dict[str, Any] = {k: (f.annotation, f) for k, f in source.model_fields.items() if k not in exclude}

    def check_against_source(self: StrictModel) -> StrictModel:
        try:
            source.model_validate(self.model_dump())
        except ValidationError as err:
            raise ValueError(format_validation_error(err, model=source)) from None
        return self

    # pydantic's stub types __validators__ as plain callables; a decorated validator is what it takes
    validators: dict[str, Any] = {"check_against_source": model_validator(mode="after")(check_against_source)}
    return create_model(name, __base__=StrictModel, __doc__=doc, __validators__=validators, **fields)


# FinetuneConfig fields the bench sets for each run (the rest come from the `finetune` section)
FINETUNE_PLANNED_FIELDS = frozenset(
    {"task", "encoder_checkpoint", "cache_dir", "splits_path", "encoder", "budget", "seed", "preprocess", "limits"}
)
if TYPE_CHECKING:
    # A model built at run time is no type to mypy: it sees the source models, whose fields are a superset
    # of each section's (every field a section has, it has with the source's type).
    BenchPretrainConfig = PretrainConfig
    BenchFinetuneConfig = FinetuneConfig
else:
    BenchPretrainConfig = _section_model(
        "BenchPretrainConfig",
        PretrainConfig,
        {"method", "encoder", "corpus", "preprocess", "published_recipe", "limits"},
        "PretrainConfig fields shared by every pretraining run of a benchmark.",
    )
    BenchFinetuneConfig = _section_model(
        "BenchFinetuneConfig",
        FinetuneConfig,
        set(FINETUNE_PLANNED_FIELDS),
        "FinetuneConfig fields shared by every fine-tuning run of a benchmark.",
    )


class SynthDataConfig(StrictModel):
    """Synthetic phantoms written to ``<out>/data`` (corpus + CT organs, CT lesions, MRI organs)."""

    cases: int = Field(12, ge=2)
    corpus_cases: int = Field(12, ge=1)
    shape: tuple[int, int, int] = (64, 64, 64)
    spacing: Spacing = (3.0, 3.0, 3.0)  # voxel size in mm (jittered a little per case)
    seed: Seed = 0
    # "standard": one CT protocol; "scanners": each scan its own contrast phase, dose, kernel and
    # calibration (MRI: coil bias, noise, contrast) — what few labeled cases cannot cover (data/synth.py)
    variation: Literal["standard", "scanners"] = "standard"
    # radius range of the CT-lesion task's lesions, mm (data/synth.py LESION_RADIUS_MM: 5-10 mm, 1-3 voxels
    # at 4 mm); the organ tasks and the corpus keep the default whatever this says
    lesion_radius_mm: tuple[PositiveFloat, PositiveFloat] = (5.0, 10.0)

    @model_validator(mode="after")
    def _lesion_radius_order(self) -> SynthDataConfig:
        if self.lesion_radius_mm[0] > self.lesion_radius_mm[1]:
            raise ValueError(f"lesion_radius_mm must be [low, high], got {list(self.lesion_radius_mm)}")
        return self


class BenchDataConfig(StrictModel):
    synth: SynthDataConfig | None = None  # None: defaults, used only if a task or the corpus is "synth"
    corpus: Literal["synth"] | list[Path] = "synth"  # raw scan folders/files, or one ingested corpus dir
    include_real_ct: bool = False  # add InVesalius' Cranium.inv3 head CT to an ingested corpus when present


class BenchTaskConfig(StrictModel):
    path: str  # "synth:ct_organs" | "synth:ct_lesions" | "synth:mri_organs" | an MSD/nnU-Net folder
    name: Slug | None = None  # run ids, splits file; default: the synthetic kind or the folder name
    # fine-tuning settings for this task only, merged over the benchmark's `finetune` section
    # (e.g. {schedule: {steps: 500}, nsd_tolerance_mm: 1.0}); every encoder gets the same ones
    finetune: dict[str, Any] = Field(default_factory=dict)
    # this task's label budgets (None: the benchmark's `budgets`), e.g. a secondary task at `all` only
    budgets: list[Budget] | None = Field(None, min_length=1)

    @field_validator("budgets")
    @classmethod
    def _task_budgets(cls, v: list[Budget] | None) -> list[Budget] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError("budgets are listed twice")
        return v

    @field_validator("path")
    @classmethod
    def _known_synth(cls, v: str) -> str:
        if v.startswith(SYNTH_TASK_PREFIX):
            look_up_option("synthetic task", v, [SYNTH_TASK_PREFIX + k for k in SYNTH_TASK_KINDS])
        return v

    @property
    def synth_kind(self) -> str | None:
        return self.path[len(SYNTH_TASK_PREFIX) :] if self.path.startswith(SYNTH_TASK_PREFIX) else None


class BenchCKAConfig(StrictModel):
    enabled: bool = True
    n_crops: int = Field(8, ge=2)
    crop_size: CropSize = 32
    batch_size: int = Field(4, ge=1)  # crops per minibatch-CKA batch (and per forward pass)
    tasks: list[str] | None = None  # task names to analyse (None: every task)


class SupervisedControlConfig(StrictModel):
    """The positive control (row ``supervised``, family ``supervised``): a segmenter trained from random
    init on ``cases`` labelled phantoms of ``task`` rendered from anatomy seed ``data.synth.seed +
    seed_offset`` (never the study's own, so no study case is seen), whose encoder the study then fine-tunes
    like any pretrained one. ``finetune`` is merged over the benchmark's ``finetune`` section for its training
    (e.g. ``{schedule: {steps: 400}}``: long enough to converge); ``n_test``/``n_val`` of the control data."""

    enabled: bool = False
    task: Literal["ct_organs", "mri_organs"] = "ct_organs"
    cases: int = Field(16, ge=4)
    seed_offset: int = Field(1, ge=1, le=1_000_000)
    n_test: int = Field(2, ge=1)
    n_val: int = Field(2, ge=1)
    finetune: dict[str, Any] = Field(default_factory=dict)


class BenchControlsConfig(StrictModel):
    """Rows that show what the protocol can see (``configs/transfer.yaml``): the positive control
    (``supervised``) and the transformer->identity control (row ``identity-transformer``: the segmenter with
    its Swin blocks replaced by identity, random init; ``FinetuneConfig.transformer``). Random init is the
    method ``none``."""

    supervised: SupervisedControlConfig = Field(default_factory=SupervisedControlConfig)
    identity_transformer: bool = False


class BenchProbeConfig(ProbeConfig):
    """Frozen-encoder probe runs (run kind ``probe``) of every encoder row (random init, the SSL methods,
    the supervised control, external encoders) on every task, budget (``budgets``; None: the benchmark's)
    and seed, on the fine-tuning runs' splits; the head's design is the ``ProbeConfig`` fields."""

    enabled: bool = False
    budgets: list[Budget] | None = None


class SlurmConfig(StrictModel):
    # > 1: a run (pretrain/finetune) spans this many nodes: ``srun torchrun --nnodes N`` meeting at a c10d
    # rendezvous on the job's first node, port ``rdzv_port`` (CKA runs stay on one node)
    nodes: int = Field(1, ge=1)
    rdzv_port: int = Field(29500, ge=1024, le=65535)
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    timeout_min: int = Field(720, ge=1)
    gpus_per_node: int = Field(1, ge=0)
    cpus_per_task: int = Field(8, ge=1)
    mem_gb: float = Field(64, gt=0)
    folder: Path | None = None  # submitit logs; default <out>/slurm


ExecutorKind = Literal["local", "torchrun", "slurm"]
EXECUTOR_KINDS: tuple[str, ...] = get_args(ExecutorKind)  # the one list of executors (CLI, bench, factory)


class CacheConfig(StrictModel):
    """How the pretraining corpus's volume cache stores images (lossless either way; see data/cache.py):
    ``npy`` memory-mapped float16 (fastest crop reads), ``blosc2`` chunked zstd-1 (a fifth to a quarter
    of the disk on real CT/MRI; needs ``pip install 'medssl[blosc2]'``)."""

    format: Literal["npy", "blosc2"] = "npy"


class ExecutorConfig(StrictModel):
    kind: ExecutorKind = "local"
    workers: int = Field(1, ge=1)  # local: runs in parallel (worker processes)
    nproc_per_node: int = Field(1, ge=1)  # torchrun/slurm: processes (GPUs) per run
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)


ExternalFamily = Literal["external", "supervised"]


class ExternalEncoderConfig(StrictModel):
    """An encoder pretrained elsewhere (MONAI SwinUNETR state dicts, research-contributions'
    model_swinvit.pt, MONAI's ~50k-volume SSL weights, SuPreM, SwinUNETR v2 from VoCo) fine-tuned beside
    the methods as row ``external-<name>``. ``family: supervised`` marks weights pretrained with labels
    (SuPreM), a row of its own family in the report's tables and plots."""

    name: Slug  # part of the row label and of a file name under <out>/external/
    path: Path
    family: ExternalFamily = added_field("external")


class BenchMethodConfig(MethodConfig):
    """A method of a benchmark. ``recipe`` overrides ``pretrain.recipe`` for this method only: a declared
    small-scale recipe (e.g. the teacher-student methods at their published recipes, whose learning rates stop
    their students collapsing, beside a shared schedule for the rest); None: the benchmark's."""

    recipe: Literal["published", "shared"] | None = None
    # A declared small-scale departure under the shared recipe: this method pretrains at the shared lr and
    # min_lr times ``lr_scale`` (e.g. the teacher-student methods at 0.1x, where their students keep their
    # spread in a short run; benchmarks/README.md, health calibration). None: the shared lr.
    lr_scale: float | None = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _scale_is_shared(self) -> BenchMethodConfig:
        if self.lr_scale is not None and self.recipe == "published":
            raise ValueError("lr_scale scales the shared schedule; recipe 'published' sets its own lr")
        return self


class BenchConfig(StrictModel):
    name: Slug = "bench"
    # What this study can and cannot show, in the author's words: the first paragraph of its report.
    about: str | None = Field(None, max_length=4000)
    data: BenchDataConfig = Field(default_factory=BenchDataConfig)
    tasks: list[BenchTaskConfig] = Field(min_length=1)
    methods: Literal["all"] | list[str | BenchMethodConfig] = "all"
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    pretrain: BenchPretrainConfig = Field(default_factory=BenchPretrainConfig)
    finetune: BenchFinetuneConfig = Field(default_factory=BenchFinetuneConfig)
    budgets: list[Budget] = Field(default_factory=lambda: [Budget.all()], min_length=1)
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
    cka: BenchCKAConfig = Field(default_factory=BenchCKAConfig)
    controls: BenchControlsConfig = Field(default_factory=BenchControlsConfig)
    probe: BenchProbeConfig = Field(default_factory=BenchProbeConfig)
    external_encoders: list[ExternalEncoderConfig] = Field(default_factory=list)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)  # storage only: no result depends on it
    limits: Limits = Field(default_factory=Limits)  # resource limits, passed to every run

    # The encoders that are fine-tuned (and compared by CKA): names from `methods` ("none" = random
    # init, "external-<name>" = an external encoder); None: every one. The others still pretrain (their
    # loss and health curves are reported) but get no downstream row.
    finetune_methods: list[str] | None = Field(None, min_length=1)

    @field_validator("budgets", "seeds")
    @classmethod
    def _distinct(cls, v: list[Any], info: ValidationInfo) -> list[Any]:
        if len(set(v)) != len(v):
            raise ValueError(f"{info.field_name} are listed twice")
        return v

    def method_configs(self) -> list[MethodConfig]:
        """The methods as MethodConfig ("all" is expanded by the bench, which knows the registry)."""
        if self.methods == "all":
            return []
        return [
            MethodConfig(name=m) if isinstance(m, str) else MethodConfig(name=m.name, options=m.options)
            for m in self.methods
        ]

    def method_recipe(self, name: str) -> Literal["published", "shared"]:
        """The pretraining recipe of method ``name``: its own ``recipe`` in ``methods``, else ``pretrain.recipe``."""
        if self.methods != "all":
            for m in self.methods:
                if isinstance(m, BenchMethodConfig) and m.name == name and m.recipe is not None:
                    return m.recipe
        return self.pretrain.recipe

    def method_lr_scale(self, name: str) -> float:
        """The factor on the shared learning rate of method ``name`` (its ``lr_scale`` in ``methods``, else 1)."""
        if self.methods != "all":
            for m in self.methods:
                if isinstance(m, BenchMethodConfig) and m.name == name and m.lr_scale is not None:
                    return m.lr_scale
        return 1.0


def _resolve_path(value: Path | str, base: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def resolve_bench_paths(bench: BenchConfig, base: str | Path) -> BenchConfig:
    """Make the benchmark's relative paths absolute against ``base`` (in place; returned)."""
    base = Path(base).resolve()
    if isinstance(bench.data.corpus, list):
        bench.data.corpus = [_resolve_path(p, base) for p in bench.data.corpus]
    for task in bench.tasks:
        if task.synth_kind is None:
            task.path = str(_resolve_path(task.path, base))
    for external in bench.external_encoders:
        external.path = _resolve_path(external.path, base)
    if bench.executor.slurm.folder is not None:
        bench.executor.slurm.folder = _resolve_path(bench.executor.slurm.folder, base)
    return bench


def load_bench_config(path: str | Path | None, overrides: list[str] | None = None) -> BenchConfig:
    """Load a benchmark YAML plus ``a.b=c`` overrides; relative paths resolve against the YAML's folder."""
    bench: BenchConfig = load_config(BenchConfig, path, list(overrides or []))
    return resolve_bench_paths(bench, Path(path).resolve().parent if path is not None else Path.cwd())
