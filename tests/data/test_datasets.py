"""Crop datasets: deterministic per global index, positive/negative crops, index plan per rank."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medssl.config import PreprocessConfig
from medssl.data.cache import CachedVolume, VolumeCache
from medssl.data.datasets import (
    PretrainRegionDataset,
    SegmentationCropDataset,
    StepSampler,
    global_indices,
    load_eval_case,
    read_crop,
)

CONFIG = PreprocessConfig(spacing=(1.0, 1.0, 1.0))


def _volume(tmp_path: Path, name: str, shape=(48, 40, 36)) -> CachedVolume:
    x, y, z = shape
    label = np.zeros(shape, np.uint8)
    label[x - 10 : x - 4, 3:8, z - 8 : z - 3] = 1  # small structures near corners: a uniform crop
    label[2:5, y - 6 : y - 2, 2:6] = 2  # misses them often
    # Two image values partitioned by the label, so image/label alignment survives augmentation checks.
    image = np.where(label > 0, 200.0, -100.0).astype(np.float32)
    image_path, label_path = tmp_path / f"{name}_0000.nii.gz", tmp_path / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(image_path))
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(label_path))
    return VolumeCache(tmp_path / "cache").get(image_path, label_path, "ct", CONFIG)


@pytest.fixture
def volumes(tmp_path: Path) -> list[CachedVolume]:
    return [_volume(tmp_path, "a"), _volume(tmp_path, "b", shape=(20, 24, 28))]


def test_sample_is_a_function_of_its_index(volumes) -> None:
    dataset = SegmentationCropDataset(volumes, crop_size=32, seed=7)
    again = SegmentationCropDataset(volumes, crop_size=32, seed=7)
    first, repeat = dataset[12], again[12]
    assert first["image"].shape == (1, 32, 32, 32) and first["image"].dtype == torch.float32
    assert first["label"].shape == (1, 32, 32, 32) and first["label"].dtype == torch.int64
    assert torch.equal(first["image"], repeat["image"]) and torch.equal(first["label"], repeat["label"])
    others = [dataset[i] for i in range(13, 20)]
    assert any(not torch.equal(first["image"], o["image"]) for o in others)
    other_seed = SegmentationCropDataset(volumes, crop_size=32, seed=8)
    assert any(other_seed.crop_plan(i) != dataset.crop_plan(i) for i in range(20))


def test_positive_fraction_and_labels_inside_positive_crops(volumes) -> None:
    dataset = SegmentationCropDataset(volumes, crop_size=32, seed=0, augment=False)
    plans = [dataset.crop_plan(i) for i in range(400)]
    fraction = np.mean([p.positive for p in plans])
    assert 0.42 < fraction < 0.58
    for i in range(60):
        if plans[i].positive:
            assert int(dataset[i]["label"].max()) > 0
    # Negative crops are uniform: with structures this small many of them hold no foreground.
    negatives = [i for i in range(60) if not plans[i].positive]
    assert any(int(dataset[i]["label"].max()) == 0 for i in negatives)


def test_class_balanced_centres_reach_small_structures_as_often_as_large_ones(tmp_path: Path) -> None:
    label = np.zeros((64, 64, 64), np.uint8)
    label[:24, :24, :24] = 1  # 13,824 voxels
    label[56:59, 56:59, 56:59] = 2  # 27 voxels, 40+ voxels away: a 16^3 crop never holds both
    image = np.where(label > 0, 200.0, -100.0).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(tmp_path / "c_0000.nii.gz"))
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(tmp_path / "c.nii.gz"))
    volume = VolumeCache(tmp_path / "cache").get(tmp_path / "c_0000.nii.gz", tmp_path / "c.nii.gz", "ct", CONFIG)

    def small_share(class_balanced: bool) -> float:
        dataset = SegmentationCropDataset(
            [volume], 16, seed=0, augment=False, pos_fraction=1.0, class_balanced=class_balanced
        )
        return float(np.mean([int(dataset[i]["label"].max()) == 2 for i in range(200)]))

    assert small_share(False) < 0.03  # voxel-uniform centres (RandCropByPosNegLabeld): 27 / 13,851
    assert 0.4 < small_share(True) < 0.6  # class first, then a voxel (RandCropByLabelClassesd)


def test_small_volume_is_padded_with_image_minimum_and_background(volumes) -> None:
    dataset = SegmentationCropDataset([volumes[1]], crop_size=32, seed=0, augment=False)
    sample = dataset[0]
    image, label = sample["image"][0].numpy(), sample["label"][0].numpy()
    # The 20x24x28 volume sits centred in the 32^3 crop; the rest is padding.
    assert image[0, 0, 0] == pytest.approx(volumes[1].image_min) and label[0, 0, 0] == 0
    assert volumes[1].image_min == pytest.approx(75 / 425, abs=1e-3)  # -100 HU in the CT window
    assert image[6:26, 4:28, 2:30].shape == (20, 24, 28)
    assert np.array_equal(label[6:26, 4:28, 2:30], volumes[1].label())


def test_augmentation_keeps_image_and_label_aligned(volumes) -> None:
    dataset = SegmentationCropDataset(volumes, crop_size=32, seed=3, augment=True)
    changed = 0
    for i in range(30):
        sample = dataset[i]
        image, label = sample["image"][0], sample["label"][0]
        plain = SegmentationCropDataset(volumes, crop_size=32, seed=3, augment=False)[i]
        changed += int(not torch.equal(plain["label"], sample["label"]))
        assert set(np.unique(label.numpy()).tolist()) <= {0, 1, 2}
        if 0 < int((label > 0).sum()) < label.numel():
            fg, bg = image[label > 0], image[label == 0]
            # Flips/rotations move image and label together; intensity augmentation is global.
            assert torch.allclose(fg, fg[0].expand_as(fg)) and torch.allclose(bg, bg[0].expand_as(bg))
            assert float(fg[0]) > float(bg[0])
    assert changed > 5


def test_load_eval_case(volumes) -> None:
    case = load_eval_case(volumes[0])
    assert case["image"].shape == (1, 48, 40, 36) and case["image"].dtype == torch.float32
    assert case["label"].shape == (1, 48, 40, 36) and case["label"].dtype == torch.int64
    assert case["spacing"] == pytest.approx((1.0, 1.0, 1.0)) and case["case_id"] == "a"


def test_pretrain_regions_are_deterministic_and_padded(volumes) -> None:
    seen = []

    def make_views(region: torch.Tensor, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        seen.append(tuple(region.shape))
        assert region.dtype == torch.float32
        return {"view": region * float(rng.uniform(0.5, 1.5))}

    dataset = PretrainRegionDataset(volumes, region_size=32, make_views=make_views, seed=1)
    assert torch.equal(dataset[4]["view"], dataset[4]["view"])
    assert seen == [(1, 32, 32, 32)] * 2
    assert len({float(dataset[i]["view"].sum()) for i in range(10)}) > 1


def test_global_indices_split_the_global_batch_across_ranks() -> None:
    single = global_indices(step=3, global_batch=8, rank=0, world_size=1)
    assert single == list(range(24, 32))
    assert global_indices(3, 8, 0, 2) + global_indices(3, 8, 1, 2) == single
    with pytest.raises(ValueError, match="not divisible"):
        global_indices(0, 6, 0, 4)
    sampler = StepSampler(global_batch=4, total_steps=5, start_step=3, rank=1, world_size=2)
    assert len(sampler) == 2 and list(sampler) == [[14, 15], [18, 19]]


def test_dataloader_workers_draw_the_same_samples(volumes) -> None:
    dataset = SegmentationCropDataset(volumes, crop_size=32, seed=5)
    sampler = StepSampler(global_batch=2, total_steps=3, start_step=1)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=2)
    batches = list(loader)
    assert len(batches) == 2
    expected = torch.stack([dataset[i]["image"] for i in (4, 5)])
    assert torch.equal(batches[1]["image"], expected)


def test_read_crop_pads_outside_the_array() -> None:
    array = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    crop = read_crop(array, (-1, 1, 2), 3, fill=-5.0, dtype=np.float32)
    assert crop[0].tolist() == [[-5.0] * 3] * 3
    assert crop[1, 0, 0] == array[0, 1, 2] and crop[1, 0, 1] == -5.0
    assert read_crop(array, (10, 0, 0), 2, fill=-1.0, dtype=np.float32).tolist() == [[[-1.0] * 2] * 2] * 2
