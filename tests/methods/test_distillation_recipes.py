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

SMALL_HEAD = {
    "out_dim": 32,
    "hidden_dim": 64,
    "bottleneck_dim": 16,
    "epoch_knobs": "corpus_epochs",
    "steps_per_epoch": 1,
}


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
    corpus = {"out_dim": 32, "epoch_knobs": "corpus_epochs"}
    encoder = SwinEncoder(EncoderConfig(preset="tiny", window_size=4))
    method = build_method(MethodConfig(name="smit", options=corpus), encoder, 32, 100, steps_per_epoch=7)
    assert method.steps_per_epoch == 7 and method.freeze_last_layer_steps == 7
    explicit = build_method(
        MethodConfig(name="smit", options={**corpus, "steps_per_epoch": 3}),
        SwinEncoder(EncoderConfig(preset="tiny", window_size=4)),
        32,
        100,
        steps_per_epoch=7,
    )
    assert explicit.steps_per_epoch == 3


@pytest.mark.parametrize(
    ("name", "published", "knobs"),
    [
        ("dino", 300, {"teacher_temp_warmup": 30, "freeze_last_layer": 1}),
        ("ibot", 300, {"teacher_temp_warmup": 30, "freeze_last_layer": 1, "pred_start": 50}),
        ("smit", 500, {"teacher_temp_warmup": 30, "freeze_last_layer": 1, "patch_temp_hold": 30}),
    ],
)
def test_epoch_knobs_are_fractions_of_the_published_run_by_default(name: str, published: int, knobs: dict) -> None:
    """The recipes' epoch counts keep their share of the published run whatever the run's length and corpus
    (DINO's 30 of 300 epochs: the first 10 % of the steps), unless ``epoch_knobs: corpus_epochs``."""
    encoder = SwinEncoder(EncoderConfig(preset="tiny", window_size=4))
    steps = 3000
    method = build_method(MethodConfig(name=name, options={"out_dim": 32}), encoder, 32, steps, steps_per_epoch=7)
    assert method.params.epoch_knobs == "published_fraction" and method.params.published_epochs == published
    assert method.knobs == {k: round(v / published * steps) for k, v in knobs.items()}
    warm = method.knobs["teacher_temp_warmup"]
    assert method.teacher_temperature(0) == pytest.approx(0.04) and method.teacher_temperature(warm) == pytest.approx(
        0.07
    )
    assert method.freeze_last_layer_steps == method.knobs["freeze_last_layer"]
    if name == "ibot":
        assert method.mask_start_step == round(50 / 300 * steps)  # masking starts after 1/6 of the run
    literal = build_method(
        MethodConfig(name=name, options={"out_dim": 32, "epoch_knobs": "corpus_epochs"}),
        SwinEncoder(EncoderConfig(preset="tiny", window_size=4)),
        32,
        steps,
        steps_per_epoch=7,
    )
    assert literal.knobs == {k: v * 7 for k, v in knobs.items()}


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
    recipe = build("ibot", crop=64)  # 2^3 bottleneck tokens: the released layout
    assert recipe.patch_stage == 4
    assert recipe.params.norm_last_layer is False and recipe.params.shared_head and recipe.params.shared_head_teacher
    assert recipe.head.patch == "shared" and not hasattr(recipe.head, "last_layer2")  # whole head shared
    separate = build("ibot", crop=64, shared_head=False)
    assert separate.head.patch == "shared_mlp" and hasattr(separate.head, "last_layer2")


def test_ibot_below_64_masks_and_distils_the_tokens_of_an_earlier_output() -> None:
    """At 32^3 (one bottleneck token) ``patch_stage: auto`` distils encoder output 3 (2^3 tokens of 16 voxels)
    through a separate patch head, masks whole tokens of it, and the masked-patch term is > 0; the global term
    stays on the bottleneck. ``patch_stage: 4`` keeps the released level (nothing can be masked then)."""
    ibot = build("ibot", n_local_crops=0, pred_start_epoch=0, pred_shape="rand", pred_ratio=[0.5], pred_ratio_var=[0.0])
    assert ibot.patch_stage == 3 and ibot.head.patch == "separate"
    assert ibot.pretext() == {
        "distill_stage": 3,
        "distill_tokens": 8,
        "mask_unit_voxels": 16,
        "mask_start_step": 0,
        "trained_stages": 4,
    }
    views = ibot.make_views(region(32), np.random.default_rng(0))
    for patch_mask, token_mask in zip(views["global_masks"], views["global_token_masks"], strict=True):
        assert token_mask.shape == (2, 2, 2) and int(token_mask.sum()) == 4
        assert_whole_tokens(patch_mask, token_mask, 8)  # a stage-3 token is 16^3 voxels, 8^3 patches
    batch = {k: v.unsqueeze(0) for k, v in views.items()}
    out = ibot(batch, 0)
    assert out["patch_ce"].item() > 0 and out["mask_fraction"].item() == pytest.approx(0.5)
    out["loss"].backward()
    assert ibot.head.patch_head.last_layer.parametrizations.weight.original1.grad is not None
    assert all(p.grad is not None for p in ibot.encoder.layers4.parameters() if p.requires_grad)
    released = build("ibot", n_local_crops=0, patch_stage=4)
    assert released.patch_stage == 4 and released.pretext()["distill_tokens"] == 1


def test_an_ibot_run_at_32_logs_a_masked_patch_term(tmp_path) -> None:
    """The check of issue 17: iBOT pretrained at 32^3 with ``method.options.pred_start_epoch=0`` logs a masked
    patch term > 0, and its results record the level it distilled (``pretext``)."""
    from medssl.config import PreprocessConfig
    from medssl.data.corpus import ingest_corpus
    from medssl.data.synth import synth_corpus

    pre = PreprocessConfig(spacing=(4.0, 4.0, 4.0))
    synth_corpus(tmp_path / "scans", 3, seed=3, shape=(40, 40, 40))
    corpus = ingest_corpus(tmp_path / "scans", tmp_path / "corpus", pre).root
    options = {**SMALL_HEAD, "epoch_knobs": "published_fraction", "n_local_crops": 0, "pred_start_epoch": 0}
    config = PretrainConfig(
        method=MethodConfig(name="ibot", options=options),
        encoder=EncoderConfig(preset="tiny", window_size=4),
        corpus=corpus,
        crop_size=32,
        preprocess=pre,
        schedule=ScheduleConfig(steps=3, batch_size=2, lr=1e-5, warmup_steps=0, log_every=1),
    )
    results = run_pretrain(config, tmp_path / "ibot")
    logged = [r for r in RunDir(tmp_path / "ibot").read_metrics() if "patch_ce" in r]
    assert len(logged) == 3 and max(r["patch_ce"] for r in logged) > 0
    assert max(r["mask_fraction"] for r in logged) > 0
    assert results["pretext"]["distill_stage"] == 3 and results["pretext"]["distill_tokens"] == 8


# --------------------------------------------------------------------------- teachers


@pytest.mark.parametrize(
    ("name", "options"), [("dino", {}), ("smit", {"teacher_init": "student", "teacher_stochastic_depth": False})]
)
def test_teacher_is_deterministic_in_training_mode_with_drop_path(name: str, options: dict) -> None:
    method = build(name, drop_path=0.5, **options)
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


def test_smit_teacher_as_released_is_independent_and_keeps_its_drop_path() -> None:
    """SMIT's train_self_supervised.py builds model_T on its own (its own random initialisation) and never puts
    it in eval mode, so its stochastic depth is active in training; medssl's defaults do the same."""
    smit = build("smit", drop_path=0.5)
    assert smit.params.teacher_init == "independent" and smit.params.teacher_stochastic_depth
    student, teacher = smit.encoder.state_dict(), smit.teacher_encoder.module.state_dict()
    assert student.keys() == teacher.keys()
    assert not torch.equal(student["layers1.0.blocks.0.attn.qkv.weight"], teacher["layers1.0.blocks.0.attn.qkv.weight"])
    assert teacher["layers1.0.blocks.0.attn.qkv.weight"].requires_grad is False
    assert smit.teacher_encoder.module.config.drop_path_rate == 0.5
    assert any(m.drop_prob > 0 for m in smit.teacher_encoder.modules() if isinstance(m, DropPath))
    x = region(32).unsqueeze(0)
    smit.train()
    assert smit.teacher_encoder.training  # never in eval mode while the student trains
    assert not torch.equal(smit.teacher_encoder(x)[-1], smit.teacher_encoder(x)[-1])  # drop paths differ
    smit.eval()
    assert torch.equal(smit.teacher_encoder(x)[-1], smit.teacher_encoder(x)[-1])
    # The EMA still moves it towards the student, step by step.
    before = smit.teacher_encoder.module.patch_embed.proj.weight.clone()
    smit.on_after_step(0)
    m = smit.momentum(0)
    expected = m * before + (1 - m) * smit.encoder.patch_embed.proj.weight
    assert torch.allclose(smit.teacher_encoder.module.patch_embed.proj.weight, expected)
    copied = build("smit", teacher_init="student")
    assert torch.equal(copied.encoder.patch_embed.proj.weight, copied.teacher_encoder.module.patch_embed.proj.weight)


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
