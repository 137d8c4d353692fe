"""Per-step schedules and the EMA teacher's momentum, indexed by the global step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medssl.methods.base import EMATeacher, cosine_schedule, linear_warmup_then_constant, schedule_at


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


def test_schedule_at_holds_the_ends() -> None:
    values = linear_warmup_then_constant(0.0, 1.0, 3, 5)
    assert schedule_at(values, -2) == pytest.approx(0.0)
    assert schedule_at(values, 1) == pytest.approx(0.5)
    assert schedule_at(values, 100) == pytest.approx(1.0)


def test_ema_teacher_momentum_first_middle_last_step() -> None:
    teacher = EMATeacher(nn.Linear(2, 2), base_momentum=0.996, total_steps=101)
    assert teacher.momentum(0) == pytest.approx(0.996)
    assert teacher.momentum(50) == pytest.approx(0.998)
    assert teacher.momentum(100) == pytest.approx(1.0)
    assert teacher.momentum(1000) == pytest.approx(1.0)  # past the plan: held at the end
    # Global step, not step within an epoch: steps 10 and 60 differ.
    assert teacher.momentum(10) > 0.996 and teacher.momentum(60) > teacher.momentum(10)


def test_ema_teacher_update_formula_and_frozen_copy() -> None:
    torch.manual_seed(0)
    student = nn.Linear(3, 2)
    teacher = EMATeacher(student, base_momentum=0.9, total_steps=11)
    assert all(not p.requires_grad for p in teacher.parameters())
    before = teacher.module.weight.clone()
    with torch.no_grad():
        student.weight.add_(1.0)
    m = teacher.update(student, step=0)
    assert m == pytest.approx(0.9)
    assert torch.allclose(teacher.module.weight, 0.9 * before + 0.1 * student.weight)
    out = teacher(torch.randn(4, 3))
    assert not out.requires_grad
