"""The one training step (hooks, schedule, clipping) and the loop around it (early stop, data wait)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medssl.config import ScheduleConfig
from medssl.runs import RunDir
from medssl.train.distributed import DistInfo
from medssl.train.loop import train
from medssl.train.step import NonFiniteLossError, build_optimisation, train_step
from medssl.training_module import TrainingHooks, TrainingModule

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class Plain(TrainingHooks):
    """A linear regression with the default hooks of a training module."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)
        self.calls: list[tuple[str, object]] = []

    def forward(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        pred = self.head(self.body(batch["x"]))
        return {"loss": ((pred - batch["y"]) ** 2).mean() * batch.get("scale", torch.tensor(1.0))}


class Toy(Plain):
    """The same regression overriding every hook of the step, recording when each runs."""

    def param_groups(self, weight_decay: float) -> list[dict]:
        return [
            {"params": list(self.body.parameters()), "weight_decay": weight_decay, "apply_wd": True, "lr_scale": 0.5},
            {"params": list(self.head.parameters()), "weight_decay": 0.0, "apply_wd": False},
        ]

    def cancel_gradients(self, step: int) -> None:
        self.calls.append(("cancel", self.head.weight.grad is not None))
        self.head.bias.grad = None

    def clip_gradients(self, max_norm: float) -> float:
        self.calls.append(("clip", max_norm))
        return 123.0

    def on_after_step(self, step: int) -> None:
        self.calls.append(("after", step))


def _batch(scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(8, 4, generator=g), "y": torch.randn(8, 1, generator=g) * 10, "scale": torch.tensor(scale)}


def _schedule(**kw) -> ScheduleConfig:
    return ScheduleConfig(
        **{
            "steps": 4,
            "batch_size": 2,
            "lr": 1e-2,
            "min_lr": 1e-4,
            "warmup_steps": 1,
            "weight_decay": 0.1,
            "weight_decay_end": 0.3,
            "log_every": 1,
            "checkpoint_every": 10,
            **kw,
        }
    )


def test_step_order_hooks_and_per_group_schedule() -> None:
    module = Toy()
    opt = build_optimisation(module, _schedule(grad_clip=0.7), total_steps=4, device=CPU.device)
    bias_before = module.head.bias.detach().clone()
    result = train_step(opt, _batch(), 2)
    assert module.calls == [("cancel", True), ("clip", 0.7), ("after", 2)]
    assert result.grad_norm == 123.0  # the module's clipping hook replaces global-norm clipping
    assert torch.equal(module.head.bias, bias_before)  # its gradient was cancelled
    body, head = opt.optimizer.param_groups
    assert body["lr"] == pytest.approx(opt.lr_at[2] * 0.5) and head["lr"] == pytest.approx(opt.lr_at[2])
    assert body["weight_decay"] == pytest.approx(opt.wd_at[2]) and head["weight_decay"] == 0.0


def test_default_groups_and_global_norm_clipping() -> None:
    module = Plain()
    assert isinstance(module, TrainingModule)
    opt = build_optimisation(module, _schedule(grad_clip=0.01), total_steps=4, device=CPU.device)
    assert [g["apply_wd"] for g in opt.optimizer.param_groups] == [True, False]  # weights / biases
    result = train_step(opt, _batch(), 0)
    assert result.grad_norm is not None and result.grad_norm > 0.01
    total = torch.norm(torch.stack([p.grad.norm() for p in module.parameters() if p.grad is not None]))
    assert float(total) == pytest.approx(0.01, rel=1e-3)  # clipped to max_norm before the optimiser step


def test_a_module_without_the_hooks_is_refused() -> None:
    class Bare(nn.Module):
        def forward(self, batch: dict, step: int) -> dict:
            return {}

    with pytest.raises(TypeError, match="lacks param_groups, cancel_gradients, clip_gradients, on_after_step"):
        build_optimisation(Bare(), _schedule(), total_steps=4, device=CPU.device)


def test_non_finite_loss_raises_before_backward() -> None:
    module = Toy()
    opt = build_optimisation(module, _schedule(), total_steps=4, device=CPU.device)
    with pytest.raises(NonFiniteLossError, match="at step 3"):
        train_step(opt, _batch(scale=float("nan")), 2)
    assert module.calls == []


class Pairs(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 10**6

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        return {"x": torch.randn(4, generator=g), "y": torch.randn(1, generator=g)}


def test_validator_stop_ends_the_run_with_a_checkpoint_and_logs_data_wait(tmp_path) -> None:
    run = RunDir(tmp_path / "run")
    module = Toy()
    asked = []

    def validate(_module: nn.Module, step: int) -> dict:
        asked.append(step)
        return {"val_score": float(step), "stop": step >= 2}

    result = train(module, Pairs(), _schedule(steps=6), run, CPU, validate=validate, val_every=1)
    assert asked == [1, 2] and result.stopped_at == 2 and result.steps == 2
    assert torch.load(run.last_checkpoint, weights_only=True)["step"] == 2
    records = run.read_metrics()
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert all("stop" not in r for r in records)
    assert all(0.0 <= r["data_wait_share"] <= 1.0 for r in records if "loss" in r)
    assert result.data_wait_share is not None and 0.0 <= result.data_wait_share <= 1.0
