"""Encoder drift: how far fine-tuning moved each part of the encoder from where it started.

``drift = ||W_end - W_start|| / ||W_start||`` (Frobenius norms over all float tensors of a part), per
part: the patch embedding and each Swin stage (``layers{s}``: its blocks and its patch merging), and
the whole encoder. A recipe that leaves a pretrained stage at a drift near 1 has replaced it: the
weights it ends with are as far from the pretrained ones as those are from zero. The mask token
(frozen in a segmenter) and integer buffers (relative-position indices) are left out.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

ENCODER_PARTS = ("patch_embed", "stage1", "stage2", "stage3", "stage4")
_PREFIXES = {"patch_embed": "patch_embed.", **{f"stage{s}": f"layers{s}." for s in range(1, 5)}}


def _part(name: str) -> str | None:
    for part, prefix in _PREFIXES.items():
        if name.startswith(prefix):
            return part
    return None


def encoder_snapshot(encoder: nn.Module) -> dict[str, Tensor]:
    """A detached float copy of the encoder's weights that belong to a part (the starting point)."""
    return {
        k: v.detach().float().clone()
        for k, v in encoder.state_dict().items()
        if v.is_floating_point() and _part(k) is not None
    }


def encoder_drift(start: dict[str, Tensor], encoder: nn.Module) -> dict[str, float | None]:
    """Relative weight change of each part (``ENCODER_PARTS``) and of the whole (``"encoder"``) since
    ``start`` (an :func:`encoder_snapshot`); None for a part with no weights (e.g. the blocks of an
    identity-transformer stage are gone, but its patch merging stays, so a stage is never empty there)."""
    now = encoder.state_dict()
    change = dict.fromkeys(ENCODER_PARTS, 0.0)
    norm = dict.fromkeys(ENCODER_PARTS, 0.0)
    for key, before in start.items():
        part = _part(key)
        if part is None or key not in now:
            continue
        after = now[key].detach().float().to(before.device)
        change[part] += float(torch.sum((after - before) ** 2))
        norm[part] += float(torch.sum(before**2))
    drift: dict[str, float | None] = {
        part: math.sqrt(change[part] / norm[part]) if norm[part] > 0 else None for part in ENCODER_PARTS
    }
    total = sum(norm.values())
    drift["encoder"] = math.sqrt(sum(change.values()) / total) if total > 0 else None
    return drift
