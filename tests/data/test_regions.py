"""nnU-Net region-based labels (issue 20 item 5): parsing dataset.json regions, training targets, painting
predictions back into label maps, Dice per region, and the sigmoid Dice + BCE loss."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from medssl.data.convert.brats import REGIONS as BRATS
from medssl.data.convert.kits import REGIONS as KITS
from medssl.data.readers import write_nifti
from medssl.data.regions import label_map_from_regions, parse_regions, region_masks, region_targets
from medssl.data.tasks import check_task, load_task
from medssl.evaluate import case_metrics, mean_dice
from medssl.train.finetune import segmentation_loss

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
label_maps = arrays(np.uint8, (5, 4, 3), elements=st.integers(0, 3))


@PROPERTY
@given(label=label_maps, regions=st.sampled_from([BRATS, KITS]))
def test_targets_painted_back_give_the_label_map(label, regions):
    """nnU-Net's two conversions are inverses for its BraTS and KiTS regions: the targets of a label map,
    painted in regions_class_order, are that label map."""
    targets = region_targets(torch.from_numpy(label)[None, None], regions)
    assert targets.shape == (1, len(regions), *label.shape) and targets.dtype == torch.float32
    for r, values in enumerate(regions.labels):
        assert torch.equal(targets[0, r].bool(), torch.from_numpy(np.isin(label, values)))
    painted = label_map_from_regions(targets[0], regions)
    assert torch.equal(painted, torch.from_numpy(label).long())
    np.testing.assert_array_equal(region_masks(label, regions), region_masks(torch.from_numpy(label), regions).numpy())


@PROPERTY
@given(
    regions=st.lists(st.lists(st.integers(1, 4), min_size=1, max_size=3, unique=True), min_size=1, max_size=3),
    order=st.lists(st.integers(0, 5), min_size=0, max_size=4),
)
def test_regions_parse_only_with_a_painting_value_in_each_region(regions, order):
    raw = {"background": 0, **{f"r{i}": values for i, values in enumerate(regions)}}
    parsed, problems = parse_regions(raw, order)
    valid = len(order) == len(regions) and all(v in region for v, region in zip(order, regions, strict=False))
    assert (parsed is not None) == valid and (problems == []) == valid
    if parsed is not None:
        assert parsed.labels == tuple(tuple(r) for r in regions) and parsed.class_order == tuple(order)
        assert parsed.structures == {i + 1: f"r{i}" for i in range(len(regions))}


def test_value_names_follow_the_painting_order():
    assert BRATS.value_names() == {1: "whole tumor", 2: "tumor core", 3: "enhancing tumor"}
    assert KITS.value_names() == {1: "kidney", 2: "tumor", 3: "masses"}


def _region_task(root: Path, labels: dict, order) -> Path:
    root.mkdir()
    for i in range(2):
        label = np.zeros((8, 8, 8), np.uint8)
        label[1:6, 1:6, 1:6], label[2:4, 2:4, 2:4], label[3, 3, 3] = 1, 2, 3
        write_nifti(root / "imagesTr" / f"c{i}_0000.nii.gz", label.astype(np.float32), np.eye(4))
        write_nifti(root / "labelsTr" / f"c{i}.nii.gz", label, np.eye(4))
    data = {"channel_names": {"0": "T1"}, "labels": labels, "numTraining": 2, "file_ending": ".nii.gz"}
    if order is not None:
        data["regions_class_order"] = order
    (root / "dataset.json").write_text(json.dumps(data))
    return root


def test_a_region_task_loads_with_its_regions(tmp_path):
    task = load_task(_region_task(tmp_path / "t", BRATS.dataset_labels(), [1, 2, 3]))
    assert task.regions == BRATS and task.n_outputs == 3 and task.n_classes == 4
    assert task.structures == {1: "whole tumor", 2: "tumor core", 3: "enhancing tumor"}
    assert check_task(tmp_path / "t") == []
    problems = check_task(_region_task(tmp_path / "u", BRATS.dataset_labels(), [1, 2, 1]), deep=False)
    assert any("paints region 'enhancing tumor' [3] with 1" in p for p in problems), problems
    problems = check_task(_region_task(tmp_path / "v", {"background": 0, "a": [1, 2], "b": [0, 3]}, [1, 3]))
    assert any("below 1" in p for p in problems), problems


def test_dice_per_region_on_label_maps():
    truth = torch.zeros((6, 6, 6), dtype=torch.long)
    truth[1:5, 1:5, 1:5] = 1
    truth[2:4, 2:4, 2:4] = 2  # core inside whole
    prediction = truth.clone()
    prediction[2:4, 2:4, 2:4] = 1  # the core predicted as edema: whole tumor right, tumor core missed
    dice = mean_dice(prediction, truth, BRATS.structures, BRATS)
    assert dice == {"whole tumor": 1.0, "tumor core": 0.0}  # no enhancing tumor in the truth: not scored
    rows = case_metrics(prediction, truth, BRATS.structures, (1.0, 1.0, 1.0), regions=BRATS, case_id="c")
    assert [(r["structure"], r["dice"]) for r in rows] == [("whole tumor", 1.0), ("tumor core", 0.0)]
    assert rows[0]["hd95"] == 0.0 and rows[1]["hd95"] is None and rows[1]["nsd"] == 0.0


@pytest.mark.parametrize("name", ["dice_ce", "dice"])
def test_region_loss_is_sigmoid_per_region(name):
    """A perfect region prediction scores far below a wrong one, and overlapping targets (a voxel in two
    regions) are learnable: a softmax over regions could not put both near 1."""
    regions = BRATS
    label = torch.zeros((1, 1, 4, 4, 4), dtype=torch.long)
    label[..., :2, :, :] = 3  # in all three regions at once
    targets = region_targets(label, regions)
    loss = segmentation_loss(name, regions)
    perfect = loss(targets * 40 - 20, targets)
    wrong = loss(20 - targets * 40, targets)
    assert float(perfect) < 0.05 and float(wrong) > 0.95
