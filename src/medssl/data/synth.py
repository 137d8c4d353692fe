"""Synthetic torso phantoms: one procedural anatomy, rendered as CT and as MRI.

A case's anatomy is a tissue map (air, fat, muscle, bowel, lungs, heart, spine, liver, spleen,
kidneys, stomach, aorta, IVC, ...) plus a lesion map, built from superquadric shapes with random
sizes (about +-25%), rotations and offsets inside a smoothly warped coordinate frame, so organs
differ in shape, size and position from case to case and a network cannot memorise one layout.

The same anatomy is rendered as CT (HU per tissue, per-case contrast jitter, texture, partial-volume
blur, Gaussian noise) and as MRI (T1- or T2-like signal per tissue, smooth multiplicative bias
field, Rician noise), so a CT task and an MRI task share their label maps exactly (CT->MRI
transfer). Everything is deterministic for a seed: the same seed gives the same bytes on disk.

Geometry lives in normalised coordinates of the field of view ([-1, 1] per axis), so any grid
size gives a whole torso; lesion radii are physical (mm) and use the voxel spacing. Array axes are
(x, y, z) in RAS+ orientation: +x towards the patient's right, +y anterior, +z superior; the
NIfTI affine is ``diag(spacing)`` with a per-case origin.

Seeds: case ``i`` of a task uses anatomy seed ``seed * 1_000_000 + offset + i``; the organ tasks
(``ct_organs`` and ``mri_organs`` share offset 0, hence anatomy), ``ct_lesions`` (offset 100_000)
and the unlabeled corpus (offset 500_000) never share a case, so no pretraining scan is a test case.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from medssl.data.readers import write_nifti
from medssl.errors import MedsslInputError
from medssl.fileio import atomic_write_text

ORGAN_LABELS: dict[int, str] = {1: "liver", 2: "spleen", 3: "kidney", 4: "stomach", 5: "aorta"}
LESION_LABELS: dict[int, str] = {1: "lesion"}

TaskKind = Literal["ct_organs", "ct_lesions", "mri_organs"]
TASK_KINDS: tuple[str, ...] = ("ct_organs", "ct_lesions", "mri_organs")
# "standard": one portal-venous protocol, little scanner spread (the demo's phantoms, unchanged).
# "scanners": every scan its own acquisition (contrast phase, dose/noise, reconstruction kernel,
# calibration; MRI: coil bias, noise, contrast), drawn from a separate seeded stream, so one or two
# labeled cases cannot show a network every appearance an organ has, while an unlabeled corpus can.
Variation = Literal["standard", "scanners"]
VARIATIONS: tuple[str, ...] = ("standard", "scanners")
# Lesion radius range, mm: 5-10 mm is 1-3 voxels at the demo's 4 mm spacing, too small for a short
# run to learn; a task may ask for larger lesions (``synth_task(..., lesion_radius_mm=(lo, hi))``).
LESION_RADIUS_MM: tuple[float, float] = (5.0, 10.0)

# Tissue codes of the anatomy's tissue map.
TISSUES: dict[str, int] = {
    "air": 0,
    "fat": 1,
    "muscle": 2,
    "visceral_fat": 3,
    "bowel": 4,
    "bowel_gas": 5,
    "lung": 6,
    "bone": 7,
    "marrow": 8,
    "disc": 9,
    "csf": 10,
    "heart": 11,
    "liver": 12,
    "spleen": 13,
    "kidney": 14,
    "stomach_wall": 15,
    "stomach_fluid": 16,
    "stomach_air": 17,
    "aorta": 18,
    "ivc": 19,
}

# Contrast-enhanced abdominal CT, HU (portal-venous-like: aorta and kidneys enhanced).
CT_HU: dict[str, float] = {
    "air": -1000.0,
    "fat": -100.0,
    "muscle": 40.0,
    "visceral_fat": -90.0,
    "bowel": 30.0,
    "bowel_gas": -900.0,
    "lung": -850.0,
    "bone": 700.0,
    "marrow": 220.0,
    "disc": 80.0,
    "csf": 10.0,
    "heart": 140.0,
    "liver": 60.0,
    "spleen": 50.0,
    "kidney": 150.0,
    "stomach_wall": 45.0,
    "stomach_fluid": 10.0,
    "stomach_air": -1000.0,
    "aorta": 200.0,
    "ivc": 130.0,
}

# Relative MR signal (proton density x relaxation contrast), 0..1. Blood vessels and the heart
# are flow voids; cortical bone, lung and air have almost no signal.
MRI_SIGNAL: dict[str, dict[str, float]] = {
    "t1": {
        "air": 0.0,
        "fat": 1.0,
        "muscle": 0.35,
        "visceral_fat": 0.95,
        "bowel": 0.40,
        "bowel_gas": 0.0,
        "lung": 0.03,
        "bone": 0.05,
        "marrow": 0.70,
        "disc": 0.35,
        "csf": 0.10,
        "heart": 0.25,
        "liver": 0.62,
        "spleen": 0.42,
        "kidney": 0.48,
        "stomach_wall": 0.40,
        "stomach_fluid": 0.12,
        "stomach_air": 0.0,
        "aorta": 0.08,
        "ivc": 0.10,
    },
    "t2": {
        "air": 0.0,
        "fat": 0.75,
        "muscle": 0.20,
        "visceral_fat": 0.70,
        "bowel": 0.45,
        "bowel_gas": 0.0,
        "lung": 0.03,
        "bone": 0.05,
        "marrow": 0.45,
        "disc": 0.70,
        "csf": 1.0,
        "heart": 0.20,
        "liver": 0.25,
        "spleen": 0.55,
        "kidney": 0.60,
        "stomach_wall": 0.35,
        "stomach_fluid": 0.95,
        "stomach_air": 0.0,
        "aorta": 0.05,
        "ivc": 0.08,
    },
}

# HU of the enhancing tissues per contrast phase ("portal" is CT_HU itself). Typical abdominal values:
# unenhanced organs within ~25 HU of muscle; arterial: bright aorta and renal cortex; delayed: washout.
CT_PHASES: dict[str, dict[str, float]] = {
    "native": {"aorta": 45.0, "ivc": 40.0, "heart": 45.0, "kidney": 35.0, "liver": 58.0, "spleen": 48.0},
    "arterial": {"aorta": 320.0, "ivc": 70.0, "heart": 260.0, "kidney": 190.0, "liver": 72.0, "spleen": 110.0},
    "portal": {},
    "delayed": {"aorta": 120.0, "ivc": 115.0, "heart": 110.0, "kidney": 140.0, "liver": 85.0, "spleen": 80.0},
}

_ORGAN_OF_TISSUE = {
    "liver": 1,
    "spleen": 2,
    "kidney": 3,
    "stomach_wall": 4,
    "stomach_fluid": 4,
    "stomach_air": 4,
    "aorta": 5,
}
_SEED_STRIDE = 1_000_000
_SEED_OFFSET = {"organs": 0, "lesions": 100_000, "corpus": 500_000}
_MAX_CASES = 100_000  # keeps the seed ranges of tasks and corpus disjoint
_MARKER = ".complete"


@dataclass(frozen=True)
class Lesion:
    """One lesion: its host organ, centre (voxel indices), radius and contrast against the host."""

    host: str  # "liver" | "kidney"
    center: tuple[int, int, int]
    radius_mm: float
    contrast: int  # -1 hypo-, +1 hyper-dense / -intense
    strength: float  # 0.6..1.0, scales the contrast


@dataclass
class Anatomy:
    """A case's anatomy on its voxel grid; renderers turn it into CT or MRI intensities."""

    seed: int
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    tissue: np.ndarray  # uint8 tissue codes (TISSUES)
    organs: np.ndarray  # uint8 organ labels (ORGAN_LABELS), lesions included in their host organ
    lesions: np.ndarray  # uint8 lesion instance ids (0 = none, k = lesions[k - 1])
    lesion_info: list[Lesion] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        x, y, z = self.tissue.shape
        return (int(x), int(y), int(z))

    @property
    def affine(self) -> np.ndarray:
        affine = np.diag([*self.spacing, 1.0])
        affine[:3, 3] = self.origin
        return affine

    def organ_labels(self) -> np.ndarray:
        return self.organs

    def lesion_labels(self) -> np.ndarray:
        """Binary lesion label map (LESION_LABELS)."""
        return (self.lesions > 0).astype(np.uint8)

    def body_mask(self) -> np.ndarray:
        return self.tissue != TISSUES["air"]


# ----------------------------------------------------------------------------------------------
# geometry helpers


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], scale: float) -> np.ndarray:
    """Zero-mean, unit-sd random field, correlated over about ``scale`` voxels.

    Short scales filter full-resolution noise directly. Long scales filter noise on a coarse grid
    (nodes ``scale / 2`` apart, padded past the edges) and interpolate it linearly: a few ms
    instead of a wide full-resolution filter, and no BLAS threads to contend for.
    """
    sigma = max(float(scale), 0.5)
    if sigma <= 3.0:
        out = ndimage.gaussian_filter(
            rng.standard_normal(tuple(shape), dtype=np.float32), sigma=sigma, truncate=3.0, mode="wrap"
        )
    else:
        step, pad = sigma / 2.0, 3.0 * sigma
        coarse = tuple(int(np.ceil((n + 2 * pad) / step)) + 2 for n in shape)
        out = ndimage.gaussian_filter(rng.standard_normal(coarse, dtype=np.float32), sigma=2.0, mode="nearest")
        for axis, n in enumerate(shape):
            t = (np.arange(n, dtype=np.float32) + np.float32(pad)) / np.float32(step)
            lower = np.floor(t).astype(np.intp)
            weight = (t - lower).reshape([-1 if a == axis else 1 for a in range(3)])
            out = np.take(out, lower, axis=axis) * (1 - weight) + np.take(out, lower + 1, axis=axis) * weight
    out -= out.mean()
    out /= out.std() + np.float32(1e-6)
    return np.ascontiguousarray(out, dtype=np.float32)


class _Frame:
    """Warped normalised coordinates of a grid, and painting of shapes into a tissue map."""

    def __init__(self, shape: tuple[int, int, int], rng: np.random.Generator, warp: float) -> None:
        self.shape = shape
        axes = [((np.arange(n, dtype=np.float32) + 0.5) / n * 2.0 - 1.0) for n in shape]
        grid = np.meshgrid(*axes, indexing="ij")
        # Smooth random displacement of the whole anatomy: organs bend and bulge between cases.
        scale = min(shape) / 4.0
        self.coords = [g + warp * _smooth_field(rng, shape, scale) for g in grid]
        self.warp_margin = 3.5 * warp
        self.tissue = np.zeros(shape, dtype=np.uint8)

    def box(self, center: Sequence[float], radius: Sequence[float]) -> tuple[slice, slice, slice]:
        """Index slices holding the normalised box ``center +- radius`` (plus the warp margin)."""
        slices = []
        for c, r, n in zip(center, radius, self.shape, strict=True):
            lo = (c - r - self.warp_margin + 1.0) * n / 2.0 - 0.5
            hi = (c + r + self.warp_margin + 1.0) * n / 2.0 - 0.5
            slices.append(slice(int(np.clip(np.floor(lo), 0, n)), int(np.clip(np.ceil(hi) + 1, 0, n))))
        return tuple(slices)  # type: ignore[return-value]

    def local(self, box: tuple[slice, ...], center: Sequence[float]) -> list[np.ndarray]:
        return [c[box] - np.float32(v) for c, v in zip(self.coords, center, strict=True)]

    def paint(self, box: tuple[slice, ...], mask: np.ndarray, tissue: str) -> None:
        self.tissue[box][mask] = TISSUES[tissue]


def _superquadric(
    frame: _Frame,
    center: Sequence[float],
    semi: Sequence[float],
    angles_deg: Sequence[float] = (0.0, 0.0, 0.0),
    exponent: float = 1.0,
    taper: float = 0.0,
    rough: np.ndarray | None = None,
    roughness: float = 0.0,
) -> tuple[tuple[slice, ...], np.ndarray]:
    """Inside-mask of a rotated, tapered superquadric (exponent 1 = ellipsoid, <1 boxier).

    ``taper`` scales the two minor axes along the local x axis (1 + taper * x): a wedge like the
    liver, thick on one side and thin on the other. ``rough`` (a unit-sd field) perturbs the
    surface by ``roughness`` of the level set.
    """
    reach = max(semi) * (1.0 + abs(taper)) * (1.0 + roughness) * 1.05
    box = frame.box(center, [reach] * 3)
    d = frame.local(box, center)
    if any(angles_deg):
        rot = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix().astype(np.float32)
        d = [rot[0, i] * d[0] + rot[1, i] * d[1] + rot[2, i] * d[2] for i in range(3)]
    q = [d[i] / np.float32(semi[i]) for i in range(3)]
    if taper:
        gain = np.maximum(1.0 + np.float32(taper) * q[0], np.float32(0.15))
        q[1] = q[1] / gain
        q[2] = q[2] / gain
    if exponent == 1.0:
        level = q[0] * q[0] + q[1] * q[1] + q[2] * q[2]
    else:
        power = np.float32(2.0 / exponent)
        level = np.abs(q[0]) ** power + np.abs(q[1]) ** power + np.abs(q[2]) ** power
    limit = 1.0 + roughness * rough[box] if rough is not None and roughness else 1.0
    return box, level < limit


def _tube(
    frame: _Frame, center_xy: tuple[np.ndarray, np.ndarray], radius: float, z_range: tuple[float, float]
) -> tuple[tuple[slice, ...], np.ndarray]:
    """A tube along z whose centre (x(z), y(z)) follows per-slice arrays of length shape[2]."""
    cx, cy = center_xy
    box = frame.box(
        (float(cx.mean()), float(cy.mean()), 0.0),
        (float(np.ptp(cx)) / 2 + radius, float(np.ptp(cy)) / 2 + radius, 1.0),
    )
    x, y, z = (c[box] for c in frame.coords)
    zsl = box[2]
    inside = (x - cx[zsl]) ** 2 + (y - cy[zsl]) ** 2 < np.float32(radius**2)
    return box, inside & (z > z_range[0]) & (z < z_range[1])


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _jitter(rng: np.random.Generator, values: Sequence[float], rel: float) -> list[float]:
    """Each value scaled by an independent factor in [1 - rel, 1 + rel]."""
    return [v * _u(rng, 1.0 - rel, 1.0 + rel) for v in values]


def _angles(rng: np.random.Generator, base: Sequence[float], spread: float) -> list[float]:
    return [b + _u(rng, -spread, spread) for b in base]


# ----------------------------------------------------------------------------------------------
# anatomy


def make_anatomy(
    seed: int,
    shape: Sequence[int] = (64, 64, 64),
    spacing: Sequence[float] = (3.0, 3.0, 3.0),
    lesion_radius_mm: tuple[float, float] = LESION_RADIUS_MM,
) -> Anatomy:
    """Build one case's anatomy (tissue map, organ labels, 1-3 lesions of ``lesion_radius_mm``) from ``seed``."""
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"phantom shape must be 3 sides of at least 16 voxels, got {shape}")
    spacing_t = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
    rng = np.random.default_rng(seed)
    frame = _Frame(shape, rng, warp=_u(rng, 0.03, 0.06))
    rough = _smooth_field(rng, shape, min(shape) / 8.0)
    x, y, z = frame.coords

    # Body: elliptic cylinder (chest slightly wider than the belly), subcutaneous fat, muscle wall.
    bx, by = _u(rng, -0.06, 0.06), _u(rng, -0.06, 0.06)
    ax, ay = 0.86 * _u(rng, 0.92, 1.06), 0.64 * _u(rng, 0.9, 1.06)
    fat, wall = _u(rng, 0.05, 0.11), _u(rng, 0.04, 0.07)
    widen = np.float32(1.0) + np.float32(_u(rng, 0.0, 0.06)) * z
    ring = ((x - bx) / (ax * widen)) ** 2 + ((y - by) / (ay * widen)) ** 2
    outer_fat = ring < 1.0
    muscle_wall = ((x - bx) / (ax * widen - fat)) ** 2 + ((y - by) / (ay * widen - fat)) ** 2 < 1.0
    iy = ay - fat - wall  # interior AP semi-axis at z = 0
    interior = ((x - bx) / (ax * widen - fat - wall)) ** 2 + ((y - by) / (ay * widen - fat - wall)) ** 2 < 1.0
    frame.tissue[outer_fat] = TISSUES["fat"]
    frame.tissue[muscle_wall] = TISSUES["muscle"]
    # Ribs: oblique bone bands in the muscle wall above the lower abdomen, not at the sternum.
    wall_idx = np.nonzero(muscle_wall & ~interior)
    wx, wy, wz = x[wall_idx], y[wall_idx], z[wall_idx]
    period = _u(rng, 0.16, 0.2)
    rib_phase = ((wz + 0.12 * np.abs(np.arctan2(wy - by, wx - bx)) + _u(rng, 0.0, period)) / period) % 1.0
    sternum = (wy > by) & (np.abs(wx - bx) < 0.15)
    ribs = (rib_phase < 0.3) & (wz > _u(rng, -0.45, -0.25)) & ~sternum
    frame.tissue[tuple(i[ribs] for i in wall_idx)] = TISSUES["bone"]
    # Interior: bowel loops in visceral fat, with a few gas pockets.
    loops = _smooth_field(rng, shape, min(shape) / 10.0)
    gas = _smooth_field(rng, shape, min(shape) / 16.0)
    frame.tissue[interior] = TISSUES["visceral_fat"]
    frame.tissue[interior & (loops > _u(rng, -0.3, 0.2))] = TISSUES["bowel"]
    frame.tissue[interior & (loops > 0.6) & (gas > 2.0)] = TISSUES["bowel_gas"]

    # Spine geometry (needed to place the aorta, kidneys and paraspinal muscles).
    sx = bx + _u(rng, -0.03, 0.03)
    sy = by - iy + _u(rng, 0.2, 0.25)  # vertebral body centre, just anterior of the back wall
    vb = (0.1 * _u(rng, 0.9, 1.1), 0.085 * _u(rng, 0.9, 1.1))

    # Paraspinal muscles.
    for side in (-1.0, 1.0):
        box, m = _superquadric(frame, (sx + side * 0.13, sy - 0.15, 0.0), (0.1, 0.08, 3.0), rough=rough, roughness=0.1)
        frame.paint(box, m & interior[box], "muscle")

    # Lungs (upper part), heart between them anteriorly.
    lung_base = _u(rng, 0.3, 0.45)
    for side in (-1.0, 1.0):
        semi = _jitter(rng, (0.33, 0.45, 0.6), 0.12)
        center = (bx + side * _u(rng, 0.34, 0.42), by + _u(rng, -0.1, 0.0), lung_base + semi[2])
        box, m = _superquadric(frame, center, semi, _angles(rng, (10.0, 0.0, 0.0), 8.0), rough=rough, roughness=0.08)
        frame.paint(box, m & interior[box], "lung")
    heart_c = (bx + _u(rng, -0.12, -0.02), by + _u(rng, 0.12, 0.2), lung_base + _u(rng, 0.35, 0.5))
    box, m = _superquadric(frame, heart_c, _jitter(rng, (0.26, 0.22, 0.26), 0.15), _angles(rng, (0, 0, 20), 15))
    frame.paint(box, m & interior[box], "heart")

    # Liver: large wedge on the right, its dome under the right lung.
    liver_semi = _jitter(rng, (0.45, 0.32, 0.29), 0.25)
    liver_c = (bx + _u(rng, 0.2, 0.38), by + _u(rng, -0.1, 0.1), _u(rng, 0.0, 0.25))
    box, m = _superquadric(
        frame,
        liver_c,
        liver_semi,
        _angles(rng, (0, 0, 0), 15),
        _u(rng, 0.8, 1.1),
        taper=_u(rng, 0.25, 0.45),
        rough=rough,
        roughness=0.15,
    )
    frame.paint(box, m & interior[box], "liver")

    # Spleen: left, posterior, long axis along the posterolateral wall.
    spleen_semi = _jitter(rng, (0.1, 0.21, 0.24), 0.25)
    spleen_c = (bx - _u(rng, 0.44, 0.54), by + _u(rng, -0.28, -0.14), _u(rng, 0.1, 0.35))
    box, m = _superquadric(
        frame, spleen_c, spleen_semi, _angles(rng, (0, 0, -40), 15), _u(rng, 0.8, 1.0), rough=rough, roughness=0.12
    )
    frame.paint(box, m & interior[box], "spleen")

    # Kidneys: posterior, beside the spine, the right one lower (pushed down by the liver).
    kidney_masks = []
    for side in (1.0, -1.0):
        semi = _jitter(rng, (0.14, 0.095, 0.27), 0.25)
        drop = 0.08 if side > 0 else 0.0
        center = (sx + side * _u(rng, 0.26, 0.34), sy + _u(rng, 0.0, 0.08), _u(rng, -0.45, -0.25) - drop)
        box, m = _superquadric(
            frame,
            center,
            semi,
            _angles(rng, (0, side * 15, side * -20), 10),
            _u(rng, 0.85, 1.0),
            rough=rough,
            roughness=0.1,
        )
        m &= interior[box]
        frame.paint(box, m, "kidney")
        kidney_masks.append((box, m))

    # Stomach: left upper, anterior; wall, fluid and (supine: anterior) gas above the fluid level.
    st_semi = _jitter(rng, (0.2, 0.15, 0.22), 0.25)
    st_c = (bx - _u(rng, 0.18, 0.3), by + _u(rng, 0.12, 0.25), _u(rng, 0.15, 0.35))
    st_ang = _angles(rng, (0, 30, 0), 15)
    box, m = _superquadric(frame, st_c, st_semi, st_ang, rough=rough, roughness=0.1)
    m &= interior[box]
    frame.paint(box, m, "stomach_wall")
    inner_semi = [s - 0.03 for s in st_semi]
    ibox, lumen = _superquadric(frame, st_c, inner_semi, st_ang, rough=rough, roughness=0.1)
    lumen &= interior[ibox]
    frame.paint(ibox, lumen, "stomach_fluid")
    gas_level = st_c[1] + st_semi[1] * _u(rng, 0.1, 1.2)  # above 1: no gas
    frame.paint(ibox, lumen & (frame.coords[1][ibox] > gas_level), "stomach_air")

    # Spine: vertebral bodies (cortex, marrow, discs), posterior arch around the canal.
    box, body_mask = _superquadric(frame, (sx, sy, 0.0), (vb[0], vb[1], 3.0), exponent=0.9)
    _, marrow = _superquadric(frame, (sx, sy, 0.0), (vb[0] * 0.78, vb[1] * 0.78, 3.0), exponent=0.9)
    disc_period = _u(rng, 0.15, 0.19)
    discs = ((frame.coords[2][box] + _u(rng, 0.0, disc_period)) / disc_period) % 1.0 < 0.22
    frame.paint(box, body_mask, "bone")
    frame.paint(box, marrow, "marrow")
    frame.paint(box, body_mask & discs, "disc")
    arch_c = (sx, sy - vb[1] - 0.055, 0.0)
    box, arch = _superquadric(frame, arch_c, (0.065, 0.06, 3.0))
    _, canal = _superquadric(frame, arch_c, (0.035, 0.032, 3.0))
    frame.paint(box, arch, "bone")
    frame.paint(box, canal, "csf")
    sp_c = (sx, arch_c[1] - 0.1, 0.0)
    box, spinous = _superquadric(frame, sp_c, (0.02, 0.06, 3.0), exponent=0.5)
    frame.paint(box, spinous, "bone")

    # Aorta (left of midline, anterior to the spine) and IVC (right), tubes along z.
    zc = (np.arange(shape[2], dtype=np.float32) + 0.5) / shape[2] * 2.0 - 1.0
    ao_r = _u(rng, 0.055, 0.07)
    wobble = _u(rng, 0.0, 0.03) * np.sin(np.float32(_u(rng, 1.5, 3.0)) * zc + np.float32(_u(rng, 0, 6.3)))
    ao_x = np.float32(sx - _u(rng, 0.04, 0.08)) + wobble.astype(np.float32)
    ao_y = np.full_like(zc, sy + vb[1] + ao_r + _u(rng, 0.005, 0.03))
    ivc_x = np.full_like(zc, sx + _u(rng, 0.08, 0.13))
    ivc_y = np.full_like(zc, sy + vb[1] + _u(rng, 0.07, 0.11))
    box, ivc = _tube(frame, (ivc_x, ivc_y), _u(rng, 0.04, 0.055), (-2.0, lung_base + 0.2))
    frame.paint(box, ivc & interior[box], "ivc")
    box, aorta = _tube(frame, (ao_x, ao_y), ao_r, (-2.0, 2.0))
    frame.paint(box, aorta & interior[box], "aorta")

    tissue = frame.tissue
    organs = np.zeros(shape, dtype=np.uint8)
    for name, label in _ORGAN_OF_TISSUE.items():
        organs[tissue == TISSUES[name]] = label

    lesions, info = _place_lesions(rng, organs, spacing_t, lesion_radius_mm)
    ox, oy, oz = (-s * n / 2.0 + _u(rng, -20.0, 20.0) for s, n in zip(spacing_t, shape, strict=True))
    return Anatomy(
        seed=int(seed),
        spacing=spacing_t,
        origin=(ox, oy, oz),
        tissue=tissue,
        organs=organs,
        lesions=lesions,
        lesion_info=info,
    )


def _place_lesions(
    rng: np.random.Generator,
    organs: np.ndarray,
    spacing: tuple[float, float, float],
    radius_mm: tuple[float, float] = LESION_RADIUS_MM,
) -> tuple[np.ndarray, list[Lesion]]:
    """1-3 blob lesions (radius drawn from ``radius_mm``, 5-10 mm by default) fully inside the liver or a
    kidney, not touching each other.

    A centre is drawn among host voxels at least the radius away from the host's surface (EDT,
    in mm); where no host voxel is that deep, the radius shrinks to the deepest voxel's depth.
    """
    lesions = np.zeros(organs.shape, dtype=np.uint8)
    info: list[Lesion] = []
    kidneys, _ = ndimage.label(organs == 3)
    for _ in range(int(rng.integers(1, 4))):
        if rng.random() < 0.7 or kidneys.max() == 0:
            host_name, host = "liver", organs == 1
        else:
            host_name = "kidney"
            host = kidneys == int(rng.integers(1, kidneys.max() + 1))
        host &= ~ndimage.binary_dilation(lesions > 0, iterations=2)
        if not host.any():
            continue
        box = ndimage.find_objects(host.astype(np.uint8))[0]
        depth = ndimage.distance_transform_edt(np.pad(host[box], 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
        radius = _u(rng, *radius_mm)
        min_voxel = min(spacing)
        if depth.max() < radius + 0.5 * min_voxel:
            radius = max(float(depth.max()) - 0.5 * min_voxel, min_voxel)
        candidates = np.argwhere(depth >= radius)
        if len(candidates) == 0:
            candidates = np.argwhere(depth == depth.max())
        local_center = candidates[int(rng.integers(len(candidates)))]
        cx, cy, cz = (int(c + b.start) for c, b in zip(local_center, box, strict=True))
        center = (cx, cy, cz)
        # Blob: a sphere whose radius wobbles by direction (random low-order harmonics).
        reach = [int(np.ceil(1.4 * radius / s)) + 1 for s in spacing]
        sl = tuple(slice(max(c - r, 0), min(c + r + 1, n)) for c, r, n in zip(center, reach, organs.shape, strict=True))
        d = [(np.arange(s.start, s.stop) - c) * sp for s, c, sp in zip(sl, center, spacing, strict=True)]
        dx, dy, dz = np.meshgrid(*d, indexing="ij")
        dist = np.sqrt(dx**2 + dy**2 + dz**2) + 1e-6
        wobble = 1.0 + 0.2 * (rng.uniform(-1, 1) * dx + rng.uniform(-1, 1) * dy + rng.uniform(-1, 1) * dz) / dist
        wobble += 0.15 * rng.uniform(-1, 1) * (dx * dy) / dist**2
        blob = (dist < radius * wobble) & host[sl]
        blob[tuple(c - s.start for c, s in zip(center, sl, strict=True))] = True
        lesions[sl][blob] = len(info) + 1
        info.append(
            Lesion(
                host=host_name,
                center=center,
                radius_mm=round(radius, 3),
                contrast=1 if rng.random() < 0.4 else -1,
                strength=_u(rng, 0.6, 1.0),
            )
        )
    return lesions, info


# ----------------------------------------------------------------------------------------------
# rendering


def _lut(
    values: dict[str, float], rng: np.random.Generator, jitter_abs: float = 0.0, jitter_rel: float = 0.0
) -> np.ndarray:
    """Tissue code -> intensity, each tissue jittered per case (contrast timing, scanner)."""
    lut = np.zeros(max(TISSUES.values()) + 1, dtype=np.float32)
    for name, code in TISSUES.items():
        v = values[name]
        if name not in ("air", "stomach_air", "bowel_gas"):
            v = v * (1.0 + rng.uniform(-jitter_rel, jitter_rel)) + rng.uniform(-jitter_abs, jitter_abs)
        lut[code] = v
    return lut


@dataclass(frozen=True)
class CTProtocol:
    """The acquisition of one CT scan. ``None`` fields are drawn by the render itself (the standard
    protocol's per-case spread); ``gain``/``offset`` are the scanner's HU calibration."""

    phase: str = "portal"  # a key of CT_PHASES
    noise: float | None = None  # noise sd, HU
    blur: float | None = None  # reconstruction blur sigma, voxels
    texture: float | None = None  # soft-tissue texture amplitude, HU
    gain: float = 1.0
    offset: float = 0.0


def _check_variation(variation: str) -> None:
    if variation not in VARIATIONS:
        raise ValueError(f"phantom variation must be one of {', '.join(VARIATIONS)}, got {variation!r}")


def ct_protocol(seed: int, variation: Variation = "standard") -> CTProtocol:
    """The acquisition of a scan: ``"standard"`` is the one portal-venous protocol; ``"scanners"`` draws
    phase, dose, kernel, texture and calibration from ``default_rng([seed, 4])``, a stream of its own, so
    the anatomy and the standard renders do not change."""
    _check_variation(variation)
    if variation == "standard":
        return CTProtocol()
    rng = np.random.default_rng([int(seed), 4])
    return CTProtocol(
        phase=str(rng.choice(list(CT_PHASES))),
        noise=_u(rng, 6.0, 35.0),  # low-dose to smooth-kernel
        blur=_u(rng, 0.4, 1.3),  # sharp kernel to soft kernel / thick slices
        texture=_u(rng, 3.0, 12.0),
        gain=_u(rng, 0.93, 1.07),  # calibration drift between scanners
        offset=_u(rng, -20.0, 20.0),
    )


def render_ct(anatomy: Anatomy, seed: int, variation: Variation = "standard") -> np.ndarray:
    """CT of ``anatomy`` in HU (float32): per-tissue HU, texture, lesions, blur, noise sd 10-18 HU.

    ``variation="scanners"``: the acquisition of ``ct_protocol`` (contrast phase, noise, blur, texture,
    calibration) instead of one portal-venous protocol.
    """
    protocol = ct_protocol(seed, variation)
    rng = np.random.default_rng([int(seed), 1])
    image = _lut({**CT_HU, **CT_PHASES[protocol.phase]}, rng, jitter_abs=6.0)[anatomy.tissue]
    soft = (anatomy.tissue != TISSUES["air"]) & (image > -200)
    texture = _u(rng, 4.0, 8.0) if protocol.texture is None else protocol.texture
    image += np.where(soft, np.float32(texture) * _smooth_field(rng, anatomy.shape, 2.0), 0)
    for k, lesion in enumerate(anatomy.lesion_info, start=1):
        image[anatomy.lesions == k] += np.float32(lesion.contrast * lesion.strength * 70.0)
    blur = _u(rng, 0.5, 0.8) if protocol.blur is None else protocol.blur
    image = ndimage.gaussian_filter(image, sigma=blur)  # partial volume / reconstruction
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    image += noise * np.float32(_u(rng, 10.0, 18.0) if protocol.noise is None else protocol.noise)
    image = image * np.float32(protocol.gain) + np.float32(protocol.offset)
    return np.clip(image, -1024.0, 3071.0).astype(np.float32, copy=False)


def render_mri(anatomy: Anatomy, seed: int, weighting: str = "t1", variation: Variation = "standard") -> np.ndarray:
    """MRI of ``anatomy`` (float32, >= 0, arbitrary units): T1/T2-like contrast, bias field, Rician noise.

    ``variation="scanners"``: per-scan contrast spread 15% instead of 6%, a bias field up to twice as
    strong and noise sd 1-6% instead of 1.5-3% of the signal range (drawn from ``[seed, 5]``).
    """
    if weighting not in MRI_SIGNAL:
        raise ValueError(f"MRI weighting must be one of {sorted(MRI_SIGNAL)}, got {weighting!r}")
    _check_variation(variation)
    scanner = np.random.default_rng([int(seed), 5]) if variation == "scanners" else None
    rng = np.random.default_rng([int(seed), 2])
    contrast_spread = 0.15 if scanner is not None else 0.06
    signal = _lut(MRI_SIGNAL[weighting], rng, jitter_rel=contrast_spread)[anatomy.tissue]
    signal *= 1.0 + np.float32(_u(rng, 0.02, 0.05)) * _smooth_field(rng, anatomy.shape, 2.0)
    for k, lesion in enumerate(anatomy.lesion_info, start=1):
        # Cyst-like (hypodense) lesions: dark on T1, bright on T2; hypervascular ones: bright on both.
        if weighting == "t1":
            factor = 1.0 + lesion.contrast * lesion.strength * 0.45
        else:
            factor = 1.0 + lesion.strength * (0.9 if lesion.contrast < 0 else 0.45)
        signal[anatomy.lesions == k] *= np.float32(factor)
    signal = ndimage.gaussian_filter(signal, sigma=_u(rng, 0.6, 0.9))
    bias = _bias_field(rng, anatomy.shape)
    if scanner is not None:
        bias = bias ** np.float32(_u(scanner, 1.0, 2.0))  # a stronger coil profile
    signal *= bias
    sigma = np.float32(_u(rng, 0.015, 0.03))
    if scanner is not None:
        sigma = np.float32(_u(scanner, 0.01, 0.06))
    real = signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    magnitude = np.sqrt(real * real + imag * imag)  # Rician: magnitude of complex Gaussian data
    return (magnitude * np.float32(_u(rng, 400.0, 1200.0))).astype(np.float32, copy=False)


def _bias_field(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Smooth multiplicative field exp(quadratic polynomial), roughly 0.7..1.4 over the volume."""
    axes = [((np.arange(n, dtype=np.float32) + 0.5) / n * 2.0 - 1.0) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    terms = [x, y, z, x * x - 1 / 3, y * y - 1 / 3, z * z - 1 / 3, x * y, y * z, x * z]
    coefs = np.concatenate([rng.normal(0, 0.12, 3), rng.normal(0, 0.06, 6)]).astype(np.float32)
    log_field = sum(c * t for c, t in zip(coefs, terms, strict=True))
    return np.exp(np.broadcast_to(log_field, shape)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# files


def case_seed(seed: int, domain: str, index: int) -> int:
    """Anatomy seed of case ``index`` of a domain ("organs", "lesions", "corpus") for base ``seed``."""
    if not 0 <= index < _MAX_CASES:
        raise ValueError(f"case index {index} outside [0, {_MAX_CASES})")
    return int(seed) * _SEED_STRIDE + _SEED_OFFSET[domain] + int(index)


def _case_spacing(seed: int, spacing: Sequence[float], jitter: bool) -> tuple[float, float, float]:
    """Per-case voxel spacing: in-plane and through-plane each within +-5% when ``jitter``."""
    if not jitter:
        return tuple(float(s) for s in spacing)  # type: ignore[return-value]
    rng = np.random.default_rng([int(seed), 3])
    inplane, through = rng.uniform(0.95, 1.05, 2)
    return (
        round(float(spacing[0] * inplane), 4),
        round(float(spacing[1] * inplane), 4),
        round(float(spacing[2] * through), 4),
    )


def _params(**values: object) -> dict[str, object]:
    return json.loads(json.dumps(values))  # tuples -> lists, so it compares equal to the stored JSON


def _is_complete(folder: Path, params: dict[str, object]) -> bool:
    marker = folder / _MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")) == params
    except (OSError, json.JSONDecodeError):
        return False


def _start(folder: Path, subdirs: Sequence[str]) -> None:
    """Prepare a folder for (re)generation: the marker goes first, so a crash leaves it incomplete."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / _MARKER).unlink(missing_ok=True)
    for sub in subdirs:
        (folder / sub).mkdir(exist_ok=True)


def _remove_stale(directory: Path, prefix: str, keep: set[str]) -> None:
    """Delete case files of an earlier, larger generation (only files named like ours)."""
    ours = re.compile(rf"^{prefix}_\d+\.nii\.gz$")
    for path in directory.iterdir():
        if ours.match(path.name) and path.name not in keep:
            path.unlink()


def _check_request(n: int, what: str, shape: Sequence[int], spacing: Sequence[float]) -> None:
    if not 1 <= int(n) < _MAX_CASES:
        raise MedsslInputError(what, f"number of synthetic cases must be in [1, {_MAX_CASES}), got {n}")
    if len(shape) != 3 or min(int(v) for v in shape) < 16:
        raise MedsslInputError("shape", f"phantom shape must be 3 sides of at least 16 voxels, got {list(shape)}")
    if len(spacing) != 3 or min(float(v) for v in spacing) <= 0:
        raise MedsslInputError("spacing", f"voxel spacing must be 3 positive values in mm, got {list(spacing)}")


def _folder_params(
    kind: str,
    n: int,
    seed: int,
    shape: Sequence[int],
    spacing: Sequence[float],
    jitter_spacing: bool,
    variation: Variation,
    **extra: object,
) -> dict[str, object]:
    """What a generated folder's marker records (and a later call must match to skip it)."""
    return _params(
        kind=kind,
        n=n,
        seed=seed,
        shape=list(shape),
        spacing=list(spacing),
        jitter_spacing=jitter_spacing,
        **extra,
        **_variation_param(variation),
    )


def _anatomies(
    seed: int,
    domain: str,
    n: int,
    shape: Sequence[int],
    spacing: Sequence[float],
    jitter_spacing: bool,
    lesion_radius_mm: tuple[float, float] = LESION_RADIUS_MM,
) -> Iterator[tuple[int, Anatomy]]:
    """(anatomy seed, anatomy) of the cases 0..n-1 of a domain."""
    for i in range(n):
        cs = case_seed(seed, domain, i)
        yield cs, make_anatomy(cs, shape, _case_spacing(cs, spacing, jitter_spacing), lesion_radius_mm)


def synth_corpus(
    out: str | Path,
    n: int,
    *,
    seed: int = 0,
    shape: Sequence[int] = (64, 64, 64),
    spacing: Sequence[float] = (3.0, 3.0, 3.0),
    jitter_spacing: bool = True,
    variation: Variation = "standard",
) -> list[Path]:
    """Unlabeled CT corpus: ``out/scan_XXX.nii.gz`` (int16 HU), anatomy seeds disjoint from every task.

    A folder already complete with the same parameters is left as it is. ``variation``: see VARIATIONS.
    """
    _check_request(n, "corpus cases", shape, spacing)
    out = Path(out)
    names = [f"scan_{i:03d}.nii.gz" for i in range(n)]
    params = _folder_params("corpus", n, seed, shape, spacing, jitter_spacing, variation)
    if not _is_complete(out, params):
        _start(out, [])
        for name, (cs, anatomy) in zip(
            names, _anatomies(seed, "corpus", n, shape, spacing, jitter_spacing), strict=True
        ):
            write_nifti(out / name, _ct_int16(render_ct(anatomy, cs, variation)), anatomy.affine)
        _remove_stale(out, "scan", set(names))
        atomic_write_text(out / _MARKER, json.dumps(params))
    return [out / name for name in names]


def _variation_param(variation: Variation) -> dict[str, str]:
    """The variation in a folder's marker; absent for "standard", so folders made before it stay complete."""
    if variation not in VARIATIONS:
        raise MedsslInputError("variation", f"must be one of {', '.join(VARIATIONS)}, got {variation!r}")
    return {} if variation == "standard" else {"variation": variation}


def _lesion_radius(radius_mm: Sequence[float]) -> tuple[float, float]:
    lo, hi = (float(v) for v in radius_mm)
    if not 0 < lo <= hi:
        raise MedsslInputError(
            "lesion_radius_mm", f"must be [low, high] mm with 0 < low <= high, got {list(radius_mm)}"
        )
    return lo, hi


def _ct_int16(image: np.ndarray) -> np.ndarray:
    return np.round(image).astype(np.int16)  # how CT is stored: integer HU


def synth_task(
    out: str | Path,
    kind: TaskKind,
    n: int,
    *,
    mri_weighting: str = "t1",
    seed: int = 0,
    shape: Sequence[int] = (64, 64, 64),
    spacing: Sequence[float] = (3.0, 3.0, 3.0),
    jitter_spacing: bool = True,
    variation: Variation = "standard",
    lesion_radius_mm: tuple[float, float] = LESION_RADIUS_MM,
) -> Path:
    """A labeled task in MSD layout (``dataset.json``, ``imagesTr/``, ``labelsTr/``); returns ``out``.

    ``ct_organs`` / ``mri_organs``: ORGAN_LABELS, case ``i`` of both shares its anatomy (and label
    map). ``ct_lesions``: other anatomies, labels only the lesions (LESION_LABELS), whose radii are drawn
    from ``lesion_radius_mm`` (the organ tasks keep the default, so their anatomy never changes with it).
    A folder already complete with the same parameters is left as it is.
    """
    if kind not in TASK_KINDS:
        raise MedsslInputError("kind", f"unknown synthetic task {kind!r}; choose one of {', '.join(TASK_KINDS)}")
    _check_request(n, kind, shape, spacing)
    radius = _lesion_radius(lesion_radius_mm) if kind == "ct_lesions" else LESION_RADIUS_MM
    if kind == "mri_organs" and mri_weighting not in MRI_SIGNAL:
        raise MedsslInputError("mri_weighting", f"must be one of {', '.join(MRI_SIGNAL)}, got {mri_weighting!r}")
    out = Path(out)
    weighting = mri_weighting if kind == "mri_organs" else None
    # the lesion radius is absent at its default, so folders made before the option stay complete
    lesions = {} if radius == LESION_RADIUS_MM else {"lesion_radius_mm": list(radius)}
    params = _folder_params(
        kind, n, seed, shape, spacing, jitter_spacing, variation, mri_weighting=weighting, **lesions
    )
    if _is_complete(out, params):
        return out
    _start(out, ["imagesTr", "labelsTr"])
    domain = "lesions" if kind == "ct_lesions" else "organs"
    labels = LESION_LABELS if kind == "ct_lesions" else ORGAN_LABELS
    names = [f"case_{i:03d}.nii.gz" for i in range(n)]
    anatomies = _anatomies(seed, domain, n, shape, spacing, jitter_spacing, radius)
    for name, (cs, anatomy) in zip(names, anatomies, strict=True):
        if kind == "mri_organs":
            image = render_mri(anatomy, cs, weighting=mri_weighting, variation=variation)
        else:
            image = _ct_int16(render_ct(anatomy, cs, variation))
        label = anatomy.lesion_labels() if kind == "ct_lesions" else anatomy.organ_labels()
        write_nifti(out / "imagesTr" / name, image, anatomy.affine)
        write_nifti(out / "labelsTr" / name, label.astype(np.uint8), anatomy.affine)
    _remove_stale(out / "imagesTr", "case", set(names))
    _remove_stale(out / "labelsTr", "case", set(names))
    modality = "MRI" if kind == "mri_organs" else "CT"
    dataset = {
        "name": kind,
        "description": f"medssl synthetic torso phantoms ({kind}), seed {seed}"
        + ("" if variation == "standard" else f", {variation} variation"),
        "reference": "medssl.data.synth (procedural phantoms)",
        "licence": "CC0",
        "release": "1.0",
        "tensorImageSize": "3D",
        "modality": {"0": modality},
        "labels": {"0": "background", **{str(k): v for k, v in labels.items()}},
        "numTraining": n,
        "numTest": 0,
        "training": [{"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"} for name in names],
        "test": [],
    }
    atomic_write_text(out / "dataset.json", json.dumps(dataset, indent=2) + "\n")
    atomic_write_text(out / _MARKER, json.dumps(params))
    return out


def synth_all(
    out: str | Path,
    cases: int = 16,
    corpus_cases: int = 16,
    seed: int = 0,
    modality: str | None = None,
    shape: Sequence[int] = (64, 64, 64),
    spacing: Sequence[float] = (3.0, 3.0, 3.0),
    jitter_spacing: bool = True,
    variation: Variation = "standard",
    lesion_radius_mm: tuple[float, float] = LESION_RADIUS_MM,
) -> dict[str, Path]:
    """Corpus and tasks under ``out``: ``corpus``, ``ct_organs``, ``ct_lesions``, ``mri_organs``.

    ``modality`` "ct" makes the CT ones (corpus included), "mri" only ``mri_organs``, None all.
    ``lesion_radius_mm`` applies to ``ct_lesions`` only.
    Parts already complete with the same parameters are skipped, so re-running is cheap.
    """
    if modality not in (None, "ct", "mri"):
        raise MedsslInputError("modality", f"must be 'ct' or 'mri', got {modality!r}")
    out = Path(out)
    made: dict[str, Path] = {}
    common: dict[str, Any] = {
        "seed": seed,
        "shape": shape,
        "spacing": spacing,
        "jitter_spacing": jitter_spacing,
        "variation": variation,
    }
    if modality in (None, "ct"):
        synth_corpus(out / "corpus", corpus_cases, **common)
        made["corpus"] = out / "corpus"
        made["ct_organs"] = synth_task(out / "ct_organs", "ct_organs", cases, **common)
        made["ct_lesions"] = synth_task(
            out / "ct_lesions", "ct_lesions", cases, lesion_radius_mm=lesion_radius_mm, **common
        )
    if modality in (None, "mri"):
        made["mri_organs"] = synth_task(out / "mri_organs", "mri_organs", cases, **common)
    return made
