"""DINO, iBOT and SMIT at 32^3 on a tiny Swin: views, training steps, teacher, freezing, export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import default_collate

from medssl.config import EncoderConfig, MethodConfig, PretrainConfig, ScheduleConfig, load_yaml
from medssl.data.multicrop import local_crop_size, multicrop_views, region_crops
from medssl.methods.base import REGISTRY, EMATeacher, SSLMethod, build_method
from medssl.methods.dino import DINO
from medssl.methods.ibot import IBOT
from medssl.methods.smit import SMIT, smit_region_size
from medssl.models.checkpoint import load_encoder_state
from medssl.models.encoder import SwinEncoder
from medssl.models.segmenter import SwinSegmenter
from medssl.train.step import Optimisation, build_optimisation, train_step

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "methods"
CROP = 32
# Heads narrower than the published 2048/256/8192 but not tiny: a head whose bottleneck code has a
# very small norm before L2 normalisation has huge gradients, and a first step overshoots.
# One step per epoch, so the recipes' epoch counts read as steps here.
SMALL_HEAD = {
    "out_dim": 64,
    "hidden_dim": 256,
    "bottleneck_dim": 64,
    "epoch_knobs": "corpus_epochs",
    "steps_per_epoch": 1,
}
# A 32^3 crop has one bottleneck token: the contract cases mask it from the first step ("rand", ratio 1).
IBOT_MASKED = {"pred_start_epoch": 0, "pred_shape": "rand", "pred_ratio": [1.0], "pred_ratio_var": [0.0]}
CASES = {
    "dino": {"n_local_crops": 1},
    "ibot": {"n_local_crops": 1, **IBOT_MASKED},
    "ibot-separate": {
        "n_local_crops": 0,
        "shared_head": False,
        "shared_head_teacher": False,
        "patch_out_dim": 32,
        **IBOT_MASKED,
    },
    "smit": {},
}


def build(case: str, total_steps: int = 8, seed: int = 0, **options) -> SSLMethod:
    torch.manual_seed(seed)
    encoder = SwinEncoder(EncoderConfig(preset="tiny", window_size=4))
    name = case.split("-")[0]
    config = MethodConfig(name=name, options={**SMALL_HEAD, **CASES[case], **options})
    return build_method(config, encoder, crop_size=CROP, total_steps=total_steps)


def smooth_region(side: int, seed: int = 0) -> torch.Tensor:
    """A (1, side, side, side) volume with spatial structure (smoothed noise) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 1, side + 4, side + 4, side + 4, generator=g)
    return nn.functional.avg_pool3d(noise, 5, stride=1)[0]


def fixed_batch(method: SSLMethod, n: int = 1) -> dict[str, torch.Tensor]:
    region = smooth_region(method.region_size(CROP))
    return default_collate([method.make_views(region, np.random.default_rng([0, i])) for i in range(n)])


def student_teacher_pairs(method: SSLMethod) -> list[tuple[nn.Module, EMATeacher]]:
    """(student module, its EMA teacher) as the method declares them; every teacher is declared."""
    pairs = method.momentum_pairs()
    teachers = [child for child in method.children() if isinstance(child, EMATeacher)]
    assert {id(t) for _, t in pairs} == {id(t) for t in teachers}
    return pairs


def step(opt: Optimisation, batch: dict, index: int) -> dict[str, float]:
    """One step of the training loop (its own ``train_step``: forward, backward, cancel, optimizer, EMA)."""
    out = train_step(opt, batch, index).outputs
    return {k: float(v.detach()) for k, v in out.items()}


def constant_lr_training(method: SSLMethod, lr: float, steps: int) -> Optimisation:
    schedule = ScheduleConfig(steps=steps, lr=lr, min_lr=lr, warmup_steps=0, grad_clip=None, amp="off")
    return build_optimisation(method, schedule, steps, torch.device("cpu"))


def optimizer_for(method: SSLMethod, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=lr)


# --------------------------------------------------------------------------- views


def test_local_crop_size_is_a_multiple_of_32() -> None:
    assert [local_crop_size(s) for s in (32, 64, 96, 128, 192)] == [32, 32, 32, 64, 96]


def test_smit_region_size() -> None:
    assert smit_region_size(96) == 128
    assert smit_region_size(32) == 48
    assert smit_region_size(64) == 80
    assert build("smit").region_size(CROP) == 48


def test_multicrop_views_shapes_and_determinism() -> None:
    region = smooth_region(64)
    views = multicrop_views(region, np.random.default_rng(3), crop_size=64, n_local=3, local_size=32)
    assert views["global_crops"].shape == (2, 1, 64, 64, 64)
    assert views["local_crops"].shape == (3, 1, 32, 32, 32)
    assert views["global_crops"].dtype == torch.float32
    again = multicrop_views(region, np.random.default_rng(3), crop_size=64, n_local=3, local_size=32)
    assert torch.equal(views["local_crops"], again["local_crops"])
    assert not torch.equal(views["global_crops"][0], views["global_crops"][1])
    assert "local_crops" not in multicrop_views(
        region, np.random.default_rng(3), crop_size=32, n_local=0, local_size=32
    )
    with pytest.raises(ValueError):
        multicrop_views(region, np.random.default_rng(3), crop_size=32, n_local=1, local_size=48)


def test_region_crops_shapes() -> None:
    crops = region_crops(smooth_region(48), 32, 2, np.random.default_rng(0))
    assert crops.shape == (2, 1, 32, 32, 32)
    with pytest.raises(ValueError):
        region_crops(smooth_region(24), 32, 2, np.random.default_rng(0))


def test_method_views() -> None:
    dino = build("dino", n_local_crops=2)
    views = dino.make_views(smooth_region(CROP), np.random.default_rng(0))
    assert views["global_crops"].shape == (2, 1, CROP, CROP, CROP)
    assert views["local_crops"].shape == (2, 1, 32, 32, 32)

    ibot = build("ibot")
    views = ibot.make_views(smooth_region(CROP), np.random.default_rng(0))
    assert views["global_masks"].shape == (2, 16, 16, 16) and views["global_masks"].dtype == torch.bool
    # One bottleneck token at 32^3: patch_stage auto masks the 2^3 tokens of encoder output 3 instead.
    assert ibot.patch_stage == 3 and views["global_token_masks"].shape == (2, 2, 2, 2)

    smit = build("smit")
    views = smit.make_views(smooth_region(48), np.random.default_rng(0))
    assert views["crops"].shape == (2, 1, CROP, CROP, CROP)
    assert views["masks"].shape == (2, 16, 16, 16)
    # 16^3-voxel blocks = 8^3 tokens: 8 blocks in a 32^3 crop, round(0.7 * 8) = 6 masked.
    assert views["masks"].float().mean(dim=(1, 2, 3)).tolist() == pytest.approx([0.75, 0.75])


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("case", ["dino", "ibot", "smit"])
def test_student_fits_a_fixed_teacher(case: str) -> None:
    """With the teacher frozen (momentum 1, no centring) the loss must fall on a fixed batch."""
    frozen = {"teacher_momentum": 1.0, "centre_momentum": 1.0}
    if case.startswith("ibot"):
        frozen["patch_centre_momentum"] = 1.0
    if case != "smit":
        frozen["n_local_crops"] = 0  # two global views suffice here; the contract test covers local crops
    method = build(case, total_steps=3, teacher_temp_warmup_epochs=0, freeze_last_layer_epochs=0, **frozen)
    batch = fixed_batch(method)
    opt = constant_lr_training(method, lr=1e-5, steps=3)
    losses = [step(opt, batch, i)["loss"] for i in range(3)]
    assert all(np.isfinite(losses))
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses


@pytest.mark.parametrize("case", list(CASES))
def test_training_steps_contract(case: str) -> None:
    total, frozen, n_steps = 8, 1, 2
    method = build(case, total_steps=total, freeze_last_layer_epochs=frozen, teacher_temp_warmup_epochs=2)
    batch = fixed_batch(method)
    optimizer = optimizer_for(method, lr=1e-4)
    pairs = student_teacher_pairs(method)
    assert len(pairs) == 2  # encoder and head (iBOT's and SMIT's patch heads live in the head)
    last_layer = [p.detach().clone() for p in method.last_layer_parameters()]
    assert last_layer, "the prototypes must be trainable"

    # Masked methods: the student encoder sees masks, the teacher never does.
    seen: dict[str, list[bool]] = {"student": [], "teacher": []}

    def watch(role: str):
        def hook(_module, args, kwargs):
            seen[role].append(kwargs.get("mask") is not None)

        return hook

    handles = [
        method.encoder.register_forward_pre_hook(watch("student"), with_kwargs=True),
        method.teacher_encoder.module.register_forward_pre_hook(watch("teacher"), with_kwargs=True),
    ]
    records = []
    for i in range(n_steps):
        teacher_before = [[p.detach().clone() for p in t.module.parameters()] for _, t in pairs]
        out = method(batch, i)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        for _, teacher in pairs:  # the teacher is a target: no gradient reaches it
            assert all(p.grad is None for p in teacher.parameters())
        method.cancel_gradients(i)
        optimizer.step()
        method.on_after_step(i)
        records.append({k: float(v.detach()) for k, v in out.items()})

        # The teacher changes only by EMA of the updated student.
        for (student, teacher), before in zip(pairs, teacher_before, strict=True):
            m = method.momentum(i)
            for t_new, t_old, s in zip(teacher.module.parameters(), before, student.parameters(), strict=True):
                torch.testing.assert_close(t_new, m * t_old + (1 - m) * s.detach(), rtol=1e-5, atol=1e-7)
        now = [p.detach() for p in method.last_layer_parameters()]
        changed = any(not torch.equal(a, b) for a, b in zip(last_layer, now, strict=True))
        assert changed == (i >= frozen), f"step {i}: last layer changed={changed}"
    for h in handles:
        h.remove()

    masked = case != "dino"
    assert seen["teacher"] and not any(seen["teacher"])
    # One masked student pass per step (the global crops; iBOT's local crops are never masked).
    assert seen["student"].count(True) == (n_steps if masked else 0)

    components = {
        "dino": ["dino_ce"],
        "ibot": ["global_ce", "patch_ce"],
        "ibot-separate": ["global_ce", "patch_ce"],
        "smit": ["patch_ce", "global_ce", "reconstruction_l1"],
    }[case]
    for record in records:
        for key in ["loss", "health/embedding_std_scaled", "health/teacher_entropy", *components]:
            assert np.isfinite(record[key]), (key, record)
        assert 0.0 < record["health/teacher_entropy"] <= np.log(64) + 1e-5
        assert 0.0 < record["health/teacher_batch_entropy"] <= np.log(64) + 1e-5
    assert records[0]["teacher_temp"] == pytest.approx(0.04) and records[1]["teacher_temp"] == pytest.approx(0.07)
    if case == "smit":
        expected = 0.1 * records[0]["patch_ce"] + 0.1 * records[0]["global_ce"] + records[0]["reconstruction_l1"]
        assert records[0]["loss"] == pytest.approx(expected, rel=1e-5)
    elif case != "dino":
        assert records[0]["loss"] == pytest.approx(records[0]["global_ce"] + records[0]["patch_ce"], rel=1e-5)
    centres = [mod.centre for mod in method.modules() if hasattr(mod, "centre")]
    assert centres and all(c.abs().sum() > 0 for c in centres)

    # The trained encoder fills every encoder tensor of a SwinUNETR-style segmenter.
    segmenter = SwinSegmenter(method.encoder.config, out_channels=2, crop_size=CROP)
    report = load_encoder_state(segmenter, method.encoder.state_dict(), prefix="swinViT.")
    assert report.loaded == report.expected == len(method.encoder.state_dict())
    for key, value in method.encoder.state_dict().items():
        assert torch.equal(segmenter.state_dict()["swinViT." + key], value)


# --------------------------------------------------------------------------- registry and configs


@pytest.mark.parametrize(
    ("name", "cls", "family"),
    [("dino", DINO, "self_distillation"), ("ibot", IBOT, "self_distillation"), ("smit", SMIT, "mim")],
)
def test_registry_and_default_config(name: str, cls: type, family: str) -> None:
    assert REGISTRY[name] is cls and cls.family == family and cls.description
    data = load_yaml(CONFIGS / f"{name}.yaml")
    config = PretrainConfig.model_validate(data)
    assert config.method.name == name
    params = cls.parse_params(config.method.options)
    assert params == cls.Params()  # the YAML spells out the defaults, nothing else
    assert set(config.method.options) == set(cls.Params.model_fields)


def test_bad_options_fail_with_a_config_error() -> None:
    from medssl.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown key"):
        DINO.parse_params({"n_local_crop": 2})
    with pytest.raises(ConfigError, match="local_size"):
        DINO.parse_params({"local_size": 48})
    with pytest.raises(ConfigError, match="pred_ratio"):
        IBOT.parse_params({"pred_ratio": [0.6], "pred_ratio_var": [0.5]})
    with pytest.raises(ConfigError, match="pred_ratio_var"):
        IBOT.parse_params({"pred_ratio": [0.0, 0.3], "pred_ratio_var": [0.0, 0.1, 0.2]})
    with pytest.raises(ConfigError, match="export_network"):
        DINO.parse_params({"export_network": "both"})
