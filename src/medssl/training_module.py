"""The training-module contract: what the one optimiser step (``train/step.py``) drives.

A training module is an ``nn.Module`` whose ``forward(batch, step)`` returns a dict with ``"loss"`` (the
total, with gradient) and detached scalars to log, and which has four hooks, named by
:class:`TrainingModule` and called by :func:`medssl.train.step.train_step` in this order:

1. ``param_groups(weight_decay)`` once, when the optimiser is built: AdamW's parameter groups (a group may
   carry ``lr_scale``, a learning-rate multiplier, and ``apply_wd``, whether the weight-decay schedule
   applies to it);
2. ``cancel_gradients(step)`` after backward: drop gradients that must not move weights this step (DINO's
   frozen prototypes in the first epoch, a frozen encoder during fine-tuning's warm phase);
3. ``clip_gradients(max_norm)`` when the schedule clips: clip and return the gradient norm before clipping
   (DINO's per-parameter clipping; global-norm clipping by default);
4. ``on_after_step(step)`` after the optimiser step: EMA teachers, centres and other per-step state.

:class:`TrainingHooks` implements all four with the defaults (weight decay on weights only, nothing
cancelled, global-norm clipping, nothing after the step); every SSL method (``methods/base.py``
``SSLMethod``) and the fine-tuning module (``train/finetune.py``) derive from it and override what they need.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class TrainingModule(Protocol):
    """The hooks :func:`medssl.train.step.train_step` calls (see the module docstring)."""

    def __call__(self, batch: Any, step: int) -> dict[str, Tensor]: ...

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]: ...

    def cancel_gradients(self, step: int) -> None: ...

    def clip_gradients(self, max_norm: float) -> float | None: ...

    def on_after_step(self, step: int) -> None: ...


def param_groups(
    module: nn.Module, weight_decay: float, lr_scale: Callable[[str], float] | None = None
) -> list[dict[str, Any]]:
    """No weight decay on biases, norms, tokens and position tables (standard for ViT/Swin).

    ``lr_scale(name)`` gives a parameter's learning-rate multiplier (layer-wise decay, a slower
    encoder); parameters are grouped by (decay, multiplier) and each group carries ``lr_scale``,
    which the training step applies to the scheduled learning rate at every step."""
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


class TrainingHooks(nn.Module):
    """The default hooks of a :class:`TrainingModule`; subclasses define ``forward(batch, step)``."""

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Weight decay on weights only (:func:`param_groups`), one learning rate."""
        return param_groups(self, weight_decay)

    def cancel_gradients(self, step: int) -> None:
        """Nothing is cancelled by default."""

    @torch.no_grad()
    def clip_gradients(self, max_norm: float) -> float | None:
        """Global-norm clipping (``torch.nn.utils.clip_grad_norm_``); returns the norm before clipping."""
        return float(torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm))

    def on_after_step(self, step: int) -> None:
        """No per-step state by default."""
