"""SimMIM at 32^3 on a tiny Swin: the random resized crop of its data pipeline, masks, one training step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from medssl.config import EncoderConfig, MethodConfig, load_yaml
from medssl.data import views
from medssl.methods.base import REGISTRY, build_method
from medssl.models.encoder import SwinEncoder

CROP = 32
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "methods" / "simmim.yaml"


def simmim(**options):
    torch.manual_seed(0)
    encoder = SwinEncoder(EncoderConfig(preset="tiny", window_size=4))
    return build_method(MethodConfig(name="simmim", options=options), encoder, crop_size=CROP, total_steps=4)


def test_defaults_are_simmim_data_pipeline_and_spelled_out_in_yaml():
    """data_simmim.py: RandomResizedCrop(scale=(0.67, 1.), ratio=(3/4, 4/3)); mask ratio 0.6."""
    params = REGISTRY["simmim"].Params()
    assert params.crop_scale == (0.67, 1.0)
    assert params.crop_ratio == pytest.approx((3 / 4, 4 / 3))
    assert params.mask_ratio == 0.6
    options = load_yaml(CONFIG)["method"]["options"]
    assert REGISTRY["simmim"].parse_params(options) == params
    assert set(options) == set(REGISTRY["simmim"].Params.model_fields)


def test_views_take_a_random_resized_crop_within_the_scale_bounds(monkeypatch):
    method = simmim()
    drawn = []
    box_sides = views.random_box_sides

    def recording(spatial, scale, ratio, rng):
        sides = box_sides(spatial, scale, ratio, rng)
        drawn.append((scale, ratio, sides))
        return sides

    monkeypatch.setattr(views, "random_box_sides", recording)
    region = torch.rand(1, CROP, CROP, CROP)
    for seed in range(20):
        out = method.make_views(region, np.random.default_rng(seed))
        assert out["image"].shape == (1, CROP, CROP, CROP)
        assert out["mask"].shape == (CROP // 2,) * 3  # patch-token grid
    assert len(drawn) == 20
    fractions = [np.prod(sides) / CROP**3 for _, _, sides in drawn]
    assert all(scale == (0.67, 1.0) for scale, _, _ in drawn)
    assert all(0.67 - 0.06 <= f <= 1.0 for f in fractions)  # up to rounding of 32-voxel sides
    assert min(fractions) < 0.9  # not always the whole region
    # a crop is a resized part of the region, not the region itself
    same = [torch.equal(method.make_views(region, np.random.default_rng(s))["image"], region) for s in range(5)]
    assert not all(same)


def test_one_training_step_reconstructs_masked_voxels_and_reports_health():
    method = simmim()
    region = torch.rand(1, CROP, CROP, CROP)
    batch = default_collate([method.make_views(region, np.random.default_rng([0, i])) for i in range(2)])
    out = method(batch, 0)
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    assert 0.4 < float(out["mask_fraction"]) < 0.8
    assert "health/feature_rank" in out and "embedding_std" not in out
    out["loss"].backward()
    assert method.decoder.proj.weight.grad is not None
    assert method.encoder.mask_token.grad is not None
