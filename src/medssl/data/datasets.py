"""Training datasets indexed by a global sample index, and the per-step index plan.

Sample ``i`` is drawn with ``np.random.default_rng([seed, i])`` and nothing else: whichever process
or DataLoader worker builds it, before or after a resume, it is the same crop with the same
augmentation. ``global_indices`` says which indices a rank draws at a step, so a run restarted at
step ``s`` (or spread over another number of ranks with the same global batch) sees the same data.

Crops are read from the cache's memory-mapped arrays; no scan is decoded here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    OneOf,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from monai.utils import convert_to_tensor
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from medssl.config import AugmentConfig
from medssl.data.cache import CachedVolume
from medssl.errors import MedsslInputError

if TYPE_CHECKING:
    from medssl.data.corpus import Corpus

# Effectively infinite: the training loop decides how many samples it draws.
EPOCHLESS_LENGTH = 2**31 - 1


def _axis_start(centre: int, dim: int, size: int) -> int:
    """Start of a ``size`` window around ``centre``, kept inside an axis of length ``dim``.

    As MONAI's ``RandCropByPosNegLabel`` moves centres so the crop fits, a crop never pads an axis
    that is long enough; a shorter axis is taken whole, centred, and padded on both sides.
    """
    if dim >= size:
        return int(np.clip(centre - size // 2, 0, dim - size))
    return -((size - dim) // 2)


def read_crop(array: np.ndarray, start: Sequence[int], size: int, fill: float, dtype: Any) -> np.ndarray:
    """The cube ``array[..., s:s+size, ...]`` over the last three axes, ``fill`` where it leaves the array."""
    spatial = array.shape[-3:]
    out = np.full(array.shape[:-3] + (size, size, size), fill, dtype=dtype)
    src, dst = [], []
    for s, dim in zip(start, spatial, strict=True):
        lo, hi = max(s, 0), min(s + size, dim)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    into: tuple[Any, ...] = (Ellipsis, *dst)
    source: tuple[Any, ...] = (Ellipsis, *src)
    out[into] = array[source]
    return out


@dataclass(frozen=True)
class CropPlan:
    """Where sample ``i`` comes from: a volume, the crop's start corner, positive or not."""

    volume_index: int
    start: tuple[int, int, int]
    positive: bool


def _with_channel(array: np.ndarray) -> np.ndarray:
    return array[None] if array.ndim == 3 else array


class SegmentationCropDataset(Dataset):
    """Random labelled crops with positive/negative centres (1:1 by default) and augmentation.

    A positive centre is a foreground voxel drawn uniformly (MONAI's ``RandCropByPosNegLabeld``), so
    large organs dominate; with ``class_balanced`` the class is drawn uniformly first and then a voxel
    of it (``RandCropByLabelClassesd`` with equal ratios), so small structures are seen as often.

    ``__getitem__(i)`` returns ``{"image": float32 (C, S, S, S), "label": int64 (1, S, S, S)}``.
    """

    def __init__(
        self,
        volumes: Sequence[CachedVolume],
        crop_size: int,
        seed: int,
        augment: bool = True,
        pos_fraction: float = 0.5,
        augmentation: AugmentConfig | None = None,
        class_balanced: bool = False,
    ) -> None:
        if not volumes:
            raise ValueError("SegmentationCropDataset needs at least one volume")
        if any(not v.has_label for v in volumes):
            raise ValueError("SegmentationCropDataset needs labelled volumes")
        if not 0.0 <= pos_fraction <= 1.0:
            raise ValueError(f"pos_fraction {pos_fraction} outside [0, 1]")
        self.volumes = list(volumes)
        self.crop_size = int(crop_size)
        self.seed = int(seed)
        self.augment = augment
        self.pos_fraction = float(pos_fraction)
        self.class_balanced = class_balanced
        self._augmentation = _segmentation_augmentation(augmentation or AugmentConfig()) if augment else None

    def __len__(self) -> int:
        return EPOCHLESS_LENGTH

    def _plan(self, rng: np.random.Generator) -> CropPlan:
        index = int(rng.integers(len(self.volumes)))
        volume = self.volumes[index]
        shape = volume.shape
        positive = bool(rng.random() < self.pos_fraction)
        foreground = volume.foreground() if positive else {}
        if foreground:
            classes = sorted(foreground)
            if self.class_balanced:
                chosen = classes[int(rng.integers(len(classes)))]
            else:
                # Weighted by true voxel counts: a uniformly drawn foreground voxel, as in
                # RandCropByPosNegLabel, although only a sample of each class is stored.
                counts = volume.class_voxels
                weights = np.array([counts.get(c, len(foreground[c])) for c in classes], dtype=np.float64)
                chosen = classes[int(rng.choice(len(classes), p=weights / weights.sum()))]
            coords = foreground[chosen]
            centre = coords[int(rng.integers(len(coords)))]
        else:
            positive = False
            centre = [int(rng.integers(d)) for d in shape]
        start = tuple(_axis_start(int(c), d, self.crop_size) for c, d in zip(centre, shape, strict=True))
        return CropPlan(index, start, positive)  # type: ignore[arg-type]

    def crop_plan(self, index: int) -> CropPlan:
        """The volume and window of sample ``index`` (what ``__getitem__`` reads)."""
        return self._plan(np.random.default_rng([self.seed, int(index)]))

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        rng = np.random.default_rng([self.seed, int(index)])
        plan = self._plan(rng)
        volume = self.volumes[plan.volume_index]
        image = read_crop(volume.image(), plan.start, self.crop_size, volume.image_min, np.float32)
        labels = volume.label()
        if labels is None:
            raise MedsslInputError(volume.path, "cache entry has no label map; a segmentation case needs one")
        label = read_crop(labels, plan.start, self.crop_size, 0, np.int64)
        sample = {"image": torch.from_numpy(_with_channel(image)), "label": torch.from_numpy(label[None])}
        if self._augmentation is not None:
            self._augmentation.set_random_state(seed=int(rng.integers(2**31)))
            sample = self._augmentation(sample)
        return {
            "image": convert_to_tensor(sample["image"], dtype=torch.float32).contiguous(),
            "label": convert_to_tensor(sample["label"], dtype=torch.int64).contiguous(),
        }


def _segmentation_augmentation(cfg: AugmentConfig) -> Compose:
    """docs/design.md §7: flips, rot90 and small intensity shifts, with the configured probabilities."""
    keys = ["image", "label"]
    rotations = [RandRotate90d(keys, prob=cfg.rot90_prob, max_k=3, spatial_axes=p) for p in ((0, 1), (0, 2), (1, 2))]
    return Compose(
        [
            RandFlipd(keys, prob=cfg.flip_prob, spatial_axis=0),
            RandFlipd(keys, prob=cfg.flip_prob, spatial_axis=1),
            RandFlipd(keys, prob=cfg.flip_prob, spatial_axis=2),
            OneOf(rotations),  # rot90 in a random plane
            RandScaleIntensityd("image", factors=cfg.intensity_scale, prob=cfg.intensity_prob),
            RandShiftIntensityd("image", offsets=cfg.intensity_shift, prob=cfg.intensity_prob),
        ]
    )


def load_eval_case(volume: CachedVolume) -> dict[str, Any]:
    """A whole case for sliding-window inference: image float32 (C, X, Y, Z), label int64 (1, X, Y, Z)."""
    image = _with_channel(np.asarray(volume.image(mmap=False), dtype=np.float32))
    label = volume.label(mmap=False)
    return {
        "image": torch.from_numpy(np.ascontiguousarray(image)),
        "label": torch.from_numpy(label.astype(np.int64)[None]) if label is not None else None,
        "spacing": tuple(volume.spacing),
        "case_id": volume.case_id,
    }


class PretrainRegionDataset(Dataset):
    """Random ``region_size``^3 regions of an unlabeled corpus, turned into views by the SSL method."""

    def __init__(
        self,
        corpus: Corpus | Sequence[CachedVolume],
        region_size: int,
        make_views: Callable[[Tensor, np.random.Generator], dict[str, Tensor]],
        seed: int,
    ) -> None:
        self.volumes = list(corpus.volumes if hasattr(corpus, "volumes") else corpus)
        if not self.volumes:
            raise ValueError("PretrainRegionDataset needs at least one volume")
        self.region_size = int(region_size)
        self.make_views = make_views
        self.seed = int(seed)

    def __len__(self) -> int:
        return EPOCHLESS_LENGTH

    def region(self, rng: np.random.Generator) -> np.ndarray:
        """A float32 (C, R, R, R) region of a random volume, padded with its minimum if too small."""
        volume = self.volumes[int(rng.integers(len(self.volumes)))]
        size = self.region_size
        start = [int(rng.integers(d - size + 1)) if d >= size else -((size - d) // 2) for d in volume.shape]
        return _with_channel(read_crop(volume.image(), start, size, volume.image_min, np.float32))

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        rng = np.random.default_rng([self.seed, int(index)])
        return self.make_views(torch.from_numpy(self.region(rng)), rng)


def global_indices(step: int, global_batch: int, rank: int, world_size: int) -> list[int]:
    """Sample indices rank ``rank`` draws at (0-based) ``step``; the ranks together cover the global batch."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
    local = global_batch // world_size
    base = step * global_batch + rank * local
    return list(range(base, base + local))


class StepSampler(Sampler[list[int]]):
    """Batch sampler: one batch of global indices per step, from ``start_step`` to ``total_steps``."""

    def __init__(
        self, global_batch: int, total_steps: int, start_step: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        global_indices(0, global_batch, rank, world_size)  # validate once, up front
        self.global_batch = global_batch
        self.total_steps = int(total_steps)
        self.start_step = int(start_step)
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        return max(self.total_steps - self.start_step, 0)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.total_steps):
            yield global_indices(step, self.global_batch, self.rank, self.world_size)
