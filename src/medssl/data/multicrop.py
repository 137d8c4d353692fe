"""Multi-crop views for the self-distillation methods (DINO, iBOT, SMIT).

DINO's recipe in 3D: two *global* crops covering 0.4-1.0 of the region's volume, resized to the
training crop, and several *local* crops covering 0.05-0.4, resized to a smaller cube. The encoder
downsamples 32x, so every crop side is a multiple of 32: with 32^3 training crops the local crops
are 32^3 too (they still show less of the region, at a finer scale). SMIT instead takes
fixed-size crops at random positions of one larger region.

Augmentations follow DINO's asymmetry where it carries over to grey-level volumes: random flips,
intensity scale/shift (the colour jitter's counterpart), Gaussian blur with probability 1.0 on
the first global crop, 0.1 on the second and 0.5 on local crops. Solarisation has no meaningful
counterpart on CT intensities and is left out. Every function takes an explicit
``numpy.random.Generator``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from medssl.data.views import intensity_augment, random_flip, random_resized_crop_3d

ENCODER_STRIDE = 32
BLUR_SIGMA = (0.1, 2.0)  # voxels; DINO's blur radius range


def local_crop_size(crop_size: int) -> int:
    """Default local crop side: half the crop, rounded down to a multiple of 32 (at least 32)."""
    return max(ENCODER_STRIDE, (crop_size // 2) // ENCODER_STRIDE * ENCODER_STRIDE)


def distillation_augment(
    x: Tensor, rng: np.random.Generator, blur_prob: float, intensity_prob: float = 0.8, flip: bool = True
) -> Tensor:
    """Flip each axis (p 0.5, when ``flip``), jitter intensity scale and shift (p ``intensity_prob``),
    blur (p ``blur_prob``)."""
    if flip:
        x = random_flip(x, rng)
    return intensity_augment(
        x,
        rng,
        scale_prob=intensity_prob,
        shift_prob=intensity_prob,
        noise_prob=0.0,
        blur_prob=blur_prob,
        blur_sigma=BLUR_SIGMA,
    )


def multicrop_views(
    region: Tensor,
    rng: np.random.Generator,
    *,
    crop_size: int,
    n_local: int,
    local_size: int,
    global_scale: tuple[float, float] = (0.4, 1.0),
    local_scale: tuple[float, float] = (0.05, 0.4),
    global_blur_prob: tuple[float, float] = (1.0, 0.1),
    local_blur_prob: float = 0.5,
    intensity_prob: float = 0.8,
) -> dict[str, Tensor]:
    """Two global and ``n_local`` local augmented crops of a (C, D, H, W) region.

    Returns ``global_crops`` (2, C, S, S, S) with ``S = crop_size`` and, when ``n_local > 0``,
    ``local_crops`` (n_local, C, s, s, s) with ``s = local_size``.
    """
    for side in (crop_size, local_size):
        if side < ENCODER_STRIDE or side % ENCODER_STRIDE:
            raise ValueError(f"crop side {side} is not a multiple of {ENCODER_STRIDE}")
    globals_ = [
        distillation_augment(random_resized_crop_3d(region, crop_size, global_scale, rng), rng, blur, intensity_prob)
        for blur in global_blur_prob
    ]
    views = {"global_crops": torch.stack(globals_)}
    if n_local > 0:
        locals_ = [
            distillation_augment(
                random_resized_crop_3d(region, local_size, local_scale, rng), rng, local_blur_prob, intensity_prob
            )
            for _ in range(n_local)
        ]
        views["local_crops"] = torch.stack(locals_)
    return views


def region_crops(
    region: Tensor,
    crop_size: int,
    n_crops: int,
    rng: np.random.Generator,
    blur_prob: float = 0.0,
    intensity_prob: float = 0.8,
    flip: bool = True,
) -> Tensor:
    """``n_crops`` augmented ``crop_size``^3 crops at uniform random positions of one region (SMIT:
    ``flip=False, intensity_prob=0, blur_prob=0``, crops only).

    Returns (n_crops, C, S, S, S). Crops of one region overlap partly, which is what makes the
    cross-view distillation target informative.
    """
    spatial = region.shape[1:]
    if any(s < crop_size for s in spatial):
        raise ValueError(f"region {tuple(spatial)} is smaller than the crop {crop_size}")
    crops = []
    for _ in range(n_crops):
        start = [int(rng.integers(0, s - crop_size + 1)) for s in spatial]
        crop = region[
            :,
            start[0] : start[0] + crop_size,
            start[1] : start[1] + crop_size,
            start[2] : start[2] + crop_size,
        ].float()
        crops.append(distillation_augment(crop, rng, blur_prob, intensity_prob, flip))
    return torch.stack(crops)
