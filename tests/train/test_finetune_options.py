"""Fine-tuning options for pretrained transformers: per-parameter learning rates (encoder multiplier,
SimMIM-style layer decay) as the loop really applies them, the frozen-encoder warm phase, and the early
stop on a validation plateau."""

import numpy as np
import pytest
import torch

from medssl.config import EncoderConfig, FinetuneConfig, PreprocessConfig, ScheduleConfig
from medssl.data.synth import synth_task
from medssl.models import SwinSegmenter
from medssl.runs import RunDir
from medssl.train.distributed import DistInfo
from medssl.train.finetune import SegmentationModule, plateau_reached, run_finetune, swin_layer_id
from medssl.train.loop import train

TINY = EncoderConfig(preset="tiny", window_size=4)
PRE = PreprocessConfig(spacing=(4.0, 4.0, 4.0))
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class RandomCrops(torch.utils.data.Dataset):
    def __len__(self):
        return 10**6

    def __getitem__(self, i):
        rng = np.random.default_rng([11, i])
        return {
            "image": torch.from_numpy(rng.random((1, 32, 32, 32), dtype=np.float32)),
            "label": torch.from_numpy(rng.integers(0, 3, (1, 32, 32, 32))),
        }


def _module(**options):
    torch.manual_seed(0)
    return SegmentationModule(SwinSegmenter(TINY, out_channels=3, crop_size=32), "dice", **options)


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _schedule(steps, lr=1e-3):
    # Constant lr (min_lr = lr, no warm-up), no clipping: Adam's first update of a weight is then
    # lr * g / (|g| + eps), lr in size where |g| >> eps, so how far a weight moved reads its lr off directly.
    return ScheduleConfig(
        steps=steps,
        batch_size=1,
        lr=lr,
        min_lr=lr,
        warmup_steps=0,
        weight_decay=0.0,
        grad_clip=None,
        log_every=1,
        checkpoint_every=100,
    )


def test_swin_layer_ids_follow_simmim_get_swin_layer():
    depths = (2, 2, 2, 2)
    assert swin_layer_id("patch_embed.proj.weight", depths) == 0
    assert swin_layer_id("mask_token", depths) == 0
    assert swin_layer_id("layers1.0.blocks.0.attn.qkv.weight", depths) == 1
    assert swin_layer_id("layers1.0.blocks.1.mlp.linear1.weight", depths) == 2
    assert swin_layer_id("layers1.0.downsample.reduction.weight", depths) == 2
    assert swin_layer_id("layers3.0.blocks.1.norm1.weight", depths) == 6
    assert swin_layer_id("layers4.0.blocks.1.attn.proj.weight", depths) == 8
    assert swin_layer_id("layers4.0.downsample.norm.weight", depths) == 8
    assert swin_layer_id("norm.weight", (2, 2, 8, 2)) == 15


def test_defaults_leave_every_parameter_at_the_scheduled_lr():
    module = _module()
    groups = module.param_groups(1e-5)
    assert {g["lr_scale"] for g in groups} == {1.0}
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in module.parameters())


def test_the_loop_applies_encoder_scale_and_layer_decay_per_parameter(tmp_path):
    module = _module(encoder_lr_scale=0.5, layer_decay=0.5)
    before = _snapshot(module)
    lr = 1e-3
    train(module, RandomCrops(), _schedule(1, lr), RunDir(tmp_path / "run"), CPU)
    top = sum(TINY.depths) + 1  # 9: the decoder's layer
    expected = {
        "model.decoder1.conv_block.conv1.conv.weight": lr,  # decoder: the scheduled lr
        "model.swinViT.layers4.0.blocks.1.attn.qkv.weight": lr * 0.5 * 0.5 ** (top - 8),
        "model.swinViT.layers2.0.blocks.0.attn.qkv.weight": lr * 0.5 * 0.5 ** (top - 3),
        "model.swinViT.patch_embed.proj.weight": lr * 0.5 * 0.5**top,
    }
    params = dict(module.named_parameters())
    for name, want in expected.items():
        # The largest move is a weight whose gradient dwarfs Adam's eps (1e-8): exactly its lr.
        moved = float((params[name].detach() - before[name]).abs().max())
        assert moved == pytest.approx(want, rel=0.02), name


def test_frozen_warm_phase_leaves_the_encoder_unchanged_then_trains_it(tmp_path):
    module = _module(freeze_encoder_steps=2)
    before = _snapshot(module)
    train(module, RandomCrops(), _schedule(2), RunDir(tmp_path / "frozen"), CPU)
    after = _snapshot(module)
    encoder = [n for n in before if n.startswith("model.swinViT.") and module.get_parameter(n).requires_grad]
    decoder = [n for n in before if not n.startswith("model.swinViT.")]
    assert encoder and all(torch.equal(before[n], after[n]) for n in encoder)
    assert any(not torch.equal(before[n], after[n]) for n in decoder)

    module = _module(freeze_encoder_steps=2)
    train(module, RandomCrops(), _schedule(3), RunDir(tmp_path / "thawed"), CPU)
    assert any(not torch.equal(before[n], module.get_parameter(n).detach()) for n in encoder)


def test_plateau_rule():
    assert not plateau_reached([0.1, 0.2, 0.3], patience=2)
    assert plateau_reached([0.1, 0.3, 0.3, 0.29], patience=2)
    assert not plateau_reached([0.1, 0.3, 0.3, 0.35], patience=2)
    assert plateau_reached([0.1, 0.3, 0.31, 0.32], patience=2, min_delta=0.05)
    assert not plateau_reached([], patience=1)


def test_early_stop_ends_the_run_on_a_plateau_and_is_recorded(tmp_path):
    task = synth_task(tmp_path / "task", "ct_organs", 6, seed=5, shape=(32, 32, 32))
    # min_delta 1.0: no validation can improve on the first by that much, so the run stops at the second.
    cfg = FinetuneConfig(
        task=task,
        encoder=TINY,
        budget=2,
        crop_size=32,
        preprocess=PRE,
        val_every=1,
        n_test=1,
        n_val=1,
        early_stop_patience=1,
        early_stop_min_delta=1.0,
        schedule=ScheduleConfig(steps=6, batch_size=1, lr=1e-3, warmup_steps=0),
    )
    results = run_finetune(cfg, tmp_path / "ft")
    assert results["stopped_early_at"] == 2 and results["steps_run"] == 2 and results["steps"] == 6
    assert [r["step"] for r in results["val_curve"]] == [1, 2]
    assert "early stop after step 2" in (tmp_path / "ft" / "log.txt").read_text()
