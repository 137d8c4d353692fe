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


# --------------------------------------------------------------------------- small crops (issue 18 item 3)


def trainable_without_gradient(method) -> list[str]:
    """Parameters that require a gradient but got none from one backward (DDP would stall on them)."""
    return [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]


def test_simmim_released_level_is_one_token_at_32_and_the_small_scale_option_has_eight():
    released = simmim()
    assert released.pretext() == {
        "reconstruct_stage": 4,
        "reconstruct_tokens": 1,
        "mask_unit_voxels": 16,
        "trained_stages": 4,
    }
    small = simmim(decoder_stage=3)  # 2^3 tokens of 16 voxels; mask_patch 16 = one cube per token
    assert small.pretext() == {
        "reconstruct_stage": 3,
        "reconstruct_tokens": 8,
        "mask_unit_voxels": 16,
        "trained_stages": 3,
    }
    assert small.decoder.stride == 16 and small.decoder.proj.in_channels == small.encoder.stage_channels[3]
    assert not any(p.requires_grad for p in small.encoder.layers4.parameters())  # no gradient reaches it
    region = torch.rand(1, CROP, CROP, CROP)
    batch = default_collate([small.make_views(region, np.random.default_rng([0, i])) for i in range(2)])
    before = [p.detach().clone() for p in small.encoder.layers4.parameters()]
    out = small(batch, 0)
    out["loss"].backward()
    assert out["reconstruction_l1"] > 0 and trainable_without_gradient(small) == []
    assert small.encoder.layers3[0].blocks[0].attn.qkv.weight.grad is not None
    assert all(torch.equal(a, b) for a, b in zip(before, small.encoder.layers4.parameters(), strict=True))
    finer = simmim(decoder_stage=2, mask_patch=8)  # 4^3 tokens of 8 voxels
    assert finer.pretext()["reconstruct_tokens"] == 64 and finer.pretext()["mask_unit_voxels"] == 8


def smit(**options):
    torch.manual_seed(0)
    encoder = SwinEncoder(EncoderConfig(preset="tiny", window_size=4))
    heads = {"out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 16}
    return build_method(MethodConfig(name="smit", options={**heads, **options}), encoder, crop_size=CROP, total_steps=4)


def test_smit_small_scale_option_distils_and_reconstructs_from_earlier_outputs():
    released = smit()
    assert released.pretext() == {
        "distill_stage": 3,
        "distill_tokens": 8,
        "reconstruct_stage": 4,
        "reconstruct_tokens": 1,
        "mask_unit_voxels": 16,
        "trained_stages": 4,
    }
    small = smit(distill_stage=2, decoder_stage=3)
    assert small.pretext() == {
        "distill_stage": 2,
        "distill_tokens": 64,
        "reconstruct_stage": 3,
        "reconstruct_tokens": 8,
        "mask_unit_voxels": 8,
        "trained_stages": 3,
    }
    views = small.make_views(torch.rand(1, 48, 48, 48), np.random.default_rng(0))
    assert views["token_masks"].shape == (2, 4, 4, 4) and int(views["token_masks"][0].sum()) == 45  # ceil(0.7 * 64)
    assert small.head.norm.normalized_shape == (small.encoder.stage_channels[2],)
    out = small({k: v.unsqueeze(0) for k, v in views.items()}, 0)
    out["loss"].backward()
    assert out["patch_ce"] > 0 and out["reconstruction_l1"] > 0
    assert trainable_without_gradient(small) == []
    assert not any(p.requires_grad for p in small.encoder.layers4.parameters())
