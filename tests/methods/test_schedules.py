"""Per-step schedules (medssl.schedules) and the EMA teacher's momentum, indexed by the global step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medssl.config import ScheduleConfig
from medssl.methods.base import EMATeacher, NoParams, SSLMethod
from medssl.schedules import (
    corpus_epoch_steps,
    cosine_schedule,
    linear_warmup_then_constant,
    lr_schedule,
    published_fraction_steps,
    schedule_at,
    weight_decay_schedule,
)


def test_cosine_schedule_first_middle_last() -> None:
    values = cosine_schedule(1.0, 0.0, total_steps=101)
    assert len(values) == 101
    assert values[0] == pytest.approx(1.0)
    assert values[50] == pytest.approx(0.5)
    assert values[-1] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(values[:-1], values[1:], strict=True))  # monotone


def test_cosine_schedule_with_warmup() -> None:
    values = cosine_schedule(1.0, 0.1, total_steps=20, warmup_steps=4, warmup_start=0.0)
    assert values[:4].tolist() == pytest.approx([0.0, 0.25, 0.5, 0.75])
    assert values[4] == pytest.approx(1.0)  # the peak right after warm-up
    assert values[-1] == pytest.approx(0.1)
    assert len(values) == 20


def test_linear_warmup_then_constant_teacher_temperature() -> None:
    values = linear_warmup_then_constant(0.04, 0.07, warmup_steps=4, total_steps=10)
    assert len(values) == 10
    assert values[0] == pytest.approx(0.04)
    assert values[1] == pytest.approx(0.05)
    assert values[3] == pytest.approx(0.07)  # reached at the end of warm-up
    assert values[4:].tolist() == pytest.approx([0.07] * 6)
    # No warm-up: constant from the first step.
    assert linear_warmup_then_constant(0.04, 0.07, 0, 5).tolist() == pytest.approx([0.07] * 5)


def test_a_run_shorter_than_the_warm_up_stops_mid_warm_up() -> None:
    # DINO's schedule at step t is start + (end - start) * t / (warmup - 1), whatever the run's length:
    # a 4-step run of a 7-step warm-up ends at 0.055, not at 0.07.
    values = linear_warmup_then_constant(0.04, 0.07, warmup_steps=7, total_steps=4)
    assert values.tolist() == pytest.approx([0.04, 0.045, 0.05, 0.055])
    full = linear_warmup_then_constant(0.04, 0.07, warmup_steps=7, total_steps=20)
    assert values.tolist() == pytest.approx(full[:4].tolist())
    # The named departure squeezes the whole warm-up into the run.
    squeezed = linear_warmup_then_constant(0.04, 0.07, 7, 4, short_run="compress")
    assert squeezed.tolist() == pytest.approx([0.04, 0.05, 0.06, 0.07])


def test_schedule_at_holds_the_ends() -> None:
    values = linear_warmup_then_constant(0.0, 1.0, 3, 5)
    assert schedule_at(values, -2) == pytest.approx(0.0)
    assert schedule_at(values, 1) == pytest.approx(0.5)
    assert schedule_at(values, 100) == pytest.approx(1.0)


def test_run_schedules_from_the_schedule_config() -> None:
    """Pretraining and fine-tuning take their lr and weight decay from one place (train/step.py builds them)."""
    schedule = ScheduleConfig(steps=10, lr=1.0, min_lr=0.1, warmup_steps=2, weight_decay=0.04, weight_decay_end=0.4)
    lr = lr_schedule(schedule, 10)
    assert lr.tolist()[:3] == pytest.approx([0.0, 0.5, 1.0]) and lr[-1] == pytest.approx(0.1)
    wd = weight_decay_schedule(schedule, 10)
    assert wd[0] == pytest.approx(0.04) and wd[-1] == pytest.approx(0.4)
    constant = weight_decay_schedule(schedule.model_copy(update={"weight_decay_end": None}), 10)
    assert constant.tolist() == pytest.approx([0.04] * 10)


def test_epoch_knobs_as_a_fraction_of_the_published_run_or_corpus_passes() -> None:
    # DINO's 30 of 300 epochs: the first 10 % of any run, whatever its corpus.
    assert published_fraction_steps(30, 300, 40) == 4
    assert published_fraction_steps(30, 300, 100_000) == 10_000
    assert published_fraction_steps(50, 300, 60) == 10  # iBOT's masking start: 1/6 of the run
    assert published_fraction_steps(0, 300, 60) == 0
    # Passes over this run's corpus instead: 30 epochs of 5 steps.
    assert corpus_epoch_steps(30, 5) == 150


class OnePair(SSLMethod):
    """The smallest method with one momentum pair (a linear layer and its EMA teacher)."""

    name = "one-pair"
    family = "none"
    description = "test only"

    def __init__(self, base_momentum: float, total_steps: int) -> None:
        super().__init__(nn.Linear(3, 2), NoParams(), crop_size=1, total_steps=total_steps)  # type: ignore[arg-type]
        self.teacher = EMATeacher(self.encoder)
        self.init_momentum(base_momentum)

    def momentum_pairs(self) -> list[tuple[nn.Module, EMATeacher]]:
        return [(self.encoder, self.teacher)]


def test_ema_teacher_momentum_first_middle_last_step() -> None:
    method = OnePair(0.996, total_steps=101)
    assert method.momentum(0) == pytest.approx(0.996)
    assert method.momentum(50) == pytest.approx(0.998)
    assert method.momentum(100) == pytest.approx(1.0)
    assert method.momentum(1000) == pytest.approx(1.0)  # past the plan: held at the end
    # Global step, not step within an epoch: steps 10 and 60 differ.
    assert method.momentum(10) > 0.996 and method.momentum(60) > method.momentum(10)


def test_ema_teacher_update_formula_and_frozen_copy() -> None:
    torch.manual_seed(0)
    method = OnePair(0.9, total_steps=11)
    student, teacher = method.encoder, method.teacher
    assert all(not p.requires_grad for p in teacher.parameters())
    before = teacher.module.weight.clone()
    with torch.no_grad():
        student.weight.add_(1.0)
    method.on_after_step(0)  # the base class updates every declared pair
    assert method.momentum(0) == pytest.approx(0.9)
    assert torch.allclose(teacher.module.weight, 0.9 * before + 0.1 * student.weight)
    method.train()
    assert not teacher.training  # a teacher stays in eval mode
    out = teacher(torch.randn(4, 3))
    assert not out.requires_grad
