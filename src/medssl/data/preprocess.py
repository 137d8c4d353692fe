"""Raw volume -> training array: orientation, resampling and intensity normalisation (MONAI).

One function, ``preprocess_case``, is the only place a raw scan becomes network input, so every
encoder and every task sees volumes prepared the same way. Its output is what the volume cache
stores; the training loop never decodes or resamples a scan.

Order: check geometry and values -> ``Orientation`` -> ``Spacing`` (bilinear image, nearest label)
-> intensity (CT: fixed HU window to [0, 1]; MRI: per-volume percentiles to [0, 1]).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation, ScaleIntensityRange, ScaleIntensityRangePercentiles, Spacing

from medssl.config import PreprocessConfig
from medssl.data.readers import Volume
from medssl.errors import MedsslInputError, look_up_option
from medssl.limits import check

MODALITIES = ("ct", "mri")

# Image and label must share a grid. Relative tolerance on spacing/direction (as in `data check`),
# and an absolute one (in mm, scaled by the voxel size) on the origin: scanners and converters
# round headers differently, a genuine mismatch is far larger.
GEOMETRY_RTOL = 1e-3
# Axis labels of a RAS+ affine (nibabel's convention, which the readers produce); explicit so MONAI
# never guesses from the tensor's metadata.
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
ORIGIN_TOL_VOXELS = 1e-2


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size (mm) along each array axis: the column norms of the affine's 3x3 part."""
    norms = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    return (float(norms[0]), float(norms[1]), float(norms[2]))


def _check_finite(volume: Volume) -> None:
    bad = int(np.size(volume.array) - np.count_nonzero(np.isfinite(volume.array)))
    if bad:
        raise MedsslInputError(volume.source, f"contains {bad} NaN/inf voxels")


def check_same_grid(reference: Volume, other: Volume, what: str = "label") -> None:
    """Raise ``MedsslInputError(other.source, ...)`` unless ``other`` lies on ``reference``'s grid."""
    if tuple(other.array.shape) != tuple(reference.array.shape):
        raise MedsslInputError(
            other.source,
            f"{what} shape {tuple(other.array.shape)} differs from image shape {tuple(reference.array.shape)}",
        )
    ref_spacing = np.array(spacing_of(reference.affine))
    other_spacing = np.array(spacing_of(other.affine))
    if not np.allclose(other_spacing, ref_spacing, rtol=GEOMETRY_RTOL, atol=0):
        raise MedsslInputError(
            other.source,
            f"{what} spacing {tuple(np.round(other_spacing, 4))} differs from image spacing "
            f"{tuple(np.round(ref_spacing, 4))}",
        )
    ref_dir = np.asarray(reference.affine, dtype=np.float64)[:3, :3] / ref_spacing
    other_dir = np.asarray(other.affine, dtype=np.float64)[:3, :3] / other_spacing
    if not np.allclose(other_dir, ref_dir, atol=GEOMETRY_RTOL):
        raise MedsslInputError(other.source, f"{what} orientation (direction cosines) differs from the image")
    origin_gap = float(np.abs(np.asarray(other.affine)[:3, 3] - np.asarray(reference.affine)[:3, 3]).max())
    if origin_gap > ORIGIN_TOL_VOXELS * float(ref_spacing.max()):
        raise MedsslInputError(other.source, f"{what} origin differs from the image origin by {origin_gap:.3g} mm")


def _check_label_values(label: Volume) -> None:
    values = np.asarray(label.array)
    if not np.issubdtype(values.dtype, np.integer) and not np.all(np.equal(np.mod(values, 1), 0)):
        raise MedsslInputError(label.source, "label is not integer-valued")
    if values.size and values.min() < 0:
        raise MedsslInputError(label.source, f"label has negative value {int(values.min())}")
    if values.size and values.max() > np.iinfo(np.int16).max:
        raise MedsslInputError(label.source, f"label value {int(values.max())} exceeds the int16 range")


def _meta_tensor(array: np.ndarray, affine: np.ndarray) -> MetaTensor:
    """(C, X, Y, Z) float32 MetaTensor carrying the voxel->world affine (RAS, as nibabel)."""
    data = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return MetaTensor(data, affine=torch.as_tensor(np.asarray(affine, dtype=np.float64)))


def label_dtype(max_label: int) -> np.dtype:
    """uint8 when every class fits in a byte, else int16."""
    return np.dtype(np.uint8) if max_label <= 255 else np.dtype(np.int16)


def check_resampled_size(volume: Volume, config: PreprocessConfig) -> None:
    """Refuse, before resampling, a target spacing that would make the volume too large to hold.

    The extent in mm (shape x spacing) is kept, so the output has about extent / target voxels per
    axis; the product does not depend on how orientation permutes the axes."""
    extent = np.asarray(np.shape(volume.array)[:3], dtype=np.float64) * np.asarray(spacing_of(volume.affine))
    voxels = float(np.prod(np.ceil(extent / np.asarray(config.spacing, dtype=np.float64))))
    check(
        volume.source, f"voxels after resampling to spacing {tuple(config.spacing)}", voxels, "voxels_after_resampling"
    )


def preprocess_case(
    image: Volume | Sequence[Volume],
    label: Volume | None,
    modality: str,
    config: PreprocessConfig,
) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float, float]]:
    """Orient, resample and normalise one case.

    ``image`` is one volume, or one volume per channel (multi-channel MRI tasks: all channels must
    share a grid). Returns the image as float32 ``(X, Y, Z)`` (``(C, X, Y, Z)`` for several
    channels) in [0, 1], the label as uint8/int16 ``(X, Y, Z)`` (or None), and the final spacing.
    """
    look_up_option("modality", modality, MODALITIES, source=getattr(image, "source", None))
    channels = [image] if isinstance(image, Volume) else list(image)
    if not channels:
        raise ValueError("preprocess_case needs at least one image volume")
    reference = channels[0]
    for volume in channels:
        if np.asarray(volume.array).ndim != 3:
            raise MedsslInputError(volume.source, f"expected a 3D volume, got shape {np.shape(volume.array)}")
        _check_finite(volume)
    for volume in channels[1:]:
        check_same_grid(reference, volume, what="image channel")
    if label is not None:
        check_same_grid(reference, label, what="label")
        _check_label_values(label)

    check_resampled_size(reference, config)
    orient = Orientation(axcodes=config.orientation, labels=RAS_LABELS)
    # scale_extent: resample the voxel-edge extent, so 2 mm -> 1 mm exactly doubles the shape.
    resample = Spacing(pixdim=config.spacing, dtype=np.float32, scale_extent=True)
    stacked = np.stack([np.asarray(v.array, dtype=np.float32) for v in channels])
    image_t: Any = resample(orient(_meta_tensor(stacked, reference.affine)), mode="bilinear")
    out_shape = tuple(image_t.shape[1:])

    scale: ScaleIntensityRange | ScaleIntensityRangePercentiles
    if modality == "ct":
        low, high = config.ct_window
        scale = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
    else:
        low, high = config.mri_percentiles
        # Per channel: MRI channels (T1, T2, FLAIR...) have unrelated intensity scales.
        scale = ScaleIntensityRangePercentiles(low, high, 0.0, 1.0, clip=True, channel_wise=True)
    image_t = scale(image_t)
    image_out = np.asarray(image_t.detach().cpu().numpy(), dtype=np.float32)
    image_out = image_out[0] if image_out.shape[0] == 1 else image_out
    final_spacing = spacing_of(image_t.affine.detach().cpu().numpy())

    label_out = None
    if label is not None:
        label_values = np.rint(np.asarray(label.array, dtype=np.float32))[None]
        # The image's affine: the grids were checked equal, and one affine keeps them voxel-aligned.
        label_t = orient(_meta_tensor(label_values, reference.affine))
        label_t = resample(label_t, mode="nearest", output_spatial_shape=out_shape)
        label_np = np.rint(label_t.detach().cpu().numpy()[0])
        max_label = int(label_np.max()) if label_np.size else 0
        label_out = label_np.astype(label_dtype(max_label))
    return np.ascontiguousarray(image_out), label_out, final_spacing
