"""SimCLR, MoCo v3, BYOL, RotNet and SwinUNETR-SSL: views, recipes, training steps, EMA teachers, export."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from medssl.config import EncoderConfig, PretrainConfig, load_yaml
from medssl.data.views import (
    SWINUNETR_ROTATION_AXIS,
    cutout,
    enlarged_region_side,
    intensity_augment,
    random_box_sides,
    random_resized_crop_3d,
    random_rotation_label,
    rotate90_view,
    rotation_classes,
    rotation_from_label,
    solarize,
    two_crops,
)
from medssl.errors import ConfigError
from medssl.methods import byol, mocov3, rotnet, simclr, swinunetr_ssl
from medssl.methods.base import REGISTRY, build_method
from medssl.methods.losses import moco_v3_infonce, nt_xent
from medssl.methods.swinunetr_ssl import fill_from_batch
from medssl.models.checkpoint import load_encoder_state
from medssl.models.encoder import SwinEncoder
from medssl.models.segmenter import SwinSegmenter

CROP = 32
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "methods"
METHOD_MODULES = {"simclr": simclr, "mocov3": mocov3, "byol": byol, "rotnet": rotnet, "swinunetr_ssl": swinunetr_ssl}
SMALL_HEADS = {
    "simclr": {"proj_hidden_dim": 64, "proj_dim": 32},
    "mocov3": {"proj_hidden_dim": 64, "proj_dim": 32, "pred_hidden_dim": 64},
    "byol": {"proj_hidden_dim": 64, "proj_dim": 32, "pred_hidden_dim": 64},
    "rotnet": {},
    # a 32^3 crop has one bottleneck token: the reference's tokens 0 / 1 do not exist (tested below)
    "swinunetr_ssl": {"contrastive_dim": 32, "head_input": "pooled"},
}
VIEW_SHAPES = {
    "simclr": {"view1": (1, CROP, CROP, CROP), "view2": (1, CROP, CROP, CROP)},
    "mocov3": {"view1": (1, CROP, CROP, CROP), "view2": (1, CROP, CROP, CROP)},
    "byol": {"view1": (1, CROP, CROP, CROP), "view2": (1, CROP, CROP, CROP)},
    "rotnet": {"image": (4, 1, CROP, CROP, CROP), "rotation": (4,)},  # all four rotations of one crop
    "swinunetr_ssl": {
        **{f"{k}{i}": (1, CROP, CROP, CROP) for k in ("view", "target", "donor_mask") for i in (1, 2)},
        **{f"{k}{i}": () for k in ("rotation", "cut_fraction", "donor_draw") for i in (1, 2)},
    },
}
COMPONENTS = {
    "simclr": {"nt_xent"},
    "mocov3": {"infonce"},
    "byol": {"byol"},
    "rotnet": {"rotation_ce", "rotation_accuracy"},
    "swinunetr_ssl": {"rotation_ce", "contrastive", "reconstruction_l1"},
}


def tiny_encoder_config() -> EncoderConfig:
    return EncoderConfig(preset="tiny", window_size=4)


def build(name: str, total_steps: int = 10, **options) -> torch.nn.Module:
    cls = REGISTRY[name]
    params = cls.parse_params({**SMALL_HEADS[name], **options})
    return cls(SwinEncoder(tiny_encoder_config()), params, crop_size=CROP, total_steps=total_steps)


def synthetic_region(side: int, seed: int = 0) -> torch.Tensor:
    """A smooth blob phantom on a ramp, so crops and rotations differ visibly."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, side)] * 3, indexing="ij"))
    centre = torch.rand(3, 1, 1, 1, generator=g) * 0.8 - 0.4
    blob = torch.exp(-((grid - centre) ** 2).sum(0) / 0.1)
    ramp = 0.3 * (grid[0] + 1) / 2 + 0.1 * grid[1]
    return (blob + ramp + 0.02 * torch.randn(side, side, side, generator=g)).unsqueeze(0).float()


def make_batch(method, n: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    side = method.region_size(CROP)
    samples = [method.make_views(synthetic_region(side, seed + i), np.random.default_rng([seed, i])) for i in range(n)]
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


# --------------------------------------------------------------------------- views


def test_random_resized_crop_shape_scale_and_determinism():
    region = torch.arange(48**3, dtype=torch.float32).reshape(1, 48, 48, 48)
    a = random_resized_crop_3d(region, 32, (0.3, 1.0), np.random.default_rng(5))
    b = random_resized_crop_3d(region, 32, (0.3, 1.0), np.random.default_rng(5))
    assert a.shape == (1, 32, 32, 32) and torch.equal(a, b)
    # A full-volume crop keeps the whole region's range; a tiny one covers a narrow range.
    full = random_resized_crop_3d(region, 48, (1.0, 1.0), np.random.default_rng(0))
    assert torch.equal(full, region)
    small = random_resized_crop_3d(region, 8, (0.01, 0.01), np.random.default_rng(0))
    assert float(small.max() - small.min()) < float(region.max() - region.min()) / 4
    c1, c2 = two_crops(region, 32, np.random.default_rng(1), (0.3, 1.0))
    assert c1.shape == c2.shape == (1, 32, 32, 32) and not torch.equal(c1, c2)
    with pytest.raises(ValueError):
        random_resized_crop_3d(region, 32, (0.0, 1.0), np.random.default_rng(0))


def test_random_resized_crop_with_aspect_ratio_stays_in_scale_and_ratio_bounds():
    """SimMIM's RandomResizedCrop(scale=(0.67, 1), ratio=(3/4, 4/3)) in 3D: volume fraction and the
    side ratios Y/X, Z/X within bounds (up to rounding of the sides), and boxes that fit the region."""
    spatial, scale, ratio = (48, 48, 48), (0.67, 1.0), (3 / 4, 4 / 3)
    shapes = set()
    for seed in range(200):
        sides = random_box_sides(spatial, scale, ratio, np.random.default_rng(seed))
        assert all(1 <= side <= 48 for side in sides)
        fraction = np.prod(sides) / 48**3
        assert scale[0] - 0.05 <= fraction <= scale[1] + 1e-9, (sides, fraction)
        for other in sides[1:]:
            assert ratio[0] - 0.05 <= other / sides[0] <= ratio[1] + 0.05, sides
        shapes.add(tuple(sides))
    assert len(shapes) > 20  # shapes vary: not the proportional fallback every time
    assert any(len(set(shape)) > 1 for shape in shapes)  # some non-cubic boxes
    crop = random_resized_crop_3d(synthetic_region(48), 32, scale, np.random.default_rng(0), ratio)
    assert crop.shape == (1, 32, 32, 32)
    with pytest.raises(ValueError):
        random_resized_crop_3d(synthetic_region(48), 32, scale, np.random.default_rng(0), (2.0, 1.0))


def test_enlarged_region_side_rounds_up_to_16():
    assert enlarged_region_side(32, 1.25) == 48
    assert enlarged_region_side(64, 1.25) == 80
    assert enlarged_region_side(96, 1.25) == 128
    assert enlarged_region_side(96, 1.0) == 96


def test_intensity_augment_is_seeded_and_changes_values():
    x = synthetic_region(32)
    a = intensity_augment(x, np.random.default_rng(3), scale_prob=1.0, shift_prob=1.0, noise_prob=1.0, blur_prob=1.0)
    b = intensity_augment(x, np.random.default_rng(3), scale_prob=1.0, shift_prob=1.0, noise_prob=1.0, blur_prob=1.0)
    assert type(a) is torch.Tensor and a.dtype == torch.float32 and a.shape == x.shape
    assert torch.equal(a, b) and not torch.allclose(a, x)
    unchanged = intensity_augment(x, np.random.default_rng(3), scale_prob=0, shift_prob=0, noise_prob=0, blur_prob=0)
    assert torch.allclose(unchanged, x)


def test_rotations_labels_and_inverse():
    x = synthetic_region(16)
    for n_axes in (1, 3):
        n = rotation_classes(n_axes)
        views = []
        for label in range(n):
            k, axis = rotation_from_label(label, n_axes)
            view = rotate90_view(x, k, axis)
            assert view.shape == x.shape
            assert torch.equal(rotate90_view(view, 4 - k, axis), x)  # rotating back restores the crop
            views.append(view)
        # Every class is a distinct view of an asymmetric crop (no duplicated identity classes).
        for i in range(n):
            for j in range(i + 1, n):
                assert not torch.equal(views[i], views[j]), (n_axes, i, j)
    assert rotation_classes(1) == 4 and rotation_classes(3) == 10
    labels = {random_rotation_label(np.random.default_rng(s), 3)[0] for s in range(200)}
    assert labels == set(range(10))
    with pytest.raises(ValueError):
        rotation_classes(2)


def test_cutout_respects_the_budget_and_reports_its_mask():
    x = synthetic_region(32)
    # patch_rand_drop stops once the summed box volume reaches a budget of U(0, 0.3): the union may pass
    # 0.3 by at most the last box (sides < 0.25 of the crop), where the old cap stopped before it.
    last_box = 0.25**3
    for seed in range(10):
        out, mask = cutout(x, np.random.default_rng(seed), max_fraction=0.3)
        assert mask.shape == (1, 32, 32, 32) and mask.dtype == torch.bool
        assert 0.0 < mask.float().mean().item() <= 0.3 + last_box
        assert torch.equal(out[~mask], x[~mask])  # untouched outside the mask
        assert not torch.equal(out[mask], x[mask])
        assert out[mask].min() >= 0.0 and out[mask].max() <= 1.0  # the reference's noise, min-max scaled to [0, 1]
    donor = torch.full_like(x, 7.0)
    out, mask = cutout(x, np.random.default_rng(0), max_fraction=0.3, fill=donor)
    assert torch.all(out[mask] == 7.0)
    _, none = cutout(x, np.random.default_rng(0), max_fraction=0.0)
    assert not none.any()


# --------------------------------------------------------------------------- methods


@pytest.mark.parametrize("name", sorted(METHOD_MODULES))
def test_registered_with_family_and_config_file(name):
    cls = REGISTRY[name]
    assert cls.family == ("contrastive" if name in ("simclr", "mocov3", "byol") else "rotation")
    assert cls.description
    data = load_yaml(CONFIG_DIR / f"{name}.yaml")
    config = PretrainConfig.model_validate(data)
    assert config.method.name == name
    # The YAML spells out the defaults: every field, every value.
    assert cls.parse_params(config.method.options) == cls.Params()
    assert set(config.method.options) == set(cls.Params.model_fields)
    with pytest.raises(ConfigError):
        cls.parse_params({"no_such_option": 1})


@pytest.mark.parametrize("name", sorted(METHOD_MODULES))
def test_make_views_shapes_and_determinism(name):
    method = build(name)
    side = method.region_size(CROP)
    assert side == (CROP if name in ("rotnet", "swinunetr_ssl") else 48)
    region = synthetic_region(side)
    views = method.make_views(region, np.random.default_rng(11))
    assert {k: tuple(v.shape) for k, v in views.items()} == VIEW_SHAPES[name]
    again = method.make_views(region, np.random.default_rng(11))
    assert all(torch.equal(views[k], again[k]) for k in views)
    assert all(type(v) is torch.Tensor for v in views.values())


def test_swinunetr_ssl_views_are_one_crop_rotated_as_the_reference_then_cut():
    """main.py: x1, x2 = rot_rand(x), rot_rand(x) of the SAME crop x; rot_rand turns dims (2, 3) of a
    (C, H, W, D) sample, i.e. our (C, X, Y, Z) dims (2, 3): the (Y, Z) plane about axis 0."""
    assert SWINUNETR_ROTATION_AXIS == 0
    method = build("swinunetr_ssl")
    rotations = set()
    for seed in range(8):
        region = synthetic_region(CROP, seed)
        v = method.make_views(region, np.random.default_rng(seed))
        for i in (1, 2):
            k = int(v[f"rotation{i}"])
            rotations.add(k)
            assert torch.equal(v[f"target{i}"], torch.rot90(region, k, dims=(2, 3)))
            # the same voxels before rotation: rotating back gives the one crop, for both views
            assert torch.equal(rotate90_view(v[f"target{i}"], 4 - k, 0), region)
            fraction = float(v[f"cut_fraction{i}"])
            assert 0.0 < fraction <= 0.3 + 0.25**3
            changed = v[f"view{i}"] != v[f"target{i}"]
            assert 0.0 < changed.float().mean().item() <= fraction + 1e-6
            assert 0.0 < float(v[f"donor_mask{i}"].float().mean()) <= 0.3 + 0.25**3
            assert 0.0 <= float(v[f"donor_draw{i}"]) < 1.0
        assert v["cut_fraction1"] != v["cut_fraction2"] or not torch.equal(v["view1"], v["view2"])  # own cut-outs
    assert rotations == {0, 1, 2, 3}


def test_swinunetr_ssl_cutout_donor_is_another_sample_of_the_batch():
    """aug_rand: sample i takes voxels from sample randint(0, B) when that is another sample; its in-place
    loop makes an earlier donor give its corrupted view, a later one its clean rotated crop."""
    n, shape = 3, (1, 4, 4, 4)
    clean = torch.stack([torch.full(shape, 10.0 * (j + 1)) for j in range(n)])
    views = clean + 1.0  # "corrupted" views, told apart from the clean crops
    masks = torch.zeros(n, *shape, dtype=torch.bool)
    masks[:, :, :2] = True
    # sample 0 -> donor 2 (later: clean), sample 1 -> itself (no donor), sample 2 -> donor 0 (earlier: final view)
    draws = torch.tensor([0.9, 0.5, 0.1])
    out = fill_from_batch(views, clean, masks, draws)
    assert torch.equal(out[0][masks[0]], clean[2][masks[0]])
    assert torch.equal(out[0][~masks[0]], views[0][~masks[0]])
    assert torch.equal(out[1], views[1])
    assert torch.equal(out[2][masks[2]], out[0][masks[2]])  # sample 0's view after its own fill
    assert torch.equal(out[2][~masks[2]], views[2][~masks[2]])
    # in the method's forward, a batch of one never takes a donor: nothing outside the noise boxes changes
    method = build("swinunetr_ssl")
    batch = make_batch(method, n=1)
    alone = fill_from_batch(batch["view1"], batch["target1"], batch["donor_mask1"], batch["donor_draw1"])
    assert torch.equal(alone, batch["view1"])


def test_swinunetr_ssl_heads_read_tokens_0_and_1_as_released():
    method = build("swinunetr_ssl")
    assert method.rotation_head.out_features == 4 and method.contrastive_head.out_features == 32
    assert type(method.decoder.net[1]) is torch.nn.GroupNorm  # 32^3: 1^3 bottleneck
    with pytest.raises(ConfigError, match="head_input"):
        build("swinunetr_ssl", head_input="tokens")  # one bottleneck token at 32^3
    released = REGISTRY["swinunetr_ssl"].Params()
    assert (released.head_input, released.contrastive_dim, released.temperature) == ("tokens", 512, 0.5)
    bottleneck = torch.arange(2 * 3 * 8, dtype=torch.float32).reshape(2, 3, 2, 2, 2)
    tokens = REGISTRY["swinunetr_ssl"]._head_inputs(SimpleNamespace(params=released), bottleneck)
    assert torch.equal(tokens[0], bottleneck[:, :, 0, 0, 0]) and torch.equal(tokens[1], bottleneck[:, :, 0, 0, 1])


@pytest.mark.parametrize("name", sorted(METHOD_MODULES))
def test_training_steps_lower_the_loss_and_export_the_encoder(name):
    torch.manual_seed(0)
    method = build(name, total_steps=6)
    method.train()
    # MoCo v3's projector ends in a BatchNorm without affine: over 2 samples it maps every feature to
    # +-1 and the loss only jitters, so it gets 4 samples; the others train on 2.
    batch = make_batch(method, n={"mocov3": 4, "rotnet": 1}.get(name, 2))  # rotnet: 1 sample = 4 rotated crops
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    teacher = getattr(method, "teacher", None)
    losses = []
    for step in range(6):
        out = method(batch, step)
        health = {f"health/{k}" for k in ("embedding_rank", "embedding_std", "feature_rank", "feature_std")}
        assert {"loss"} | health | COMPONENTS[name] <= set(out)
        assert "embedding_std" not in out  # replaced by the health metrics
        assert all(torch.isfinite(v).all() for v in out.values())
        optimizer.zero_grad()
        out["loss"].backward()
        if teacher is not None:  # the EMA teacher never receives a gradient
            assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
        assert method.encoder.mask_token.grad is None  # unused (frozen) outside masked methods
        optimizer.step()
        method.on_after_step(step)
        losses.append(out["loss"].item())
    assert losses[-1] < losses[0], losses
    assert float(np.mean(losses[-2:])) < losses[0], losses

    segmenter = SwinSegmenter(tiny_encoder_config(), out_channels=2, crop_size=CROP)
    report = load_encoder_state(segmenter, method.encoder.state_dict(), prefix="swinViT.")
    assert report.loaded == len(method.encoder.state_dict())
    seg_state = segmenter.state_dict()
    for key, value in method.encoder.state_dict().items():
        assert torch.equal(seg_state["swinViT." + key], value), key


def test_build_method_from_config_options():
    encoder = SwinEncoder(tiny_encoder_config())
    config = PretrainConfig.model_validate(load_yaml(CONFIG_DIR / "mocov3.yaml"))
    method = build_method(config.method, encoder, crop_size=CROP, total_steps=5)
    assert method.params.temperature == 0.2 and method.params.proj_hidden_dim == 4096
    assert method.projector.net[-1].num_features == 256  # last BatchNorm of the MoCo v3 projector


def test_mocov3_projector_and_predictor_end_in_batch_norm_as_the_vit_variant():
    """moco/builder.py MoCo_ViT: _build_mlp(3, ...) and _build_mlp(2, ...), both with last_bn=True:
    Linear(bias=False) -> BatchNorm1d(affine=False) at the end of each."""
    method = build("mocov3")
    for mlp in (method.projector, method.predictor):
        last_linear, last_bn = mlp.net[-2], mlp.net[-1]
        assert isinstance(last_linear, torch.nn.Linear) and last_linear.bias is None
        assert isinstance(last_bn, torch.nn.BatchNorm1d) and not last_bn.affine
    assert sum(isinstance(m, torch.nn.Linear) for m in method.projector.net) == 3
    assert sum(isinstance(m, torch.nn.Linear) for m in method.predictor.net) == 2
    resnet_style = build("mocov3", pred_last_batch_norm=False)
    assert isinstance(resnet_style.predictor.net[-1], torch.nn.Linear)


@pytest.mark.parametrize("name", ["byol", "mocov3"])
def test_byol_and_mocov3_augmentations_are_asymmetric(name):
    """BYOL augment_config / MoCo v3 augmentation1, 2: blur p 1.0 / 0.1, solarise p 0.0 / 0.2."""
    first, second = REGISTRY[name].Params().augment
    assert (first.blur_prob, first.solarize_prob) == (1.0, 0.0)
    assert (second.blur_prob, second.solarize_prob) == (0.1, 0.2)
    symmetric = REGISTRY["simclr"].Params().augment
    assert symmetric[0] == symmetric[1] and symmetric[0].solarize_prob == 0.0
    # The views follow their own options: only view 2 is ever solarised, view 1 is always blurred.
    method = build(
        name,
        augment=[
            {"blur_prob": 1.0, "solarize_prob": 0.0, "scale_prob": 0, "shift_prob": 0, "noise_prob": 0},
            {"blur_prob": 0.0, "solarize_prob": 1.0, "scale_prob": 0, "shift_prob": 0, "noise_prob": 0},
        ],
        crop_scale=(1.0, 1.0),
        crop_ratio=None,
        flip_prob=0.0,
    )
    region = synthetic_region(method.region_size(CROP)).clamp(0, 1)
    views = method.make_views(region, np.random.default_rng(0))
    crop = random_resized_crop_3d(region, CROP, (1.0, 1.0), np.random.default_rng(0))
    assert torch.allclose(views["view2"], solarize(crop))
    assert (views["view2"] <= 0.5 + 1e-6).all()
    smooth = float((views["view1"][:, 1:] - views["view1"][:, :-1]).abs().mean())
    assert smooth < float((crop[:, 1:] - crop[:, :-1]).abs().mean())  # blurred


def test_solarize_inverts_intensities_above_half():
    x = torch.tensor([0.0, 0.2, 0.49, 0.5, 0.8, 1.0])
    assert torch.allclose(solarize(x), torch.tensor([0.0, 0.2, 0.49, 0.5, 0.2, 0.0]))
    a = intensity_augment(
        x.reshape(1, 1, 1, 6),
        np.random.default_rng(0),
        scale_prob=0,
        shift_prob=0,
        noise_prob=0,
        blur_prob=0,
        solarize_prob=1.0,
    )
    assert torch.allclose(a.flatten(), solarize(x))


def test_rotnet_three_axes_has_ten_classes():
    method = build("rotnet", axes=3, all_rotations=False)
    assert method.head.out_features == 10
    labels = {int(method.make_views(synthetic_region(CROP), np.random.default_rng(s))["rotation"]) for s in range(24)}
    assert labels <= set(range(10)) and len(labels) > 4


@pytest.mark.parametrize("axes", [1, 3])
def test_rotnet_presents_every_rotation_of_a_sample_in_one_batch(axes):
    """FeatureLearningRotNet dataloader.py: one augmented image, all its rotations, labels 0..n-1."""
    assert REGISTRY["rotnet"].Params().all_rotations  # the reference's default
    method = build("rotnet", axes=axes, augment={"scale_prob": 0, "shift_prob": 0, "noise_prob": 0, "blur_prob": 0})
    region = synthetic_region(CROP)
    views = method.make_views(region, np.random.default_rng(0))
    n = rotation_classes(axes)
    assert views["image"].shape == (n, 1, CROP, CROP, CROP)
    assert views["rotation"].tolist() == list(range(n))
    for label in range(n):
        k, axis = rotation_from_label(label, axes, method.params.rotation_axis)
        assert torch.allclose(views["image"][label], rotate90_view(region, k, axis))
    batch = make_batch(method, n=2)
    out = method(batch, 0)
    assert out["rotation_ce"].shape == () and torch.isfinite(out["loss"])
    single = build("rotnet", all_rotations=False).make_views(region, np.random.default_rng(0))
    assert single["image"].shape == (1, 1, CROP, CROP, CROP) and single["rotation"].shape == (1,)


@pytest.mark.parametrize(("name", "base"), [("mocov3", 0.99), ("byol", 0.996)])
def test_ema_momentum_schedule_and_update(name, base):
    total = 11
    method = build(name, total_steps=total)
    teacher = method.teacher
    assert method.momentum(0) == pytest.approx(base)
    assert method.momentum(total // 2) == pytest.approx((base + 1) / 2)  # cosine midpoint
    assert method.momentum(total - 1) == pytest.approx(1.0)
    assert method.momentum(10 * total) == pytest.approx(1.0)  # held past the plan
    # One declared pair: the online encoder + projector and its EMA copy.
    [(online, paired)] = method.momentum_pairs()
    assert paired is teacher and online.encoder is method.encoder and online.projector is method.projector
    # The teacher starts as a copy of the online encoder + projector ...
    student_w = method.encoder.patch_embed.proj.weight
    teacher_w = teacher.module.encoder.patch_embed.proj.weight
    assert torch.equal(student_w, teacher_w) and teacher_w.data_ptr() != student_w.data_ptr()
    # ... and after a step moves to m * t + (1 - m) * s at the global step's momentum.
    with torch.no_grad():
        method.encoder.patch_embed.proj.weight.add_(1.0)
        method.projector.net[0].weight.add_(1.0)
    old_t = teacher_w.detach().clone()
    old_proj = teacher.module.projector.net[0].weight.detach().clone()
    step = 3
    m = method.momentum(step)
    method.on_after_step(step)
    assert torch.allclose(teacher_w, m * old_t + (1 - m) * student_w.detach())
    assert torch.allclose(
        teacher.module.projector.net[0].weight, m * old_proj + (1 - m) * method.projector.net[0].weight.detach()
    )
    # The key / target branch's BatchNorm uses batch statistics in training, as the references run it.
    method.train()
    assert not teacher.module.encoder.training
    assert all(bn.training for bn in teacher.modules() if isinstance(bn, torch.nn.BatchNorm1d))
    # The encoder is stored once: no duplicate copy of it outside the teacher.
    keys = method.state_dict().keys()
    assert sum(k.endswith("patch_embed.proj.weight") for k in keys) == 2  # encoder. and teacher.module.encoder.


# --------------------------------------------------------------------------- distributed gathers


def _gather_worker(rank: int, world: int, init_file: str, x: torch.Tensor, y: torch.Tensor, out: dict) -> None:
    import torch.distributed as dist

    from medssl.methods.distributed import gather_no_grad, gather_with_grad, rank_and_world

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        layer = torch.nn.Linear(x.shape[1], 3)  # identical on every process
        n = x.shape[0] // world
        rows = slice(rank * n, (rank + 1) * n)
        assert rank_and_world() == (rank, world)
        z1, z2 = layer(x[rows]), layer(y[rows])
        loss = nt_xent(gather_with_grad(z1), gather_with_grad(z2), 0.5)
        loss.backward()
        grad = layer.weight.grad.clone()
        dist.all_reduce(grad)  # what DDP does: average the processes' gradients
        out[f"nt_xent_{rank}"] = (loss.item(), (grad / world).tolist())
        layer.zero_grad()
        q, k = layer(x[rows]), layer(y[rows]).detach()
        moco = moco_v3_infonce(q, gather_no_grad(k), 0.2, label_offset=rank * n)
        moco.backward()
        grad = layer.weight.grad.clone()
        dist.all_reduce(grad)
        loss_sum = moco.detach().clone()
        dist.all_reduce(loss_sum)
        out[f"moco_{rank}"] = ((loss_sum / world).item(), (grad / world).tolist())
    finally:
        dist.destroy_process_group()


def test_gathers_across_two_processes_match_one_big_batch():
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        out = manager.dict()
        mp.spawn(_gather_worker, args=(2, str(Path(tmp) / "store"), x, y, out), nprocs=2, join=True)
        out = dict(out)
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 3)
    nt_xent(layer(x), layer(y), 0.5).backward()
    expected_loss, expected_grad = None, layer.weight.grad.clone()
    expected_loss = nt_xent(layer(x), layer(y), 0.5).item()
    for rank in (0, 1):
        loss, grad = out[f"nt_xent_{rank}"]
        assert loss == pytest.approx(expected_loss, rel=1e-5)
        assert torch.allclose(torch.tensor(grad), expected_grad, atol=1e-6)
    layer.zero_grad()
    moco = moco_v3_infonce(layer(x), layer(y).detach(), 0.2)
    moco.backward()
    for rank in (0, 1):
        loss, grad = out[f"moco_{rank}"]
        assert loss == pytest.approx(moco.item(), rel=1e-5)
        assert torch.allclose(torch.tensor(grad), layer.weight.grad, atol=1e-6)
    assert math.isfinite(expected_loss)
