"""DINO without centring collapses and the health verdict flags it; the same run with centring is not flagged.

Settings (deliberately hard, so that the collapse happens within seconds on tiny data): tiny Swin, 32^3 crops,
batch 2, two global crops and no local crop, K = 64 prototypes, lr 1e-3 constant (2x the demo's 5e-4),
teacher temperature 0.02 constant (the published start is 0.04), teacher momentum 0.9 (published 0.996),
centre momentum 0.5 (published 0.9), the first 8 steps of a 12-step schedule. Only ``centre`` differs
between the two runs (``method.options.centre``). Measured over all 12 steps: without centring the batch-mean
teacher entropy is 0.000 log K from step 2 on (every sample on one prototype); with centring it climbs to
0.26, 0.47, 0.61 log K at steps 6-8 (0.93 at step 12), so centring alone decides the one-prototype collapse.
The centred student still collapses onto one point at this lr (its embedding spread falls about 200x in 8
steps, which the spread-fall rule flags, as DINO at 5e-4 at demo scale: benchmarks/README.md).
"""

from __future__ import annotations

import numpy as np
import torch

from medssl.config import EncoderConfig, MethodConfig, PretrainConfig
from medssl.methods import build_method
from medssl.methods.verdict import SPREAD_FALL_LIMIT, TEACHER_BATCH_ENTROPY_FLOOR, health_verdict
from medssl.models import SwinEncoder
from medssl.train.step import build_optimisation, train_step

STEPS = 8  # steps run, of a 12-step schedule (teacher momentum cosine 0.9 -> 1 over 12 steps)
SCHEDULE_STEPS = 12
LR = 1e-3
OPTIONS = {
    "out_dim": 64,
    "hidden_dim": 64,
    "bottleneck_dim": 16,
    "n_local_crops": 0,
    "teacher_temp_start": 0.02,
    "teacher_temp": 0.02,
    "teacher_momentum": 0.9,
    "centre_momentum": 0.5,
    "freeze_last_layer_epochs": 0,
}


def dino_records(centre: bool) -> list[dict[str, float]]:
    torch.manual_seed(0)
    encoder = SwinEncoder(EncoderConfig(preset="tiny", window_size=4))
    config = MethodConfig(name="dino", options={**OPTIONS, "centre": centre})
    method = build_method(config, encoder, crop_size=32, total_steps=SCHEDULE_STEPS)
    update = {"steps": SCHEDULE_STEPS, "lr": LR, "min_lr": LR, "warmup_steps": 0}
    schedule = PretrainConfig().schedule.model_copy(update=update)
    opt = build_optimisation(method, schedule, SCHEDULE_STEPS, torch.device("cpu"))
    rng = np.random.default_rng(0)
    # smooth random volumes: structure at several scales, like the phantoms, for 2 samples
    noise = torch.rand(2, 1, 40, 40, 40, generator=torch.Generator().manual_seed(0))
    regions = torch.nn.functional.avg_pool3d(noise, 5, stride=1, padding=2)
    method.train()
    records = []
    for step in range(STEPS):
        batch = torch.utils.data.default_collate([method.make_views(r, rng) for r in regions])
        outputs = train_step(opt, batch, step).outputs
        records.append({k: float(v.detach()) for k, v in outputs.items() if v.numel() == 1} | {"step": step + 1})
    return records


def test_dino_without_centring_collapses_and_is_flagged_with_centring_not() -> None:
    uncentred = health_verdict(dino_records(centre=False))
    centred = health_verdict(dino_records(centre=True))
    key = "health/teacher_batch_entropy_ratio"
    assert uncentred["collapsed"], uncentred["final"]
    assert "same prototype" in uncentred["reason"]
    assert uncentred["final"][key] < TEACHER_BATCH_ENTROPY_FLOOR
    assert not any("same prototype" in reason for reason in centred["reasons"]), centred["reasons"]
    assert centred["final"][key] > 10 * TEACHER_BATCH_ENTROPY_FLOOR
    assert centred["spread_fall"] > SPREAD_FALL_LIMIT and "fell" in centred["reason"]
