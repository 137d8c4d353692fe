"""The SSL method interface, the registry, schedules and the EMA teacher.

A method owns its views, heads and loss (solo-learn style). The training loop knows only this
interface:

* ``region_size(crop_size)``: side of the cube sampled from the corpus for one sample (a method
  that takes several crops of one region, like SMIT's 96^3 crops of a 128^3 region, asks for more);
* ``make_views(region, rng)``: per-sample views, built on the CPU in the data pipeline with
  MONAI transforms, returned as a dict of tensors (collated into a batch);
* ``forward(batch, step)``: returns a dict of loss terms, ``"loss"`` (the total) plus each
  component, and detached diagnostics (``**health_metrics(...)`` of ``methods/health.py``);
* ``on_after_step(step)``: EMA updates and other per-step state, driven by the *global* step;
  a method declares its (online, teacher) pairs once in ``momentum_pairs()`` and sets the
  momentum schedule with ``init_momentum(base)``, and the base class updates every pair;
* ``encoder_for_export(which=None)``: the encoder its checkpoint stores (``export_network``:
  the teacher for DINO and iBOT, the student/online network otherwise), recorded in the
  checkpoint's metadata as ``exported_network``.

A teacher (:class:`EMATeacher`) is built without stochastic depth and stays in eval mode.

Schedules are precomputed per step (DINO's ``main_dino.py`` habit) so any step's value is an
array lookup, identical after resume and across processes.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Generic, Literal, TypeVar

import numpy as np
import torch
from monai.networks.layers import DropPath
from pydantic import ValidationError
from torch import Tensor, nn

from medssl.config import MethodConfig, StrictModel, format_validation_error
from medssl.errors import ConfigError, look_up_option
from medssl.methods.health import RankHistory
from medssl.models.encoder import SwinEncoder

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


class SSLMethod(nn.Module):
    """Base class of every pretraining method (random init included)."""

    name: ClassVar[str]
    family: ClassVar[str]
    description: ClassVar[str]
    Params: ClassVar[type[StrictModel]] = NoParams
    trains: ClassVar[bool] = True
    # DDP must be told when some parameters get no gradient on some steps.
    find_unused_parameters: ClassVar[bool] = False
    # The network the reference evaluates: "teacher" (DINO, iBOT: ``--checkpoint_key teacher``)
    # or "student" (the online network; every other method).
    export_network: ClassVar[str] = "student"

    def __init__(self, encoder: SwinEncoder, params: StrictModel, crop_size: int, total_steps: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.params: Any = params  # the subclass's own Params model (typed per method)
        self.crop_size = crop_size
        self.total_steps = max(int(total_steps), 1)
        self.momentum_schedule: np.ndarray | None = None
        # ``method.options.export_network`` (set by ``build_method``): export the other network.
        self.export_override: str | None = None
        # Recent steps' embeddings, for an effective rank a two-sample batch does not bound (health.py).
        self.rank_history = RankHistory()

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
        it by the step within an epoch; medssl does not (DESIGN §6)."""
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

    def cancel_gradients(self, step: int) -> None:
        """Called after backward, before clipping: e.g. DINO freezes its last layer early on."""

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


def build_method(
    config: MethodConfig, encoder: SwinEncoder, crop_size: int, total_steps: int, steps_per_epoch: int | None = None
) -> SSLMethod:
    """Look up ``config.name`` and build it with validated options.

    ``steps_per_epoch`` (pretraining passes one pass over the corpus at the global batch) fills a
    method's ``steps_per_epoch`` option when the method has one and it is unset: recipes that count
    epochs (DINO, iBOT, SMIT) convert them with it.
    """
    cls = REGISTRY[look_up_option("method", config.name, sorted(REGISTRY), source="method.name")]
    params = cls.parse_params(config.options)
    if steps_per_epoch is not None and getattr(params, "steps_per_epoch", 0) is None:
        params = params.model_copy(update={"steps_per_epoch": max(int(steps_per_epoch), 1)})
    method = cls(encoder, params, crop_size=crop_size, total_steps=total_steps)
    method.export_override = config.options.get(EXPORT_OPTION)
    if method.export_override == "teacher":
        method.encoder_for_export()  # fail now, not after training, when there is no teacher
    return method


# --------------------------------------------------------------------------- schedules


def cosine_schedule(
    base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """Per-step values: linear warm-up from ``warmup_start`` to ``base``, then cosine to ``final``."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(int(warmup_steps), total_steps)
    warm = np.linspace(warmup_start, base, warmup_steps, endpoint=False) if warmup_steps else np.array([])
    rest = total_steps - warmup_steps
    t = np.arange(rest)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / max(rest - 1, 1))) if rest > 1 else np.full(rest, base)
    return np.concatenate([warm, cos]).astype(np.float64)


ShortRunWarmup = Literal["truncate", "compress"]


def linear_warmup_then_constant(
    start: float, end: float, warmup_steps: int, total_steps: int, short_run: ShortRunWarmup = "truncate"
) -> np.ndarray:
    """DINO's teacher temperature: linear from ``start`` to ``end`` over warm-up, then constant.

    A run shorter than the warm-up: ``truncate`` keeps the warm-up's slope and stops where the run
    ends, so every step has the value DINO's ``DINOLoss.teacher_temp_schedule`` gives it (DINO itself
    refuses such a run: its ``np.ones(nepochs - warmup_teacher_temp_epochs)`` is negative);
    ``compress`` squeezes the whole warm-up into the run, reaching ``end`` by its last step (medssl's
    schedule up to commit 7e8c2e7; no reference does this).
    """
    total_steps = max(int(total_steps), 1)
    warmup_steps = max(int(warmup_steps), 0)
    if short_run == "compress":
        warmup_steps = min(warmup_steps, total_steps)
    warm = np.linspace(start, end, warmup_steps)[:total_steps] if warmup_steps else np.array([])
    return np.concatenate([warm, np.full(total_steps - len(warm), end)]).astype(np.float64)


def schedule_at(schedule: np.ndarray, step: int) -> float:
    """Value at ``step``, holding the last value past the end (for steps beyond the plan)."""
    return float(schedule[min(max(step, 0), len(schedule) - 1)])


# --------------------------------------------------------------------------- EMA teacher


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def without_stochastic_depth(module: ModuleT) -> ModuleT:
    """Set every drop-path rate in ``module`` to 0 (in place) and return it.

    DINO, iBOT and SMIT build their teacher without stochastic depth (``main_dino.py``: the
    teacher is ``vits.__dict__[args.arch](patch_size=...)`` with no ``drop_path_rate``; iBOT's
    ``main_ibot.py`` and SMIT's ``Pretrain_SMIT.py`` likewise); MONAI's Swin blocks hold
    ``DropPath`` modules, whose probability is zeroed here. A :class:`SwinEncoder`'s recorded
    config is updated to match.
    """
    for sub in module.modules():
        if isinstance(sub, DropPath):
            sub.drop_prob = 0.0
        if isinstance(sub, SwinEncoder):
            sub.config = sub.config.model_copy(update={"drop_path_rate": 0.0})
    return module


class EMATeacher(nn.Module, Generic[ModuleT]):
    """A frozen copy of an online network, updated only by EMA (``t = m * t + (1 - m) * s``).

    Built from a deep copy of ``online`` (same weights at step 0, as DINO's
    ``teacher_without_ddp.load_state_dict(student.module.state_dict())``), without stochastic
    depth, with no gradients, and always in eval mode: ``train()`` on a method does not switch it
    back, so the teacher gives the same output for the same input on any two calls.
    ``batch_norm_batch_stats=True`` keeps its BatchNorm layers (only those) on batch statistics
    in training, as MoCo v3's momentum encoder and BYOL's target run (their ``model.train()``
    covers the key branch); the Swin encoder has no BatchNorm, so DINO/iBOT/SMIT are unaffected.

    Declare each (online, teacher) pair in :meth:`SSLMethod.momentum_pairs`; the base class
    updates them after every optimizer step with one momentum schedule.
    """

    def __init__(self, online: ModuleT, batch_norm_batch_stats: bool = False) -> None:
        super().__init__()
        self.batch_norm_batch_stats = batch_norm_batch_stats
        self.module: ModuleT = without_stochastic_depth(copy.deepcopy(online))
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> EMATeacher:
        """Stay in eval mode whatever ``mode`` is (BatchNorm follows ``mode`` when asked to)."""
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
