"""SSL views: random crops, augmentations and masks, built per sample on the CPU.

Every function takes an explicit ``numpy.random.Generator`` so a sample's views depend only on
its seed: resumed and multi-process runs see the same views for the same global sample index.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.transforms import RandGaussianNoise, RandGaussianSmooth, RandScaleIntensity, RandShiftIntensity
from monai.utils import convert_to_tensor
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


# --------------------------------------------------------------------------- contrastive / rotation views


def _seed_from(rng: np.random.Generator) -> int:
    return int(rng.integers(2**31))


def enlarged_region_side(crop_size: int, scale: float, multiple: int = 16) -> int:
    """Side of the region two crops are taken from: ``scale * crop_size`` rounded up to ``multiple``.

    Rounding up keeps the region at least as large as the crop, so two random crops differ.
    """
    if scale < 1.0:
        raise ValueError(f"region scale {scale} must be >= 1")
    return int(-(-int(math.ceil(crop_size * scale)) // multiple) * multiple)


def random_resized_crop_3d(
    region: Tensor, out_size: int, scale: tuple[float, float], rng: np.random.Generator
) -> Tensor:
    """A random sub-box covering a fraction in ``scale`` of the region's volume, resized to ``out_size``^3.

    The 3D analogue of RandomResizedCrop: the fraction ``f ~ U(scale)`` sets each side to
    ``f^(1/3)`` of the region's side (the box keeps the region's proportions), the box's corner is
    uniform, and trilinear interpolation brings it to ``out_size``^3. ``region`` is (C, D, H, W).
    """
    lo, hi = scale
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"crop scale {scale} must satisfy 0 < lo <= hi <= 1")
    fraction = rng.uniform(lo, hi)
    spatial = region.shape[1:]
    sides = [max(1, min(s, int(round(s * fraction ** (1.0 / 3.0))))) for s in spatial]
    starts = [int(rng.integers(0, s - side + 1)) for s, side in zip(spatial, sides, strict=True)]
    box = region[
        :,
        starts[0] : starts[0] + sides[0],
        starts[1] : starts[1] + sides[1],
        starts[2] : starts[2] + sides[2],
    ].float()
    if tuple(sides) == (out_size,) * 3:
        return box.clone()
    resized = torch.nn.functional.interpolate(
        box.unsqueeze(0), size=(out_size,) * 3, mode="trilinear", align_corners=False
    )
    return resized.squeeze(0)


def two_crops(
    region: Tensor, out_size: int, rng: np.random.Generator, scale: tuple[float, float] = (0.3, 1.0)
) -> tuple[Tensor, Tensor]:
    """Two independent random resized crops of one region (the positive pair of contrastive SSL)."""
    first = random_resized_crop_3d(region, out_size, scale, rng)
    return first, random_resized_crop_3d(region, out_size, scale, rng)


def intensity_augment(
    x: Tensor,
    rng: np.random.Generator,
    scale_prob: float = 0.8,
    scale_factor: float = 0.1,
    shift_prob: float = 0.8,
    shift_offset: float = 0.1,
    noise_prob: float = 0.2,
    noise_std: float = 0.05,
    blur_prob: float = 0.2,
    blur_sigma: tuple[float, float] = (0.5, 1.0),
) -> Tensor:
    """Random intensity scale and shift, Gaussian noise and Gaussian blur (MONAI transforms).

    The grey-level counterpart of the colour jitter and blur of 2D contrastive recipes: scaling
    multiplies by ``1 + U(-scale_factor, scale_factor)``, shifting adds ``U(-shift_offset,
    shift_offset)`` (intensities are normalised to about [0, 1]), noise has std up to
    ``noise_std``, blur a per-axis sigma in ``blur_sigma`` voxels. Each transform is seeded from
    ``rng``.
    """
    transforms = [
        RandScaleIntensity(factors=scale_factor, prob=scale_prob),
        RandShiftIntensity(offsets=shift_offset, prob=shift_prob),
        RandGaussianNoise(prob=noise_prob, mean=0.0, std=noise_std),
        RandGaussianSmooth(sigma_x=blur_sigma, sigma_y=blur_sigma, sigma_z=blur_sigma, prob=blur_prob),
    ]
    out = x.float()
    for transform in transforms:
        transform.set_random_state(seed=_seed_from(rng))
        out = transform(out)
    return convert_to_tensor(out, dtype=torch.float32, track_meta=False)


# Rotations: axis a in {0, 1, 2} is a spatial axis of a (C, D, H, W) tensor; a rotation "about" it
# turns the plane of the two other spatial axes (tensor dims offset by the channel dim).
_ROTATION_PLANES = {0: (2, 3), 1: (1, 3), 2: (1, 2)}
# The 4-way pretext rotates about the last spatial axis, as SwinUNETR's pretraining does.
DEFAULT_ROTATION_AXIS = 2


def rotate90_view(x: Tensor, k: int, axis: int) -> Tensor:
    """Rotate a (C, D, H, W) tensor by ``k * 90`` degrees about spatial ``axis`` (0, 1 or 2)."""
    if axis not in _ROTATION_PLANES:
        raise ValueError(f"rotation axis {axis} not in (0, 1, 2)")
    return torch.rot90(x, k=int(k) % 4, dims=_ROTATION_PLANES[axis]).contiguous()


def rotation_classes(n_axes: int) -> int:
    """Number of distinct rotation classes: 4 about one axis; 10 over three axes.

    Over three axes the three 0-degree rotations are the same view, so the classes are the
    identity plus 90/180/270 degrees about each axis (10, as in Taleb et al. 2020); counting the
    identity three times (12 classes) would ask the network to tell apart identical inputs.
    """
    if n_axes == 1:
        return 4
    if n_axes == 3:
        return 10
    raise ValueError(f"rotation axes must be 1 or 3, got {n_axes}")


def rotation_from_label(label: int, n_axes: int) -> tuple[int, int]:
    """(k, axis) of a rotation class (see :func:`rotation_classes`)."""
    n = rotation_classes(n_axes)
    if not 0 <= label < n:
        raise ValueError(f"rotation label {label} outside [0, {n})")
    if n_axes == 1:
        return label, DEFAULT_ROTATION_AXIS
    if label == 0:
        return 0, DEFAULT_ROTATION_AXIS
    axis, k_minus_one = divmod(label - 1, 3)
    return k_minus_one + 1, axis


def random_rotation_label(rng: np.random.Generator, n_axes: int = 1) -> tuple[int, int, int]:
    """A uniformly drawn rotation class: returns ``(label, k, axis)`` for :func:`rotate90_view`."""
    label = int(rng.integers(rotation_classes(n_axes)))
    k, axis = rotation_from_label(label, n_axes)
    return label, k, axis


def cutout(
    x: Tensor,
    rng: np.random.Generator,
    max_fraction: float = 0.3,
    fill: str | Tensor = "noise",
    max_box_fraction: float = 0.25,
    min_box_fraction: float = 0.05,
) -> tuple[Tensor, Tensor]:
    """SwinUNETR-SSL's inpainting corruption: random boxes whose union covers at most ``max_fraction``.

    A target fraction is drawn from ``U(0, max_fraction)``; boxes (each side between
    ``min_box_fraction`` and ``max_box_fraction`` of the volume's side) are added until their union
    reaches it, and a box that would push the union past ``max_fraction`` is not used. Cut voxels
    get Gaussian noise rescaled to the volume's intensity range (``fill="noise"``), or the voxels
    at the same place of another volume (``fill`` a tensor shaped like ``x``). Returns the cut
    volume and the boolean mask (1, D, H, W) of replaced voxels.
    """
    if not 0.0 <= max_fraction <= 1.0:
        raise ValueError(f"cutout fraction {max_fraction} outside [0, 1]")
    if isinstance(fill, Tensor):
        if fill.shape != x.shape:
            raise ValueError(f"cutout donor shape {tuple(fill.shape)} differs from {tuple(x.shape)}")
    elif fill != "noise":
        raise ValueError(f"cutout fill must be 'noise' or a tensor, got {fill!r}")
    spatial = x.shape[1:]
    total = float(np.prod(spatial))
    target = rng.uniform(0.0, max_fraction) * total
    mask = torch.zeros((1, *spatial), dtype=torch.bool)
    covered = 0
    # Bounded attempts: a box rejected for overshooting the cap ends the loop, as does the target.
    for _ in range(1000):
        if covered >= target:
            break
        lo = [max(1, int(min_box_fraction * s)) for s in spatial]
        hi = [max(lo_i, int(max_box_fraction * s)) for lo_i, s in zip(lo, spatial, strict=True)]
        sides = [int(rng.integers(a, b + 1)) for a, b in zip(lo, hi, strict=True)]
        starts = [int(rng.integers(0, s - side + 1)) for s, side in zip(spatial, sides, strict=True)]
        box = (
            slice(None),
            slice(starts[0], starts[0] + sides[0]),
            slice(starts[1], starts[1] + sides[1]),
            slice(starts[2], starts[2] + sides[2]),
        )
        new_covered = covered + int((~mask[box]).sum())
        if new_covered > max_fraction * total:
            break
        mask[box] = True
        covered = new_covered
    out = x.clone()
    if isinstance(fill, Tensor):
        donor = fill.to(x.dtype)
    else:
        noise = torch.from_numpy(rng.standard_normal(tuple(x.shape)).astype(np.float32)).to(x.dtype)
        lo_v, hi_v = float(x.min()), float(x.max())
        span = float(noise.max() - noise.min()) or 1.0
        donor = (noise - noise.min()) / span * (hi_v - lo_v) + lo_v
    full_mask = mask.expand_as(x)
    out[full_mask] = donor[full_mask]
    return out, mask
