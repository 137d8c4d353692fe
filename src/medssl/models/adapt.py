"""Fitting a pretrained encoder to a task: its input channels and its axis order.

Input channels. An encoder pretrained on 1-channel CT meets a 4-channel MRI task (or the reverse). Only the
patch embedding's kernel ``patch_embed.proj.weight`` (out, in, p, p, p) depends on the channel count, and
timm adapts it the documented way (``adapt_input_conv`` in huggingface/pytorch-image-models
``timm/models/_manipulate.py``): to one channel it sums the kernel over the input channels; to N channels it
tiles the kernels, keeps the first N and scales by I/N. Both keep the response to an input whose channels
are all equal, so the pretrained features start where they were. ``FinetuneConfig.input_channels`` picks:

- ``match`` (default): different counts are refused at the start, with one line;
- ``average``: every one of the N channels gets the sum over the I source kernels divided by N (timm's
  one-channel rule, spread evenly);
- ``repeat``: timm's tiling rule (N >= I; fewer channels than the encoder's take ``average``).

Axis order. A medssl encoder checkpoint records the orientation its corpus was resampled to; fine-tuning
compares it with the task's (:func:`axis_order_agreement`). The same axes in another order (``RAS`` against
``SAR``) mean the encoder would see every volume transposed: refused. Flipped directions (``RAS`` against
``LPS``) are recorded and logged. Foreign files declare no orientation, and nothing in their tensors can
reveal a transposition (cubic patch and window), so for them the check reads "unchecked".
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from medssl.config import AXIS_PAIRS, EncoderConfig
from medssl.errors import MedsslInputError

PATCH_KERNEL = "patch_embed.proj.weight"
ChannelMode = Literal["match", "repeat", "average"]


def adapt_patch_kernel(weight: Tensor, channels: int, mode: ChannelMode) -> Tensor:
    """``weight`` (out, I, p, p, p) refitted to ``channels`` input channels (see the module docstring)."""
    source = int(weight.shape[1])
    if mode == "average":
        return (weight.sum(dim=1, keepdim=True) / channels).repeat(1, channels, 1, 1, 1)
    if mode == "repeat":
        if channels < source:
            raise ValueError(f"repeat needs at least {source} channels")
        tiled = weight.repeat(1, math.ceil(channels / source), 1, 1, 1)[:, :channels]
        return tiled * (source / channels)
    raise ValueError(f"no adaptation for mode {mode!r}")


def adapt_input_channels(
    state: dict[str, Tensor], channels: int, mode: ChannelMode, source: str | Path
) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """The encoder ``state`` fitted to a task of ``channels`` input channels, and what was done (None when
    the counts agree). Refused (exit 2, one line naming ``source``) when they differ and ``mode`` is
    ``match``, or ``repeat`` is asked to drop channels."""
    weight = state.get(PATCH_KERNEL)
    if weight is None or weight.ndim != 5:
        return state, None  # missing or mis-shaped: the strict load that follows names it
    have = int(weight.shape[1])
    if have == channels:
        return state, None
    if mode == "match":
        raise MedsslInputError(
            source,
            f"the encoder takes {have} input channel(s), the task has {channels}: set input_channels=repeat or "
            "input_channels=average to adapt its patch embedding (timm's adapt_input_conv), or use an encoder "
            f"pretrained on {channels}-channel images",
        )
    if mode == "repeat" and channels < have:
        raise MedsslInputError(
            source,
            f"input_channels=repeat cannot fit a {have}-channel encoder to {channels} channel(s); "
            "use input_channels=average",
        )
    adapted = dict(state)
    with torch.no_grad():
        adapted[PATCH_KERNEL] = adapt_patch_kernel(weight.detach().float(), channels, mode).to(weight.dtype)
    return adapted, {"mode": mode, "from": have, "to": channels, "tensor": PATCH_KERNEL}


def _axes(codes: str) -> list[str]:
    return [next(p for p in AXIS_PAIRS if c in p) for c in codes]


def axis_order_agreement(meta: dict[str, Any], task_orientation: str, source: str | Path) -> str:
    """How an encoder's pretraining orientation compares with the task's: ``"same"``, ``"flipped: ..."``, or
    ``"unchecked: ..."`` when the checkpoint records none. Permuted axes are refused (exit 2)."""
    intensity = meta.get("intensity") if isinstance(meta.get("intensity"), dict) else {}
    theirs = intensity.get("orientation") if isinstance(intensity, dict) else None
    if not isinstance(theirs, str):
        why = "the file declares no orientation" if "source" in meta else "the checkpoint records no orientation"
        return f"unchecked: {why}; permuted axes cannot be told from the tensors (cubic patch and window)"
    if theirs == task_orientation:
        return "same"
    if _axes(theirs) != _axes(task_orientation):
        raise MedsslInputError(
            source,
            f"the encoder was pretrained on {theirs} volumes and the task is resampled to {task_orientation}: "
            "the same axes in another order, so it would see every volume transposed; set "
            f"preprocess.orientation={theirs} for this task",
        )
    return f"flipped: pretrained {theirs}, task {task_orientation} (same axis order, other directions)"


def fit_encoder(
    state: dict[str, Tensor] | None,
    meta: dict[str, Any],
    channels: int,
    orientation: str,
    mode: ChannelMode,
    source: str | Path,
) -> tuple[EncoderConfig, dict[str, Tensor] | None, dict[str, Any]]:
    """The encoder config and weights a fine-tuning run builds for a task of ``channels`` input channels
    resampled to ``orientation``, and what was checked or changed (recorded in run.json and results.json).
    A random init (``state`` None) simply takes the task's channel count."""
    config = EncoderConfig.model_validate(meta["encoder"])
    record: dict[str, Any] = {}
    if state is not None:
        record["axis_order"] = axis_order_agreement(meta, orientation, source)
        state, adaptation = adapt_input_channels(state, channels, mode, source)
        if adaptation is not None:
            record["input_channels"] = adaptation
    elif config.in_channels != channels:
        record["input_channels"] = {"mode": "random init", "from": config.in_channels, "to": channels}
    if config.in_channels != channels:
        config = EncoderConfig.model_validate({**config.model_dump(), "in_channels": channels})
    return config, state, record
