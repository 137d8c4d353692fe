"""SSL losses as pure functions of tensors: no modules, no state, each tested against its formula."""

from __future__ import annotations

import torch
from torch import Tensor


def masked_l1(prediction: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean absolute error over masked voxels only (SimMIM / SMIT reconstruction).

    ``mask`` broadcasts to ``prediction`` (1 = masked, counted). Unmasked voxels contribute
    nothing, whatever their values. Returns 0 when nothing is masked.
    """
    mask = mask.to(prediction.dtype).expand_as(prediction)
    total = (torch.abs(prediction - target) * mask).sum()
    return total / mask.sum().clamp_min(1.0)
