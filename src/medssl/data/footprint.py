"""How large scans become after resampling, from their headers alone (no voxel is decoded).

Resampling to a finer spacing than a scan's own multiplies its voxels: 3 mm phantoms at the default
1.5 mm spacing have 8x as many. The volume cache on disk, the data every crop is drawn from and every
sliding-window prediction (validation and test) grow with them, so a fine-tune of a few steps can run
for many minutes. :func:`resampling_footprint` measures that factor before any work starts, so the
command line can say so (``medssl finetune``, ``medssl data ingest``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Warn when resampling gives this many times the voxels of the originals (or more).
UPSAMPLING_WARNING_FACTOR = 4.0
# Headers read at most: enough for a median, fast on a large corpus (the total is extrapolated).
MAX_HEADERS = 64
IMAGE_BYTES_PER_VOXEL = 2  # the cache's float16 image (data/cache.py)
LABEL_BYTES_PER_VOXEL = 1  # its uint8 label

Shape = tuple[int, int, int]
Triple = tuple[float, float, float]


@dataclass(frozen=True)
class Footprint:
    """Voxels before and after resampling to ``spacing`` over the scans whose headers were read, and
    the cache size those volumes need (extrapolated to ``n_volumes`` when fewer headers were read)."""

    spacing: Triple
    n_volumes: int
    n_read: int
    voxels_before: int
    voxels_after: int
    largest_after: int  # voxels of the largest volume after resampling
    cache_bytes: int
    median_shape_before: Shape
    median_shape_after: Shape
    median_spacing_before: Triple

    @property
    def factor(self) -> float:
        return self.voxels_after / self.voxels_before if self.voxels_before else 1.0

    @property
    def far_larger(self) -> bool:
        """Worth a warning: far larger, yet within ``limits.voxels_after_resampling`` (beyond it the
        preprocessing refuses the volume with its own one-line error, and a warning would only repeat it)."""
        from medssl.limits import limits

        within = self.largest_after <= limits().voxels_after_resampling
        return self.factor >= UPSAMPLING_WARNING_FACTOR and within

    def describe(self) -> str:
        """One sentence: the factor, the median shapes and spacings, the expected cache size."""
        before = "x".join(str(s) for s in self.median_shape_before)
        after = "x".join(str(s) for s in self.median_shape_after)
        return (
            f"resampling to spacing {_mm(self.spacing)} gives {self.factor:.1f}x the voxels of the originals "
            f"(median {before} at {_mm(self.median_spacing_before)} -> {after}); the cache of its "
            f"{self.n_volumes} volumes takes about {_bytes(self.cache_bytes)}"
        )


def _mm(spacing: Sequence[float]) -> str:
    values = [f"{float(s):.3g}" for s in spacing]
    return f"{values[0]} mm" if len(set(values)) == 1 else "x".join(values) + " mm"


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def header_geometry(path: str | Path) -> tuple[Shape, Triple] | None:
    """``(shape, spacing)`` of a NIfTI, NRRD or MetaImage file from its header; None for anything
    else (DICOM folders, .inv3 archives) or an unreadable header (the reader reports it later)."""
    path = Path(path)
    name = path.name.lower()
    if not path.is_file():
        return None
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        try:
            image: Any = nib.load(str(path))  # reads the header only
            shape, zooms = image.header.get_data_shape(), image.header.get_zooms()
        except Exception:  # noqa: BLE001 - a bad header is the reader's to report, with its own message
            return None
        if len(shape) < 3 or len(zooms) < 3:
            return None
        return _geometry(shape[:3], zooms[:3])
    if name.endswith((".nrrd", ".nhdr", ".mha", ".mhd")):
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            return None
        size, spacing = reader.GetSize(), reader.GetSpacing()
        if len(size) < 3:
            return None
        return _geometry(size[:3], spacing[:3])
    return None


def _geometry(shape: Sequence[int], spacing: Sequence[float]) -> tuple[Shape, Triple] | None:
    dims = tuple(int(s) for s in shape)
    mm = tuple(float(s) for s in spacing)
    if any(d < 1 for d in dims) or not all(math.isfinite(s) and s > 0 for s in mm):
        return None  # the reader refuses these with a clear message
    return (dims[0], dims[1], dims[2]), (mm[0], mm[1], mm[2])


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> Shape:
    """The shape after resampling to ``target``: the extent in mm (shape x spacing) is kept, as
    ``medssl.data.preprocess`` does; independent of how reorientation permutes the axes."""
    dims = [max(1, math.ceil(n * s / t - 1e-6)) for n, s, t in zip(shape, spacing, target, strict=True)]
    return dims[0], dims[1], dims[2]


def resampling_footprint(
    paths: Iterable[str | Path], spacing: Sequence[float], bytes_per_voxel: int = IMAGE_BYTES_PER_VOXEL
) -> Footprint | None:
    """The footprint of resampling ``paths`` to ``spacing``; None when no header could be read."""
    paths = list(paths)
    target = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
    read = [g for g in (header_geometry(p) for p in paths[:MAX_HEADERS]) if g is not None]
    if not read:
        return None
    before = [math.prod(shape) for shape, _ in read]
    after_shapes = [resampled_shape(shape, mm, target) for shape, mm in read]
    after = [math.prod(shape) for shape in after_shapes]
    scale = len(paths) / len(read)
    return Footprint(
        spacing=target,
        n_volumes=len(paths),
        n_read=len(read),
        voxels_before=sum(before),
        voxels_after=sum(after),
        largest_after=max(after),
        cache_bytes=int(sum(after) * bytes_per_voxel * scale),
        median_shape_before=_median_shape([shape for shape, _ in read]),
        median_shape_after=_median_shape(after_shapes),
        median_spacing_before=_median_spacing([mm for _, mm in read]),
    )


def _median_spacing(spacings: Sequence[Triple]) -> Triple:
    mm = [float(statistics.median(s[i] for s in spacings)) for i in range(3)]
    return mm[0], mm[1], mm[2]


def _median_shape(shapes: Sequence[Shape]) -> Shape:
    dims = [int(statistics.median_low(s[i] for s in shapes)) for i in range(3)]
    return dims[0], dims[1], dims[2]
