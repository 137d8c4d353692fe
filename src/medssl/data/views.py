"""SSL views: random crops, augmentations and masks, built per sample on the CPU.

Every function takes an explicit ``numpy.random.Generator`` so a sample's views depend only on
its seed: resumed and multi-process runs see the same views for the same global sample index.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
import torch
from monai.transforms import RandGaussianNoise, RandGaussianSmooth, RandScaleIntensity, RandShiftIntensity
from monai.utils import convert_to_tensor
from torch import Tensor


def random_flip(x: Tensor, rng: np.random.Generator, prob: float = 0.5) -> Tensor:
    """Flip a (C, X, Y, Z) tensor along each spatial axis with probability ``prob``."""
    dims = [d + 1 for d in range(3) if rng.random() < prob]
    return torch.flip(x, dims=dims) if dims else x


def block_mask(grid: tuple[int, int, int], block: int, ratio: float, rng: np.random.Generator) -> Tensor:
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


def random_box_sides(
    spatial: tuple[int, ...],
    scale: tuple[float, float],
    ratio: tuple[float, float] | None,
    rng: np.random.Generator,
) -> list[int]:
    """Sides of a random box covering ``f ~ U(scale)`` of the region's volume.

    ``ratio=None`` keeps the region's proportions (each side ``f^(1/3)`` of the region's). With
    ``ratio`` (torchvision ``RandomResizedCrop.get_params`` in 3D): the box's side ratios Y/X and
    Z/X are drawn log-uniformly in ``ratio``; up to 10 draws that do not fit the region are
    retried, then the proportional box is used (torchvision falls back to a central crop).
    """
    fraction = rng.uniform(*scale)
    volume = fraction * float(np.prod(spatial))
    if ratio is not None:
        log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
        for _ in range(10):
            r_y, r_z = (math.exp(rng.uniform(log_lo, log_hi)) for _ in range(2))
            side_x = (volume / (r_y * r_z)) ** (1.0 / 3.0)
            sides = [int(round(side_x)), int(round(side_x * r_y)), int(round(side_x * r_z))]
            if all(0 < side <= s for side, s in zip(sides, spatial, strict=True)):
                return sides
    return [max(1, min(s, int(round(s * fraction ** (1.0 / 3.0))))) for s in spatial]


def random_resized_crop_3d(
    region: Tensor,
    out_size: int,
    scale: tuple[float, float],
    rng: np.random.Generator,
    ratio: tuple[float, float] | None = None,
) -> Tensor:
    """A random sub-box covering a fraction in ``scale`` of the region's volume, resized to ``out_size``^3.

    The 3D analogue of torchvision's ``RandomResizedCrop``: the fraction ``f ~ U(scale)`` sets the
    box's volume; its shape keeps the region's proportions (``ratio=None``) or has side ratios
    drawn in ``ratio`` (see :func:`random_box_sides`); the box's corner is uniform, and trilinear
    interpolation brings it to ``out_size``^3. ``region`` is (C, X, Y, Z).
    """
    lo, hi = scale
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"crop scale {scale} must satisfy 0 < lo <= hi <= 1")
    if ratio is not None and not 0.0 < ratio[0] <= ratio[1]:
        raise ValueError(f"crop ratio {ratio} must satisfy 0 < lo <= hi")
    spatial = tuple(region.shape[1:])
    sides = random_box_sides(spatial, scale, ratio, rng)
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
    region: Tensor,
    out_size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.3, 1.0),
    ratio: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor]:
    """Two independent random resized crops of one region (the positive pair of contrastive SSL)."""
    first = random_resized_crop_3d(region, out_size, scale, rng, ratio)
    return first, random_resized_crop_3d(region, out_size, scale, rng, ratio)


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
    solarize_prob: float = 0.0,
) -> Tensor:
    """Random intensity scale and shift, Gaussian noise, Gaussian blur (MONAI transforms), solarisation.

    The grey-level counterpart of the colour jitter and blur of 2D contrastive recipes: scaling
    multiplies by ``1 + U(-scale_factor, scale_factor)``, shifting adds ``U(-shift_offset,
    shift_offset)`` (intensities are normalised to about [0, 1]), noise has std up to
    ``noise_std``, blur a per-axis sigma in ``blur_sigma`` voxels (a 3D Gaussian); solarisation
    comes last, as in BYOL's and MoCo v3's pipelines (:func:`solarize`). Each transform is seeded
    from ``rng``; ``rng`` is not drawn for solarisation when ``solarize_prob`` is 0.
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
    out = convert_to_tensor(out, dtype=torch.float32, track_meta=False)
    if solarize_prob > 0.0 and rng.random() < solarize_prob:
        out = solarize(out)
    return out


SOLARIZE_THRESHOLD = 0.5
"""Half the normalised intensity range [0, 1] (CT windowed to [0, 1]), as PIL's 128 of 0-255."""


def solarize(x: Tensor, threshold: float = SOLARIZE_THRESHOLD) -> Tensor:
    """Invert intensities at or above ``threshold``: ``x -> 1 - x`` (PIL ``ImageOps.solarize``, which
    BYOL and MoCo v3 ``moco/loader.py`` ``Solarize`` apply, with the [0, 255] range mapped to [0, 1])."""
    return torch.where(x >= threshold, 1.0 - x, x)


# Rotations: axis a in {0, 1, 2} is a spatial axis of a (C, X, Y, Z) tensor -- the readers' (i, j, k)
# voxel order, RAS after preprocessing, the same order as MONAI's (C, H, W, D) -- and a rotation
# "about" it turns the plane of the two other spatial axes (tensor dims offset by the channel dim).
_ROTATION_PLANES = {0: (2, 3), 1: (1, 3), 2: (1, 2)}
# SwinUNETR-SSL's ``utils/ops.py`` ``rot_rand`` calls ``x.rot90(k, (2, 3))`` on one (C, H, W, D)
# sample: the (Y, Z) plane, i.e. about spatial axis 0 (X), which is ``rotate90_view(x, k, 0)`` here.
SWINUNETR_ROTATION_AXIS = 0
# The 4-way RotNet rotates a 2D image in its own plane; its 3D default turns the axial (X, Y)
# plane, about the last spatial axis (Z).
DEFAULT_ROTATION_AXIS: Final = 2  # Final: typed as the literal 2 (a valid Literal[0, 1, 2] axis)


def rotate90_view(x: Tensor, k: int, axis: int) -> Tensor:
    """Rotate a (C, X, Y, Z) tensor by ``k * 90`` degrees about spatial ``axis`` (0, 1 or 2)."""
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


def rotation_from_label(label: int, n_axes: int, single_axis: int = DEFAULT_ROTATION_AXIS) -> tuple[int, int]:
    """(k, axis) of a rotation class (see :func:`rotation_classes`); one axis rotates about ``single_axis``."""
    n = rotation_classes(n_axes)
    if not 0 <= label < n:
        raise ValueError(f"rotation label {label} outside [0, {n})")
    if n_axes == 1:
        return label, single_axis
    if label == 0:
        return 0, DEFAULT_ROTATION_AXIS
    axis, k_minus_one = divmod(label - 1, 3)
    return k_minus_one + 1, axis


def random_rotation_label(
    rng: np.random.Generator, n_axes: int = 1, single_axis: int = DEFAULT_ROTATION_AXIS
) -> tuple[int, int, int]:
    """A uniformly drawn rotation class: returns ``(label, k, axis)`` for :func:`rotate90_view`."""
    label = int(rng.integers(rotation_classes(n_axes)))
    k, axis = rotation_from_label(label, n_axes, single_axis)
    return label, k, axis


Box = tuple[slice, slice, slice, slice]


def cutout_boxes(
    spatial: tuple[int, int, int],
    rng: np.random.Generator,
    max_fraction: float = 0.3,
    max_box_fraction: float = 0.25,
    min_box_fraction: float = 0.05,
) -> list[Box]:
    """The boxes of SwinUNETR-SSL's ``utils/ops.py`` ``patch_rand_drop``, drawn as it draws them.

    A budget of ``U(0, max_fraction)`` of the voxels is drawn; boxes are added until the sum of
    their volumes (overlaps counted twice, as the reference counts) reaches it, so the last box may
    take the union up to one box (at most ``max_box_fraction^3`` of the volume) past the budget.
    A box starts uniformly in ``[0, side - tol)`` and spans ``[tol, max_box)`` voxels per axis
    (``tol = min_box_fraction * side``), clipped at the volume's edge.
    """
    if not 0.0 <= max_fraction <= 1.0:
        raise ValueError(f"cutout fraction {max_fraction} outside [0, 1]")
    budget = rng.uniform(0.0, max_fraction) * float(np.prod(spatial))
    tol = [max(1, int(min_box_fraction * s)) for s in spatial]
    longest = [max(t + 1, int(max_box_fraction * s)) for t, s in zip(tol, spatial, strict=True)]
    boxes: list[Box] = []
    counted = 0
    while counted < budget:
        starts = [int(rng.integers(0, max(s - t, 1))) for s, t in zip(spatial, tol, strict=True)]
        ends = [
            min(start + int(rng.integers(t, hi)), s)
            for start, t, hi, s in zip(starts, tol, longest, spatial, strict=True)
        ]
        boxes.append((slice(None), *(slice(a, b) for a, b in zip(starts, ends, strict=True))))  # type: ignore[arg-type]
        counted += int(np.prod([b - a for a, b in zip(starts, ends, strict=True)]))
    return boxes


def boxes_mask(boxes: list[Box], spatial: tuple[int, int, int]) -> Tensor:
    """Boolean (1, X, Y, Z) mask of the union of ``boxes``."""
    mask = torch.zeros((1, *spatial), dtype=torch.bool)
    for box in boxes:
        mask[box] = True
    return mask


def cutout(
    x: Tensor,
    rng: np.random.Generator,
    max_fraction: float = 0.3,
    fill: str | Tensor = "noise",
    max_box_fraction: float = 0.25,
    min_box_fraction: float = 0.05,
) -> tuple[Tensor, Tensor]:
    """SwinUNETR-SSL's inpainting corruption (``utils/ops.py`` ``patch_rand_drop``).

    Boxes from :func:`cutout_boxes`; each box gets Gaussian noise min-max scaled to [0, 1] (the
    reference's fill, in the [0, 1] range its CT window maps to; ``fill="noise"``), or the voxels at
    the same place of another volume (``fill`` a tensor shaped like ``x``). Returns the cut volume
    and the boolean mask (1, X, Y, Z) of replaced voxels.
    """
    if isinstance(fill, Tensor):
        if fill.shape != x.shape:
            raise ValueError(f"cutout donor shape {tuple(fill.shape)} differs from {tuple(x.shape)}")
    elif fill != "noise":
        raise ValueError(f"cutout fill must be 'noise' or a tensor, got {fill!r}")
    spatial = tuple(x.shape[1:])
    boxes = cutout_boxes(spatial, rng, max_fraction, max_box_fraction, min_box_fraction)  # type: ignore[arg-type]
    out = x.clone()
    for box in boxes:
        if isinstance(fill, Tensor):
            out[box] = fill[box].to(x.dtype)
        else:
            shape = out[box].shape
            noise = torch.from_numpy(rng.standard_normal(tuple(shape)).astype(np.float32))
            span = float(noise.max() - noise.min()) or 1.0
            out[box] = ((noise - noise.min()) / span).to(x.dtype)
    return out, boxes_mask(boxes, spatial)  # type: ignore[arg-type]
