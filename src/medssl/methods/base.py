"""The SSL method interface, the registry, schedules and the EMA teacher.

A method owns its views, heads and loss (solo-learn style). The training loop knows only this
interface:

* ``region_size(crop_size)``: side of the cube sampled from the corpus for one sample (a method
  that takes several crops of one region, like SMIT's 96^3 crops of a 128^3 region, asks for more);
* ``make_views(region, rng)``: per-sample views, built on the CPU in the data pipeline with
  MONAI transforms, returned as a dict of tensors (collated into a batch);
* ``forward(batch, step)``: returns a dict of loss terms, ``"loss"`` (the total) plus each
  component, and detached diagnostics (collapse watch: ``embedding_std``, ``teacher_entropy``);
* ``on_after_step(step)``: EMA updates and other per-step state, driven by the *global* step.

Schedules are precomputed per step (DINO's ``main_dino.py`` habit) so any step's value is an
array lookup, identical after resume and across processes.
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import ValidationError
from torch import Tensor, nn

from medssl.config import MethodConfig, StrictModel
from medssl.errors import ConfigError
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

    def __init__(self, encoder: SwinEncoder, params: StrictModel, crop_size: int, total_steps: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.params: Any = params  # the subclass's own Params model (typed per method)
        self.crop_size = crop_size
        self.total_steps = max(int(total_steps), 1)

    # data side -----------------------------------------------------------------------------
    def region_size(self, crop_size: int) -> int:
        return crop_size

    def make_views(self, region: Tensor, rng: np.random.Generator) -> dict[str, Tensor]:
        raise NotImplementedError

    # model side ----------------------------------------------------------------------------
    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def on_after_step(self, step: int) -> None:
        """Per-step state after the optimizer step (EMA teachers, centres)."""

    def cancel_gradients(self, step: int) -> None:
        """Called after backward, before clipping: e.g. DINO freezes its last layer early on."""

    @classmethod
    def parse_params(cls, options: dict[str, Any], source: str = "method.options") -> StrictModel:
        try:
            return cls.Params.model_validate(options)
        except ValidationError as err:
            parts = []
            for e in err.errors():
                loc = ".".join(str(p) for p in e["loc"])
                msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
                parts.append(f"{source}.{loc}: {msg}")
            raise ConfigError(f"method '{cls.name}'", "; ".join(parts)) from None


def build_method(config: MethodConfig, encoder: SwinEncoder, crop_size: int, total_steps: int) -> SSLMethod:
    """Look up ``config.name`` and build it with validated options."""
    if config.name not in REGISTRY:
        known = ", ".join(sorted(REGISTRY))
        raise ConfigError("method.name", f"unknown method '{config.name}' (known: {known})")
    cls = REGISTRY[config.name]
    params = cls.parse_params(config.options)
    return cls(encoder, params, crop_size=crop_size, total_steps=total_steps)


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


def linear_warmup_then_constant(start: float, end: float, warmup_steps: int, total_steps: int) -> np.ndarray:
    """DINO's teacher temperature: linear from ``start`` to ``end`` over warm-up, then constant."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(int(warmup_steps), total_steps)
    warm = np.linspace(start, end, warmup_steps) if warmup_steps else np.array([])
    return np.concatenate([warm, np.full(total_steps - warmup_steps, end)]).astype(np.float64)


def schedule_at(schedule: np.ndarray, step: int) -> float:
    """Value at ``step``, holding the last value past the end (for steps beyond the plan)."""
    return float(schedule[min(max(step, 0), len(schedule) - 1)])


# --------------------------------------------------------------------------- EMA teacher


class EMATeacher(nn.Module):
    """A frozen copy of a student network updated as ``t = m * t + (1 - m) * s``.

    The momentum follows the global step (cosine from ``base`` to 1), not the step within an
    epoch: resumed and multi-process runs then see the same momentum at the same step.
    """

    def __init__(self, student: nn.Module, base_momentum: float, total_steps: int) -> None:
        super().__init__()
        self.module = copy.deepcopy(student)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.momentum_schedule = cosine_schedule(base_momentum, 1.0, total_steps)

    def momentum(self, step: int) -> float:
        return schedule_at(self.momentum_schedule, step)

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> float:
        m = self.momentum(step)
        for t, s in zip(self.module.parameters(), student.parameters(), strict=True):
            t.mul_(m).add_(s.detach(), alpha=1.0 - m)
        for t, s in zip(self.module.buffers(), student.buffers(), strict=True):
            t.copy_(s)
        return m

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.module(*args, **kwargs)


def embedding_std(z: Tensor) -> Tensor:
    """Collapse watch (SimSiam's diagnostic): per-dimension std of L2-normalised embeddings, times
    sqrt(d) so a healthy spread reads about 1 whatever the dimension, and collapse reads about 0."""
    z = torch.nn.functional.normalize(z.detach().float().flatten(1), dim=1)
    if z.shape[0] < 2:
        return z.new_tensor(float("nan"))
    return z.std(dim=0).mean() * math.sqrt(z.shape[1])


COLLAPSE_THRESHOLD = 0.1
"""``embedding_std`` below this (a tenth of the uniform-sphere value) counts as collapse."""
