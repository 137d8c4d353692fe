"""The dry-run estimate times the training loop's own step, with the run's schedule."""

from __future__ import annotations

import torch

import medssl.train.step as step_module
from medssl.bench.estimate import time_finetune_step, time_pretrain_step
from medssl.config import EncoderConfig, FinetuneConfig, MethodConfig, PretrainConfig, ScheduleConfig

TINY = EncoderConfig(preset="tiny", window_size=4)


def _spy(monkeypatch) -> list[tuple[step_module.Optimisation, int]]:
    calls: list[tuple[step_module.Optimisation, int]] = []
    real = step_module.train_step

    def spy(opt, batch, step, forward=None):
        calls.append((opt, step))
        return real(opt, batch, step, forward)

    monkeypatch.setattr(step_module, "train_step", spy)
    return calls


def test_pretrain_estimate_runs_train_step_with_the_runs_schedule(monkeypatch) -> None:
    calls = _spy(monkeypatch)
    schedule = ScheduleConfig(steps=50, batch_size=1, grad_clip=0.3, lr=2e-4, warmup_steps=0)
    config = PretrainConfig(method=MethodConfig(name="simmim"), encoder=TINY, crop_size=32, schedule=schedule)
    seconds = time_pretrain_step(config, steps=2, device=torch.device("cpu"))
    assert seconds > 0
    assert [s for _, s in calls] == [0, 1, 2]  # one warm-up step, then the timed ones
    opt = calls[0][0]
    assert opt.grad_clip == 0.3 and len(opt.lr_at) == 50 and opt.optimizer is not None


def test_finetune_estimate_runs_train_step(monkeypatch) -> None:
    calls = _spy(monkeypatch)
    config = FinetuneConfig(encoder=TINY, crop_size=32, schedule=ScheduleConfig(steps=10, batch_size=1))
    assert time_finetune_step(config, out_channels=3, steps=1, device=torch.device("cpu")) > 0
    assert len(calls) == 2 and calls[0][0].grad_clip == config.schedule.grad_clip
