"""DINO under 2-process gloo DDP (local batch 1) ends with the teacher of one process with batch 2.

The teacher depends on the all-reduced gradients (through the student) and on the centre, which
must be averaged over the *global* batch: without the all-reduce in ``Centering`` rank 0 would
centre on its own sample and drift from the single-process run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medssl.config import EncoderConfig, MethodConfig, ScheduleConfig
from medssl.methods.base import build_method
from medssl.methods.dino import DINO  # noqa: F401  (registers "dino")
from medssl.models.encoder import SwinEncoder
from medssl.runs import RunDir
from medssl.train.distributed import DistInfo, init_distributed
from medssl.train.loop import train

STEPS = 3
OPTIONS = {
    "out_dim": 64,
    "hidden_dim": 256,
    "bottleneck_dim": 64,
    "n_local_crops": 1,
    "freeze_last_layer_epochs": 1,
    "teacher_temp_warmup_epochs": 2,
    "steps_per_epoch": 1,
}


class Regions(torch.utils.data.Dataset):
    """Sample ``i`` depends on ``i`` alone, so any split of the global batch sees the same views."""

    def __init__(self, make_views) -> None:
        self.make_views = make_views

    def __len__(self) -> int:
        return 10**6

    def __getitem__(self, i: int):
        rng = np.random.default_rng([11, i])
        region = torch.from_numpy(rng.random((1, 32, 32, 32), dtype=np.float32))
        return self.make_views(region, rng)


def _method():
    torch.manual_seed(0)
    encoder = SwinEncoder(EncoderConfig(preset="tiny", window_size=4))
    return build_method(MethodConfig(name="dino", options=OPTIONS), encoder, crop_size=32, total_steps=STEPS)


def _schedule() -> ScheduleConfig:
    return ScheduleConfig(
        steps=STEPS,
        batch_size=2,
        lr=1e-4,
        warmup_steps=0,
        weight_decay=0.04,
        checkpoint_every=STEPS,
        log_every=1,
        amp="off",
    )


def _worker(rank: int, world: int, init_file: str, run_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        info = init_distributed(device="cpu")
        method = _method()
        train(method, Regions(method.make_views), _schedule(), RunDir(run_path), info)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_teacher_matches_single_process(tmp_path) -> None:
    single = _method()
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    train(single, Regions(single.make_views), _schedule(), RunDir(tmp_path / "single"), info)

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, 2, str(tmp_path / "init"), str(tmp_path / "ddp"))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    ddp_state = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=True)["model"]

    teacher_keys = [k for k in single.state_dict() if k.startswith(("teacher_encoder.", "teacher_head."))]
    assert teacher_keys
    moved = False
    initial = _method().state_dict()
    for key in teacher_keys + ["centering.centre"]:
        torch.testing.assert_close(ddp_state[key], single.state_dict()[key], rtol=0, atol=1e-5, msg=key)
        moved |= not torch.equal(single.state_dict()[key], initial[key])
    assert moved, "the teacher never moved: the comparison would be empty"
    assert single.centering.centre.abs().sum() > 0
