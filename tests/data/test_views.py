"""SSL view primitives against their references: SwinUNETR-SSL's cut-out boxes and rotation plane, solarisation."""

from __future__ import annotations

import numpy as np
import torch

from medssl.data.views import (
    SWINUNETR_ROTATION_AXIS,
    boxes_mask,
    cutout_boxes,
    rotate90_view,
    solarize,
)


def test_cutout_boxes_follow_patch_rand_drop():
    """utils/ops.py patch_rand_drop: start in [0, side - tol), extent in [tol, max_block), clipped at the
    edge; boxes are added until their summed volume reaches the drawn budget U(0, max_drop) * N."""
    spatial = (40, 32, 24)
    tol = [max(1, int(0.05 * s)) for s in spatial]
    longest = [int(0.25 * s) for s in spatial]
    for seed in range(20):
        rng = np.random.default_rng(seed)
        budget = np.random.default_rng(seed).uniform(0.0, 0.3) * np.prod(spatial)  # the first draw
        boxes = cutout_boxes(spatial, rng, max_fraction=0.3)
        volumes = []
        for box in boxes:
            assert box[0] == slice(None)
            sides = []
            for axis, sl in enumerate(box[1:]):
                assert 0 <= sl.start < spatial[axis] - tol[axis]
                side = sl.stop - sl.start
                assert 1 <= side < longest[axis] and sl.stop <= spatial[axis]
                sides.append(side)
            volumes.append(int(np.prod(sides)))
        assert sum(volumes) >= budget and sum(volumes[:-1]) < budget  # stops at the first box past the budget
        mask = boxes_mask(boxes, spatial)
        assert mask.shape == (1, *spatial) and int(mask.sum()) <= sum(volumes)


def test_swinunetr_rotation_is_rot_rand_plane():
    """rot_rand: x.rot90(k, (2, 3)) on a (C, H, W, D) sample; our (C, X, Y, Z) has the same order."""
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    for k in range(4):
        assert torch.equal(rotate90_view(x, k, SWINUNETR_ROTATION_AXIS), x.rot90(k, (2, 3)))


def test_solarize_is_pil_solarize_on_unit_range():
    x = torch.linspace(0, 1, 11)
    out = solarize(x)
    assert torch.equal(out[x < 0.5], x[x < 0.5])
    assert torch.allclose(out[x >= 0.5], 1 - x[x >= 0.5])
