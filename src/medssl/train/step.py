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
6. clipping: the module's ``clip_gradients(max_norm)`` when it defines one, else global-norm,
7. optimiser step and scaler update,
8. the module's ``on_after_step(step)`` (EMA teachers, centres).
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
from medssl.methods.base import cosine_schedule, schedule_at

Forward = Callable[[Any, int], dict[str, Tensor]]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf: the run stops with its last good checkpoint kept."""


def param_groups(
    module: nn.Module, weight_decay: float, lr_scale: Callable[[str], float] | None = None
) -> list[dict[str, Any]]:
    """No weight decay on biases, norms, tokens and position tables (standard for ViT/Swin).

    ``lr_scale(name)`` gives a parameter's learning-rate multiplier (layer-wise decay, a slower
    encoder); parameters are grouped by (decay, multiplier) and each group carries ``lr_scale``,
    which :func:`train_step` applies to the scheduled learning rate at every step."""
    groups: dict[tuple[bool, float], dict[str, Any]] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        apply_wd = not (p.ndim <= 1 or name.endswith(".bias") or "token" in name or "position" in name)
        scale = float(lr_scale(name)) if lr_scale is not None else 1.0
        group = groups.setdefault(
            (apply_wd, scale),
            {
                "params": [],
                "weight_decay": weight_decay if apply_wd else 0.0,
                "apply_wd": apply_wd,
                "lr_scale": scale,
            },
        )
        group["params"].append(p)
    return [groups[key] for key in sorted(groups, key=lambda k: (not k[0], -k[1]))]


def module_param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The module's own ``param_groups(weight_decay)`` hook when it defines one, else :func:`param_groups`."""
    hook = getattr(module, "param_groups", None)
    groups = hook(weight_decay) if callable(hook) else param_groups(module, weight_decay)
    return [g for g in groups if g["params"]]


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

    module: nn.Module  # the unwrapped module: hooks, parameters, state dict
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
    groups = module_param_groups(module, schedule.weight_decay)
    optimizer = _adamw(groups, schedule) if groups else None
    wd_end = schedule.weight_decay if schedule.weight_decay_end is None else schedule.weight_decay_end
    amp_dtype = autocast_dtype(schedule.amp, device)
    return Optimisation(
        module=module,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16),
        lr_at=cosine_schedule(schedule.lr, schedule.min_lr, total_steps, schedule.warmup_steps),
        wd_at=cosine_schedule(schedule.weight_decay, wd_end, total_steps),
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
    hook = getattr(opt.module, "clip_gradients", None)
    if callable(hook):
        norm = hook(opt.grad_clip)
        return None if norm is None else float(norm)
    return float(torch.nn.utils.clip_grad_norm_(opt.module.parameters(), opt.grad_clip))


def train_step(opt: Optimisation, batch: Any, step: int, forward: Forward | None = None) -> StepResult:
    """One optimiser step of ``opt.module`` on ``batch`` (already on the device); see the module docstring.

    ``forward`` is what computes the outputs: the DDP-wrapped or compiled module in the loop, the
    module itself by default. Hooks, clipping and the optimiser always act on the unwrapped module.
    """
    forward = forward or opt.module
    module = opt.module
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
        cancel = getattr(module, "cancel_gradients", None)
        if callable(cancel):
            cancel(step)
        grad_norm = _clip(opt)
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
    after = getattr(module, "on_after_step", None)
    if callable(after):
        after(step)
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
