"""The SSL method interface, the registry and the EMA teacher.

A method owns its views, heads and loss (solo-learn style). It is a
:class:`~medssl.training_module.TrainingModule` (the one optimiser step, ``train/step.py``, calls its
hooks) and the pretraining loop knows only this interface:

* ``region_size(crop_size)``: side of the cube sampled from the corpus for one sample (a method
  that takes several crops of one region, like SMIT's 96^3 crops of a 128^3 region, asks for more);
* ``make_views(region, rng)``: per-sample views, built on the CPU in the data pipeline with
  MONAI transforms, returned as a dict of tensors (collated into a batch);
* ``build_heads()``: the one place a method builds its heads, projectors and decoders (called once by
  :class:`SSLMethod`'s constructor, after ``encoder``, ``params``, ``crop_size`` and the run length are
  set); ``set_up()``, called right after it, is where a method derives the rest of its state from its
  heads and options (EMA teachers, schedules, centres, frozen parameters). The constructor is the base
  class's only: a method extends these two hooks, not ``__init__``;
* ``forward(batch, step)``: the output dict, always made by :meth:`SSLMethod.outputs`: ``"loss"`` (the
  total), each loss term and diagnostic (detached), and the representation-health scalars of
  ``methods/health.py``;
* the training hooks of :class:`~medssl.training_module.TrainingHooks` (``param_groups``,
  ``cancel_gradients``, ``clip_gradients``, ``on_after_step``); ``on_after_step`` updates the EMA
  teachers a method declares once in ``momentum_pairs()`` (momentum schedule: ``init_momentum(base)``);
* ``encoder_for_export(which=None)``: the encoder its checkpoint stores (``export_network``:
  the teacher for DINO and iBOT, the student/online network otherwise), recorded in the
  checkpoint's metadata as ``exported_network``;
* ``negatives_per_step(batch)``: how many negatives a query is contrasted with at a global batch (None
  for methods without negatives), for the report's small-batch warning.

A teacher (:class:`EMATeacher`) is by default a copy of the online network without stochastic depth,
always in eval mode (DINO, iBOT); SMIT's released teacher differs (``methods/smit.py``).
Schedules are ``medssl.schedules``.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import torch
from monai.networks.layers import DropPath
from pydantic import ValidationError
from torch import Tensor, nn

from medssl.config import MethodConfig, StrictModel, format_validation_error
from medssl.errors import ConfigError, look_up_option
from medssl.methods.health import RankHistory, health_metrics
from medssl.models.encoder import SwinEncoder
from medssl.schedules import cosine_schedule, schedule_at
from medssl.training_module import TrainingHooks

FAMILIES = ("contrastive", "rotation", "mim", "self_distillation", "none")

REGISTRY: dict[str, type[SSLMethod]] = {}


def register(cls: type[SSLMethod]) -> type[SSLMethod]:
    """Class decorator adding a method to ``REGISTRY`` under ``cls.name``."""
    if cls.family not in FAMILIES:
        raise ValueError(f"{cls.__name__}: family {cls.family!r} not in {FAMILIES}")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


EXPORT_NETWORKS = ("student", "teacher")
EXPORT_OPTION = "export_network"
"""``method.options.export_network: teacher|student`` exports the other network (any method)."""


class NoParams(StrictModel):
    """For methods without options."""


class SSLMethod(TrainingHooks):
    """Base class of every pretraining method (random init included)."""

    name: ClassVar[str]
    family: ClassVar[str]
    description: ClassVar[str]
    Params: ClassVar[type[StrictModel]] = NoParams
    trains: ClassVar[bool] = True
    # DDP must be told when some parameters get no gradient on some steps.
    find_unused_parameters: ClassVar[bool] = False
    # The network the reference evaluates: "teacher" (DINO's eval_linear.py, iBOT's evaluation/eval_cls.py:
    # ``--checkpoint_key`` default ``teacher``)
    # or "student" (the online network; every other method).
    export_network: ClassVar[str] = "student"

    def __init__(
        self,
        encoder: SwinEncoder,
        params: StrictModel,
        crop_size: int,
        total_steps: int,
        steps_per_epoch: int | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.params: Any = params  # the subclass's own Params model (typed per method)
        self.crop_size = crop_size
        self.total_steps = max(int(total_steps), 1)
        # One pass over the corpus at the global batch (pretraining computes it); None where no corpus is
        # known (a method built alone, the step-time estimate). Recipes that count epochs read it.
        self.steps_per_epoch = steps_per_epoch
        self.momentum_schedule: np.ndarray | None = None
        # ``method.options.export_network`` (set by ``build_method``): export the other network.
        self.export_override: str | None = None
        # Recent steps' embeddings, for an effective rank a two-sample batch does not bound (health.py).
        self.rank_history = RankHistory()
        self.build_heads()
        self.set_up()

    def build_heads(self) -> None:
        """Build the method's heads (projectors, predictors, prototype heads, decoders) as attributes.

        The one place heads are made; called once by the constructor, with ``encoder``, ``params`` and
        ``crop_size`` set. A method without heads (random init) keeps this default."""

    def set_up(self) -> None:
        """Derive the rest of the method's state from its heads and options: EMA teachers of the online
        network, schedules, centres, parameters frozen for want of a gradient.

        Called once by the constructor, right after :meth:`build_heads`. A subclass that extends it calls
        ``super().set_up()`` first, so a base class's state (a teacher copied from the heads) comes before its
        own, in the same order for every run of a seed."""

    @classmethod
    def knob_steps(cls, params: Any, total_steps: int, steps_per_epoch: int | None = None) -> dict[str, int]:
        """The recipe's epoch-counted knobs (warm-ups, starts) in steps of a run of ``total_steps``; ``params`` is
        this method's ``Params``. None by default (DINO, iBOT, SMIT have them)."""
        return {}

    def pretext(self) -> dict[str, Any]:
        """What the pretext works on at this run's crop size (recorded in the run's results as ``pretext``):
        for masked methods the encoder output they reconstruct or distil, its tokens per crop, the masking
        unit in voxels and how many encoder stages receive gradients. Empty for the others."""
        return {}

    @classmethod
    def negatives_per_step(cls, batch_size: int) -> int | None:
        """Negatives each query is contrasted with in one step at global batch ``batch_size`` (DDP gathers
        make it global); None for a method without negatives (the default)."""
        return None

    def outputs(
        self,
        loss: Tensor,
        *,
        embedding: Tensor | None = None,
        features: Tensor | None = None,
        teacher_probs: Tensor | None = None,
        distillation_ce: Tensor | None = None,
        **terms: Tensor,
    ) -> dict[str, Tensor]:
        """The output dict of ``forward``, the one way every method makes it: ``loss`` (with gradient), each
        loss term and diagnostic in ``terms`` (detached), and the representation health
        (:func:`~medssl.methods.health.health_metrics`) of the embedding the loss is computed on, the pooled
        encoder features and, for teacher-student methods, the teacher distribution and the distillation
        cross-entropy computed on it."""
        return {
            "loss": loss,
            **{key: value.detach() for key, value in terms.items()},
            **health_metrics(
                embedding=embedding,
                features=features,
                teacher_probs=teacher_probs,
                history=self.rank_history,
                distillation_ce=distillation_ce,
            ),
        }

    # data side -----------------------------------------------------------------------------
    def region_size(self, crop_size: int) -> int:
        return crop_size

    def make_views(self, region: Tensor, rng: np.random.Generator) -> dict[str, Tensor]:
        raise NotImplementedError

    # model side ----------------------------------------------------------------------------
    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def momentum_pairs(self) -> list[tuple[nn.Module, EMATeacher]]:
        """The (online, EMA teacher) pairs this method trains; :meth:`on_after_step` updates them.

        Return the online module as it is now (build wrappers on demand, so the encoder is
        registered once in the state dict); the order of the parameters must match the teacher's.
        """
        return []

    def init_momentum(self, base: float, total_steps: int | None = None) -> None:
        """Teacher momentum: cosine from ``base`` to 1 over the *global* steps (DINO's
        ``utils.cosine_scheduler(args.momentum_teacher, 1, ...)``). SMIT's released code indexes
        it by the step within an epoch; medssl does not (docs/design.md §6)."""
        self.momentum_schedule = cosine_schedule(base, 1.0, total_steps or self.total_steps)

    def momentum(self, step: int) -> float:
        if self.momentum_schedule is None:
            raise RuntimeError(f"{type(self).__name__} has momentum pairs but never called init_momentum")
        return schedule_at(self.momentum_schedule, step)

    def on_after_step(self, step: int) -> None:
        """Per-step state after the optimizer step: every momentum pair takes its EMA update.

        Subclasses that keep more per-step state extend this and call ``super().on_after_step``.
        """
        pairs = self.momentum_pairs()
        if pairs:
            m = self.momentum(step)
            for online, teacher in pairs:
                teacher.update(online, m)

    # export ----------------------------------------------------------------------------------
    def encoder_for_export(self, which: str | None = None) -> SwinEncoder:
        """The encoder a checkpoint stores: ``which`` ("student" / "teacher"), else the
        ``export_network`` option, else the method's :attr:`export_network`.

        The teacher encoder is found through :meth:`momentum_pairs`: the copy, inside the teacher,
        of ``self.encoder`` inside its online network.
        """
        which = which or self.export_override or self.export_network
        if which not in EXPORT_NETWORKS:
            raise ConfigError("method.options.export_network", f"must be one of {EXPORT_NETWORKS}, got {which!r}")
        if which == "student":
            return self.encoder
        for online, teacher in self.momentum_pairs():
            for path, sub in online.named_modules():
                if sub is self.encoder:
                    found = teacher.module.get_submodule(path)
                    if isinstance(found, SwinEncoder):
                        return found
        raise ConfigError("method.options.export_network", f"method '{self.name}' has no teacher encoder to export")

    def exported_network(self) -> str:
        """The name :meth:`encoder_for_export` uses by default (recorded in the checkpoint)."""
        return self.export_override or self.export_network

    @classmethod
    def parse_params(cls, options: dict[str, Any], source: str = "method.options") -> StrictModel:
        """Validate ``options`` against :attr:`Params`; ``export_network`` is common to every method."""
        options = dict(options)
        export = options.pop(EXPORT_OPTION, None)
        if export is not None and export not in EXPORT_NETWORKS:
            raise ConfigError(f"method '{cls.name}'", f"{source}.{EXPORT_OPTION}: must be one of {EXPORT_NETWORKS}")
        try:
            return cls.Params.model_validate(options)
        except ValidationError as err:
            raise ConfigError(
                f"method '{cls.name}'", format_validation_error(err, prefix=f"{source}.", model=cls.Params)
            ) from None


def token_count(encoder: SwinEncoder, crop_size: int, stage: int) -> int:
    """Tokens of encoder output ``stage`` (0: patch embedding, 4: bottleneck) in a cubic crop."""
    grid = encoder.stage_grid((crop_size,) * 3, stage)
    return int(grid[0] * grid[1] * grid[2])


def freeze_stages_after(encoder: SwinEncoder, stage: int) -> None:
    """Freeze the Swin stages after encoder output ``stage`` (``layers{stage+1}`` .. ``layers4``): a pretext
    that reads an earlier output gives them no gradient, and a parameter without one would stall DDP."""
    for index in range(stage + 1, 5):
        getattr(encoder, f"layers{index}").requires_grad_(False)


def resolve_method_config(config: MethodConfig) -> MethodConfig:
    """``config`` with every option of its method spelled out (defaults filled in, validated): the method as it
    will run, so a run's config (and its hash, hence its id) changes whenever a method's defaults do."""
    cls = REGISTRY[look_up_option("method", config.name, sorted(REGISTRY), source="method.name")]
    options = cls.parse_params(config.options).model_dump(mode="json")
    if EXPORT_OPTION in config.options:
        options[EXPORT_OPTION] = config.options[EXPORT_OPTION]
    return MethodConfig(name=config.name, options=options)


class UnmaskedMethod(SSLMethod):
    """A method that never masks its input (the two-view methods, RotNet, SwinUNETR-SSL): the encoder's
    unused mask token is frozen, so DDP sees no parameter without a gradient."""

    def set_up(self) -> None:
        super().set_up()
        self.encoder.mask_token.requires_grad_(False)


def build_method(
    config: MethodConfig, encoder: SwinEncoder, crop_size: int, total_steps: int, steps_per_epoch: int | None = None
) -> SSLMethod:
    """Look up ``config.name`` and build it with validated options.

    ``steps_per_epoch``: one pass over the corpus at the global batch (pretraining computes it), handed
    to every method (:attr:`SSLMethod.steps_per_epoch`); recipes that count epochs in corpus passes read it.
    """
    cls = REGISTRY[look_up_option("method", config.name, sorted(REGISTRY), source="method.name")]
    params = cls.parse_params(config.options)
    epoch = max(int(steps_per_epoch), 1) if steps_per_epoch is not None else None
    method = cls(encoder, params, crop_size=crop_size, total_steps=total_steps, steps_per_epoch=epoch)
    method.export_override = config.options.get(EXPORT_OPTION)
    if method.export_override == "teacher":
        method.encoder_for_export()  # fail now, not after training, when there is no teacher
    return method


# --------------------------------------------------------------------------- EMA teacher


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def without_stochastic_depth(module: ModuleT) -> ModuleT:
    """Set every drop-path rate in ``module`` to 0 (in place) and return it.

    DINO and iBOT build their teacher without stochastic depth (``main_dino.py``: the teacher is
    ``vits.__dict__[args.arch](patch_size=args.patch_size)``, no ``drop_path_rate``; ``main_ibot.py``:
    ``drop_path_rate=0.0`` for the teacher); MONAI's Swin blocks hold ``DropPath`` modules, whose
    probability is zeroed here. A :class:`SwinEncoder`'s recorded config is updated to match. (SMIT's
    released teacher keeps its stochastic depth: ``methods/smit.py``.)
    """
    for sub in module.modules():
        if isinstance(sub, DropPath):
            sub.drop_prob = 0.0
        if isinstance(sub, SwinEncoder):
            sub.config = sub.config.model_copy(update={"drop_path_rate": 0.0})
    return module


class EMATeacher(nn.Module, Generic[ModuleT]):
    """A frozen network updated only by EMA of an online network (``t = m * t + (1 - m) * s``).

    By default (DINO, iBOT, MoCo v3, BYOL) it is a deep copy of ``online`` (same weights at step 0, as
    DINO's ``teacher_without_ddp.load_state_dict(student.module.state_dict())``), without stochastic
    depth, with no gradients, and always in eval mode: ``train()`` on a method does not switch it back,
    so the teacher gives the same output for the same input on any two calls.
    ``batch_norm_batch_stats=True`` keeps its BatchNorm layers (only those) on batch statistics in
    training, as MoCo v3's momentum encoder and BYOL's target run (their ``model.train()`` covers the
    key branch); the Swin encoder has no BatchNorm, so DINO/iBOT/SMIT are unaffected.

    SMIT's released teacher (``train_self_supervised.py`` ``main``: ``model_T`` is built on its own by
    ``Trans.Trans_SMIT_pre_train_Teacher_No_Share(config)``, never loaded from the student, and never put
    in eval mode while ``model_S.train()`` runs every epoch) is the two other options: pass an
    independently initialised network as ``online`` (its weights are copied, so step 0 starts from that
    network), and ``stochastic_depth=True`` keeps its drop path and lets ``train()`` switch it to
    training mode, where the drop path is active.

    Declare each (online, teacher) pair in :meth:`SSLMethod.momentum_pairs`; the base class
    updates them after every optimizer step with one momentum schedule.
    """

    def __init__(self, online: ModuleT, batch_norm_batch_stats: bool = False, stochastic_depth: bool = False) -> None:
        super().__init__()
        self.batch_norm_batch_stats = batch_norm_batch_stats
        self.stochastic_depth = stochastic_depth
        copied = copy.deepcopy(online)
        self.module: ModuleT = copied if stochastic_depth else without_stochastic_depth(copied)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> EMATeacher:
        """Eval mode whatever ``mode`` is (BatchNorm follows ``mode`` when asked to), unless the teacher keeps
        its stochastic depth (SMIT's release), which follows ``mode`` like any module."""
        if self.stochastic_depth:
            return super().train(mode)
        super().train(False)
        if self.batch_norm_batch_stats:
            for sub in self.module.modules():
                if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                    sub.train(mode)
        return self

    @torch.no_grad()
    def update(self, online: nn.Module, momentum: float) -> None:
        """``t = m * t + (1 - m) * s`` for parameters; buffers are copied.

        DINO's ``main_dino.py`` update (``param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)``)
        as two ``torch._foreach`` calls over all parameters instead of two kernels per parameter
        (issue #10); the same per-element arithmetic as the per-parameter loop it replaces."""
        teacher: list[Tensor] = list(self.module.parameters())
        student = [s.detach() for s in online.parameters()]
        if len(teacher) != len(student):
            raise ValueError(f"EMA teacher has {len(teacher)} parameters, its online network {len(student)}")
        if teacher:
            torch._foreach_mul_(teacher, momentum)
            torch._foreach_add_(teacher, student, alpha=1.0 - momentum)
        for t, s in zip(self.module.buffers(), online.buffers(), strict=True):
            t.copy_(s)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.module(*args, **kwargs)
