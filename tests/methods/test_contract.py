"""The training-module contract every method keeps: the hooks the step calls, one way to build heads and to make
the output dict, no trainable parameter left without a gradient (DDP would stall), negatives declared."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from medssl.config import EncoderConfig, MethodConfig
from medssl.methods import REGISTRY, build_method
from medssl.methods.base import SSLMethod, UnmaskedMethod
from medssl.methods.two_crop import TwoCropMethod
from medssl.models.encoder import SwinEncoder
from medssl.training_module import TrainingHooks, TrainingModule

SMALL = {
    "simclr": {"proj_hidden_dim": 32, "proj_dim": 16},
    "mocov3": {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32},
    "byol": {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32},
    "dino": {"out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 16, "n_local_crops": 1},
    "ibot": {"out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 16, "n_local_crops": 1, "pred_start_epoch": 0},
    "smit": {"out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 16},
    "swinunetr_ssl": {"head_input": "pooled"},
}
TRAINING = sorted(name for name, cls in REGISTRY.items() if cls.trains)


def build(name: str) -> SSLMethod:
    torch.manual_seed(0)
    encoder = SwinEncoder(EncoderConfig(preset="tiny", window_size=4))
    return build_method(MethodConfig(name=name, options=SMALL.get(name, {})), encoder, crop_size=32, total_steps=4)


def test_one_name_for_building_heads_and_one_for_outputs() -> None:
    """``build_heads`` and ``outputs`` are the only ways; the three older names of each are gone."""
    for cls in REGISTRY.values():
        assert issubclass(cls, TrainingHooks)
        for old in ("make_head", "projector_and_predictor", "report", "report_pair"):
            assert not hasattr(cls, old), f"{cls.__name__}.{old}"
    assert issubclass(REGISTRY["swinunetr_ssl"], UnmaskedMethod)
    assert not issubclass(REGISTRY["swinunetr_ssl"], TwoCropMethod)  # one crop taken twice, not two crops
    assert issubclass(REGISTRY["rotnet"], UnmaskedMethod)


@pytest.mark.parametrize("name", TRAINING)
def test_a_step_through_the_contract(name: str) -> None:
    method = build(name)
    assert isinstance(method, TrainingModule)
    region = torch.rand(1, *(method.region_size(32),) * 3, generator=torch.Generator().manual_seed(0))
    batch = default_collate([method.make_views(region, np.random.default_rng([0, i])) for i in range(2)])
    method.train()
    out = method(batch, 0)
    assert out["loss"].requires_grad and out["loss"].ndim == 0
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")  # terms and health detached
    assert any(k.startswith("health/") for k in out)
    out["loss"].backward()
    method.cancel_gradients(0)
    # (DINO's first-epoch prototype freezing is 1 of 300 epochs: no step of a 4-step run.)
    starved = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    assert starved == []
    assert isinstance(method.param_groups(0.05), list) and method.clip_gradients(1.0) is not None


def test_negatives_are_declared_by_the_methods() -> None:
    declared = {name: REGISTRY[name].negatives_per_step(8) for name in TRAINING}
    assert declared == {
        "byol": None,
        "dino": None,
        "ibot": None,
        "mocov3": 7,
        "rotnet": None,
        "simclr": 14,
        "simmim": None,
        "smit": None,
        "swinunetr_ssl": 14,
    }
