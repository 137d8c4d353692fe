"""The one optimiser step, shared by the training loop, the dry-run estimate, the benchmarks and the tests.

:func:`build_optimisation` turns a module and its :class:`~medssl.config.ScheduleConfig` into an
:class:`Optimisation` (parameter groups, AdamW, per-step learning-rate and weight-decay arrays,
autocast dtype, gradient scaler); :func:`train_step` then does, for one batch:

1. learning rate and weight decay of step ``step`` from the precomputed arrays (each group's
   ``lr_scale`` applied; weight decay only where the group has ``apply_wd``),
2. ``forward(batch, step)`` under autocast (bf16/fp16 on CUDA; fp32 on CPU),
3. a non-finite loss check (:class:`NonFiniteLossError`),
4. backward through the gradient scaler,
5. the module's ``cancel_gradients(step)`` (DINO freezes its last layer early on),
6. clipping (when the schedule clips): the module's ``clip_gradients(max_norm)``,
7. optimiser step and scaler update,
8. the module's ``on_after_step(step)`` (EMA teachers, centres).

The module is a :class:`~medssl.training_module.TrainingModule`: the hooks are named there and their
defaults are :class:`~medssl.training_module.TrainingHooks`; the schedules are ``medssl.schedules``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from medssl.config import ScheduleConfig
from medssl.schedules import lr_schedule, schedule_at, weight_decay_schedule
from medssl.training_module import TrainingModule

Forward = Callable[[Any, int], dict[str, Tensor]]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf: the run stops with its last good checkpoint kept."""


def module_param_groups(module: TrainingModule, weight_decay: float) -> list[dict[str, Any]]:
    """The module's ``param_groups(weight_decay)`` hook, empty groups dropped."""
    return [g for g in module.param_groups(weight_decay) if g["params"]]


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off" or device.type != "cuda":
        return None  # CPU autocast slows these models down; fp32 on CPU
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


@dataclass
class Optimisation:
    """Everything a step changes besides the weights, built once per run."""

    module: nn.Module  # the unwrapped module: parameters, state dict
    hooks: TrainingModule  # the same module, as the contract whose hooks the step calls
    optimizer: torch.optim.Optimizer | None  # None when nothing trains (random init)
    scaler: torch.amp.GradScaler
    lr_at: np.ndarray
    wd_at: np.ndarray
    amp_dtype: torch.dtype | None
    grad_clip: float | None
    device: torch.device

    def lr(self, step: int) -> float:
        return schedule_at(self.lr_at, step)


@dataclass
class StepResult:
    outputs: dict[str, Tensor]
    grad_norm: float | None

    @property
    def loss(self) -> Tensor:
        return self.outputs["loss"]


def training_module(module: nn.Module) -> TrainingModule:
    """``module`` as a :class:`~medssl.training_module.TrainingModule`; a ``TypeError`` naming the hooks it lacks."""
    if isinstance(module, TrainingModule):
        return module
    hooks = ("param_groups", "cancel_gradients", "clip_gradients", "on_after_step")
    missing = [name for name in hooks if not callable(getattr(module, name, None))]
    raise TypeError(
        f"{type(module).__name__} is not a training module: it lacks {', '.join(missing)} "
        "(derive it from medssl.training_module.TrainingHooks)"
    )


def _adamw(groups: list[dict[str, Any]], schedule: ScheduleConfig) -> torch.optim.Optimizer:
    """AdamW; torch's fused kernel (one pass over all parameters) where the parameters' device has it.

    Same update rule as the per-parameter loop; on the CPU it cut the demo's fine-tuning step by 6 % (the
    optimiser was 5 % of it: ``benchmarks/finetune_step.py --option adamw=fused``). torch < 2.4 has no fused
    CPU kernel and refuses at construction: the per-parameter loop then."""
    kwargs: dict[str, Any] = {"lr": schedule.lr, "weight_decay": schedule.weight_decay, "betas": schedule.betas}
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, **kwargs)


def build_optimisation(
    module: nn.Module, schedule: ScheduleConfig, total_steps: int, device: torch.device
) -> Optimisation:
    """AdamW over the module's parameter groups, with the schedule's per-step lr and weight decay."""
    hooks = training_module(module)
    groups = module_param_groups(hooks, schedule.weight_decay)
    optimizer = _adamw(groups, schedule) if groups else None
    amp_dtype = autocast_dtype(schedule.amp, device)
    return Optimisation(
        module=module,
        hooks=hooks,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16),
        lr_at=lr_schedule(schedule, total_steps),
        wd_at=weight_decay_schedule(schedule, total_steps),
        amp_dtype=amp_dtype,
        grad_clip=schedule.grad_clip,
        device=device,
    )


def _set_schedule(opt: Optimisation, step: int) -> None:
    assert opt.optimizer is not None
    lr, wd = schedule_at(opt.lr_at, step), schedule_at(opt.wd_at, step)
    for group in opt.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if group.get("apply_wd"):
            group["weight_decay"] = wd


def _clip(opt: Optimisation) -> float | None:
    if not opt.grad_clip:
        return None
    assert opt.optimizer is not None
    opt.scaler.unscale_(opt.optimizer)
    norm = opt.hooks.clip_gradients(opt.grad_clip)
    return None if norm is None else float(norm)


def train_step(opt: Optimisation, batch: Any, step: int, forward: Forward | None = None) -> StepResult:
    """One optimiser step of ``opt.module`` on ``batch`` (already on the device); see the module docstring.

    ``forward`` is what computes the outputs: the DDP-wrapped or compiled module in the loop, the
    module itself by default. Hooks, clipping and the optimiser always act on the unwrapped module.
    """
    forward = forward or opt.hooks
    if opt.optimizer is not None:
        _set_schedule(opt, step)
    with torch.autocast(opt.device.type, dtype=opt.amp_dtype, enabled=opt.amp_dtype is not None):
        outputs = forward(batch, step)
    loss = outputs["loss"]
    if not torch.isfinite(loss.detach()).all():
        raise NonFiniteLossError(f"loss is {float(loss.detach())} at step {step + 1}")
    grad_norm = None
    if opt.optimizer is not None and loss.requires_grad:
        opt.optimizer.zero_grad(set_to_none=True)
        opt.scaler.scale(loss).backward()
        opt.hooks.cancel_gradients(step)
        grad_norm = _clip(opt)
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
    opt.hooks.on_after_step(step)
    return StepResult(outputs=outputs, grad_norm=grad_norm)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock reading covers the step it follows."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_train_steps(opt: Optimisation, batch: Any, steps: int, warmup: int = 1, first_step: int = 0) -> list[float]:
    """Seconds of each of ``steps`` calls of :func:`train_step` on one batch, after ``warmup`` untimed
    ones (allocation, kernel selection): what the loop's ``step_seconds`` measures, minus data loading."""
    times = []
    for i in range(warmup + steps):
        synchronize(opt.device)
        t0 = time.perf_counter()
        train_step(opt, batch, first_step + i)
        synchronize(opt.device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times
