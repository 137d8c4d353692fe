"""Recipe points of DINO, iBOT and SMIT against their released code (issue 7): token level and masks,
teachers without stochastic depth, per-parameter clipping, schedules in epochs, the exported network."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.networks.layers import DropPath
from torch import nn

from medssl.config import EncoderConfig, MethodConfig, PretrainConfig, ScheduleConfig
from medssl.methods.base import EMATeacher, SSLMethod, build_method
from medssl.methods.distillation import held_then_warmed
from medssl.models import read_encoder_checkpoint
from medssl.models.encoder import SwinEncoder
from medssl.runs import RunDir
from medssl.train.pretrain import run_pretrain

SMALL_HEAD = {"out_dim": 32, "hidden_dim": 64, "bottleneck_dim": 16, "steps_per_epoch": 1}


def build(name: str, crop: int = 32, total_steps: int = 8, drop_path: float = 0.0, **options) -> SSLMethod:
    torch.manual_seed(0)
    encoder = SwinEncoder(EncoderConfig(preset="tiny", window_size=4, drop_path_rate=drop_path))
    return build_method(MethodConfig(name=name, options={**SMALL_HEAD, **options}), encoder, crop, total_steps)


def region(side: int) -> torch.Tensor:
    return torch.rand(1, side, side, side, generator=torch.Generator().manual_seed(0))


def assert_whole_tokens(patch_mask: torch.Tensor, token_mask: torch.Tensor, factor: int) -> None:
    """Every ``factor``^3 block of the patch-grid mask is constant and equals its token's entry."""
    d, h, w = token_mask.shape
    blocks = patch_mask.reshape(d, factor, h, factor, w, factor).permute(0, 2, 4, 1, 3, 5).flatten(3)
    assert (blocks.all(dim=-1) | ~blocks.any(dim=-1)).all(), "a token is partly masked"
    assert torch.equal(blocks[..., 0], token_mask)


# --------------------------------------------------------------------------- SMIT


def test_smit_distils_the_stage3_grid_through_a_layernorm_at_96() -> None:
    smit = build("smit", crop=96)
    assert smit.region_size(96) == 128
    views = smit.make_views(region(128), np.random.default_rng(0))
    assert views["crops"].shape == (2, 1, 96, 96, 96)
    assert views["token_masks"].shape == (2, 6, 6, 6) and views["masks"].shape == (2, 48, 48, 48)
    for patch_mask, token_mask in zip(views["masks"], views["token_masks"], strict=True):
        assert_whole_tokens(patch_mask, token_mask, 8)  # one 16^3-voxel block = one distilled token
        assert int(token_mask.sum()) == math.ceil(0.7 * 216)  # MaskGenerator: ceil(token_count * ratio)
    # Crops only: with voxel values that encode their position, a crop is a sub-cube unchanged
    # (no flip, no intensity jitter).
    coded = torch.arange(128**3, dtype=torch.float64).reshape(1, 128, 128, 128)
    crop = smit.make_views(coded, np.random.default_rng(0))["crops"][0, 0].double()
    i, j, k = np.unravel_index(int(crop[0, 0, 0]), (128, 128, 128))
    assert torch.equal(crop, coded[0, i : i + 96, j : j + 96, k : k + 96])

    norm = smit.head.norm
    assert isinstance(norm, nn.LayerNorm) and norm.normalized_shape == (8 * 12,) and norm.eps == 1e-6
    seen = []
    handle = norm.register_forward_hook(lambda _m, args, _out: seen.append(tuple(args[0].shape)))
    teacher_handle = smit.teacher_head.module.norm.register_forward_hook(
        lambda _m, args, _out: seen.append(tuple(args[0].shape))
    )
    batch = {k: v.unsqueeze(0) for k, v in views.items()}
    with torch.no_grad():
        out = smit(batch, 0)
    handle.remove()
    teacher_handle.remove()
    assert seen == [(2, 216, 96), (2, 216, 96)]  # student then teacher: 6^3 tokens of 8f channels
    assert out["mask_fraction"].item() == pytest.approx(math.ceil(0.7 * 216) / 216)
    assert smit.encoder.stage_grid((96, 96, 96), 3) == (6, 6, 6) and smit.encoder.stage_stride(3) == 16


def test_smit_temperatures_follow_the_released_epoch_schedules() -> None:
    smit = build("smit", total_steps=200, steps_per_epoch=2)
    # Global tau_t: 0.04 -> 0.07 over 30 epochs (60 steps), then constant.
    assert smit.teacher_temperature(0) == pytest.approx(0.04)
    assert smit.teacher_temperature(59) == pytest.approx(0.07)
    # Patch tau_t: held at 0.04 for 30 epochs, then warmed up over 30 epochs.
    patch = smit.patch_temp_schedule
    assert (patch[:60] == 0.04).all() and patch[60] == pytest.approx(0.04)
    assert patch[119] == pytest.approx(0.07) and patch[-1] == pytest.approx(0.07)
    assert smit.freeze_last_layer_steps == 2  # the first epoch
    assert len(held_then_warmed(0.04, 0.07, 500, 10, 100)) == 100


@pytest.mark.parametrize("name", ["dino", "ibot", "smit"])
def test_a_run_shorter_than_the_temperature_warm_up_stops_mid_warm_up(name: str) -> None:
    # 10 steps of a 30-epoch (60-step) warm-up: tau_t at the last step is DINO's at step 9, unless
    # the named departure squeezes the warm-up into the run.
    truncated = build(name, total_steps=10, steps_per_epoch=2)
    assert truncated.teacher_temperature(9) == pytest.approx(0.04 + 0.03 * 9 / 59)
    compressed = build(name, total_steps=10, steps_per_epoch=2, teacher_temp_short_run="compress")
    assert compressed.teacher_temperature(9) == pytest.approx(0.07)


def test_steps_per_epoch_comes_from_the_corpus_rule_unless_given() -> None:
    encoder = SwinEncoder(EncoderConfig(preset="tiny", window_size=4))
    method = build_method(MethodConfig(name="smit", options={"out_dim": 32}), encoder, 32, 100, steps_per_epoch=7)
    assert method.steps_per_epoch == 7 and method.freeze_last_layer_steps == 7
    explicit = build_method(
        MethodConfig(name="smit", options={"out_dim": 32, "steps_per_epoch": 3}),
        SwinEncoder(EncoderConfig(preset="tiny", window_size=4)),
        32,
        100,
        steps_per_epoch=7,
    )
    assert explicit.steps_per_epoch == 3


# --------------------------------------------------------------------------- iBOT


def test_ibot_masks_whole_bottleneck_tokens_and_leaves_the_configured_share_unmasked() -> None:
    ibot = build("ibot", crop=96, n_local_crops=0, pred_shape="rand", pred_ratio=[0.0, 0.5], pred_ratio_var=[0.0])
    counts = []
    for seed in range(40):
        views = ibot.make_views(region(96), np.random.default_rng(seed))
        assert views["global_token_masks"].shape == (2, 3, 3, 3) and views["global_masks"].shape == (2, 48, 48, 48)
        for patch_mask, token_mask in zip(views["global_masks"], views["global_token_masks"], strict=True):
            assert_whole_tokens(patch_mask, token_mask, 16)  # a bottleneck token is 32^3 voxels, 16^3 patches
            counts.append(int(token_mask.sum()))
    assert set(counts) == {0, 13}  # ratio 0 (unmasked crop) or int(0.5 * 27)
    assert 0.3 < counts.count(0) / len(counts) < 0.7  # one of the two ratios picked uniformly

    recipe = build("ibot", n_local_crops=0)  # the released Swin recipe: pred_ratio 0 / 0.3 +- 0.2
    ratios = [recipe.pred_ratio(np.random.default_rng(s)) for s in range(400)]
    zeros = sum(r == 0.0 for r in ratios) / len(ratios)
    assert 0.4 < zeros < 0.6 and all(r == 0.0 or 0.1 <= r <= 0.5 for r in ratios)
    block = build("ibot", crop=64, n_local_crops=0, pred_ratio=[0.5], pred_ratio_var=[0.0])
    views = block.make_views(region(64), np.random.default_rng(1))
    for patch_mask, token_mask in zip(views["global_masks"], views["global_token_masks"], strict=True):
        assert_whole_tokens(patch_mask, token_mask, 16)
        assert 0 < int(token_mask.sum()) <= 4


def test_ibot_masking_starts_at_pred_start_epoch_and_heads_follow_the_release() -> None:
    ibot = build("ibot", n_local_crops=0, pred_start_epoch=2, pred_shape="rand", pred_ratio=[1.0], pred_ratio_var=[0.0])
    batch = {k: v.unsqueeze(0) for k, v in ibot.make_views(region(32), np.random.default_rng(0)).items()}
    with torch.no_grad():
        assert ibot(batch, 1)["mask_fraction"].item() == 0.0
        assert ibot(batch, 2)["mask_fraction"].item() == 1.0
    assert (ibot.patch_temp_schedule[:2] == 0.04).all()  # the patch tau_t is held until masking starts
    recipe = build("ibot")
    assert recipe.params.norm_last_layer is False and recipe.params.shared_head and recipe.params.shared_head_teacher
    assert recipe.head.patch == "shared" and not hasattr(recipe.head, "last_layer2")  # whole head shared
    separate = build("ibot", shared_head=False)
    assert separate.head.patch == "shared_mlp" and hasattr(separate.head, "last_layer2")


# --------------------------------------------------------------------------- teachers


@pytest.mark.parametrize("name", ["dino", "smit"])
def test_teacher_is_deterministic_in_training_mode_with_drop_path(name: str) -> None:
    method = build(name, drop_path=0.5)
    method.train()
    teacher = method.teacher_encoder
    assert not teacher.training and not teacher.module.training
    assert all(m.drop_prob == 0.0 for m in teacher.modules() if isinstance(m, DropPath))
    assert teacher.module.config.drop_path_rate == 0.0 and method.encoder.config.drop_path_rate == 0.5
    x = region(32).unsqueeze(0)
    first, second = teacher(x)[-1], teacher(x)[-1]
    assert torch.equal(first, second)
    with torch.no_grad():  # the student does drop paths, so the comparison above can fail
        assert not torch.equal(method.encoder(x)[-1], method.encoder(x)[-1])


def test_ema_teacher_can_keep_batch_norm_on_batch_statistics() -> None:
    online = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    keep = EMATeacher(online, batch_norm_batch_stats=True)
    plain = EMATeacher(online)
    keep.train()
    plain.train()
    assert keep.module[1].training and not keep.module[0].training
    assert not plain.module[1].training


# --------------------------------------------------------------------------- clipping, centring


def test_dino_clips_each_parameter_on_its_own() -> None:
    dino = build("dino", n_local_crops=0)
    params = [p for p in dino.parameters() if p.requires_grad]
    big, small = params[0], params[1]
    for p in params:
        p.grad = None
    big.grad = torch.zeros_like(big)
    big.grad.view(-1)[0] = 10.0
    small.grad = torch.zeros_like(small)
    small.grad.view(-1)[0] = 1.0
    norm = dino.clip_gradients(3.0)
    assert norm == pytest.approx(math.sqrt(101.0))
    assert big.grad.norm().item() == pytest.approx(3.0, rel=1e-5)
    assert small.grad.norm().item() == pytest.approx(1.0)  # a global clip would have scaled it to 0.3


def test_centring_can_be_switched_off() -> None:
    dino = build("dino", n_local_crops=0, centre=False)
    dino.centering.update(torch.randn(4, 32))
    assert not dino.centering.enabled and dino.centering.centre.abs().sum() == 0


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize(("name", "network"), [("dino", "teacher"), ("ibot", "teacher"), ("smit", "student")])
def test_exported_network(name: str, network: str, tmp_path) -> None:
    method = build(name)
    expected = method.teacher_encoder.module if network == "teacher" else method.encoder
    assert method.exported_network() == network and method.encoder_for_export() is expected
    other = "student" if network == "teacher" else "teacher"
    override = build(name, export_network=other)
    assert override.exported_network() == other
    assert override.encoder_for_export() is not override.encoder_for_export(network)

    config = PretrainConfig(
        method=MethodConfig(name=name, options=SMALL_HEAD),
        crop_size=32,
        encoder=EncoderConfig(preset="tiny", window_size=4),
        schedule=ScheduleConfig(steps=0),
    )
    run_pretrain(config, tmp_path / name)
    _, meta = read_encoder_checkpoint(RunDir(tmp_path / name).encoder_path)
    assert meta["exported_network"] == network


def test_a_method_without_teacher_cannot_export_one() -> None:
    from medssl.errors import ConfigError

    with pytest.raises(ConfigError, match="no teacher"):
        build_method(
            MethodConfig(name="simmim", options={"export_network": "teacher"}),
            SwinEncoder(EncoderConfig(preset="tiny", window_size=4)),
            32,
            8,
        )
