"""SSL views: random crops, augmentations and masks, built per sample on the CPU.

Every function takes an explicit ``numpy.random.Generator`` so a sample's views depend only on
its seed: resumed and multi-process runs see the same views for the same global sample index.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def random_flip(x: Tensor, rng: np.random.Generator, prob: float = 0.5) -> Tensor:
    """Flip a (C, D, H, W) tensor along each spatial axis with probability ``prob``."""
    dims = [d + 1 for d in range(3) if rng.random() < prob]
    return torch.flip(x, dims=dims) if dims else x


def block_mask(
    grid: tuple[int, int, int], block: int, ratio: float, rng: np.random.Generator
) -> Tensor:
    """SimMIM mask over a token grid: cubes of ``block`` tokens, ``round(ratio * n_blocks)`` masked.

    Returns a boolean tensor of shape ``grid`` (True = masked). A grid side that is not a multiple
    of ``block`` is covered by a partial block at the end.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio {ratio} outside [0, 1]")
    block = max(int(block), 1)
    coarse = tuple(-(-g // block) for g in grid)
    n_blocks = int(np.prod(coarse))
    n_masked = int(round(ratio * n_blocks))
    flat = np.zeros(n_blocks, dtype=bool)
    flat[rng.permutation(n_blocks)[:n_masked]] = True
    mask = flat.reshape(coarse)
    for axis in range(3):
        mask = np.repeat(mask, block, axis=axis)
    mask = mask[: grid[0], : grid[1], : grid[2]]
    return torch.from_numpy(np.ascontiguousarray(mask))


def upsample_mask(mask: Tensor, factor: int) -> Tensor:
    """Token mask (B, d, h, w) -> voxel mask (B, 1, d*f, h*f, w*f)."""
    m = mask
    for dim in (1, 2, 3):
        m = m.repeat_interleave(factor, dim=dim)
    return m.unsqueeze(1)
