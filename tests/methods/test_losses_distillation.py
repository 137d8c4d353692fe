"""The self-distillation losses against their formulas (DINO, iBOT, SMIT)."""

from __future__ import annotations

import math

import pytest
import torch

from medssl.methods.distillation import Centering
from medssl.methods.losses import (
    dino_cross_entropy,
    masked_patch_ce,
    softmax_entropy,
    teacher_probs,
    update_centre,
)


def _log_softmax_2(a: float, b: float) -> tuple[float, float]:
    """log softmax of two logits, written out by hand."""
    lse = math.log(math.exp(a) + math.exp(b))
    return a - lse, b - lse


@pytest.mark.parametrize("student_temp", [1.0, 0.5])
def test_dino_cross_entropy_matches_hand_value(student_temp: float) -> None:
    s0, s1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    p0, p1 = torch.tensor([[0.75, 0.25]]), torch.tensor([[0.5, 0.5]])
    ls0 = _log_softmax_2(1.0 / student_temp, 0.0)
    ls1 = _log_softmax_2(0.0, 1.0 / student_temp)
    # Pairs of different views only: (teacher 0, student 1) and (teacher 1, student 0).
    pair_01 = -(0.75 * ls1[0] + 0.25 * ls1[1])
    pair_10 = -(0.5 * ls0[0] + 0.5 * ls0[1])
    expected = (pair_01 + pair_10) / 2
    got = dino_cross_entropy([s0, s1], [p0, p1], student_temp)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_dino_cross_entropy_counts_local_views_against_every_teacher_view() -> None:
    torch.manual_seed(0)
    students = [torch.randn(3, 5) for _ in range(4)]  # 2 global + 2 local views
    targets = [torch.softmax(torch.randn(3, 5), dim=-1) for _ in range(2)]
    terms = []
    for q, t in enumerate(targets):
        for v, s in enumerate(students):
            if q != v:
                terms.append((-(t * torch.log_softmax(s / 0.1, dim=-1)).sum(-1)).mean())
    assert len(terms) == 6
    got = dino_cross_entropy(students, targets, 0.1)
    assert got.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-6)


def test_dino_cross_entropy_needs_two_views() -> None:
    with pytest.raises(ValueError):
        dino_cross_entropy([torch.zeros(1, 3)], [torch.full((1, 3), 1 / 3)], 0.1)


def test_teacher_probs_is_centred_sharpened_softmax_without_grad() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0]], requires_grad=True)
    centre = torch.tensor([[1.0, 0.0, 0.0]])
    probs = teacher_probs(logits, centre, 0.5)
    by_hand = [math.exp(v / 0.5) for v in (1.0, 1.0, 0.0)]
    assert probs.squeeze(0).tolist() == pytest.approx([v / sum(by_hand) for v in by_hand], rel=1e-6)
    assert not probs.requires_grad

    student = torch.randn(1, 3, requires_grad=True)
    loss = dino_cross_entropy([student, student * 2], [probs, probs], 0.1)
    loss.backward()
    assert logits.grad is None  # the teacher is a target: no gradient reaches it
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_teacher_temperature_limits() -> None:
    logits = torch.tensor([[0.3, 2.0, -1.0, 0.5]])
    centre = torch.zeros(1, 4)
    sharp = teacher_probs(logits, centre, 1e-4)
    assert sharp.argmax().item() == 1 and sharp.max().item() == pytest.approx(1.0, abs=1e-6)
    assert softmax_entropy(sharp).item() == pytest.approx(0.0, abs=1e-5)
    flat = teacher_probs(logits, centre, 1e6)
    assert flat.squeeze(0).tolist() == pytest.approx([0.25] * 4, abs=1e-5)
    assert softmax_entropy(flat).item() == pytest.approx(math.log(4), abs=1e-5)
    # Centring shifts the argmax: the centre is subtracted before sharpening.
    centred = teacher_probs(logits, torch.tensor([[0.0, 3.0, 0.0, 0.0]]), 1e-4)
    assert centred.argmax().item() == 3


def test_student_temperature_limit_gives_zero_loss_on_agreeing_one_hot() -> None:
    target = torch.tensor([[0.0, 1.0, 0.0]])
    student = torch.tensor([[0.0, 1.0, 0.0]])
    assert dino_cross_entropy([student, student], [target, target], 1e-3).item() == pytest.approx(0.0, abs=1e-6)
    # A very soft student is uniform whatever the target: CE = log K.
    assert dino_cross_entropy([student, student], [target, target], 1e6).item() == pytest.approx(math.log(3))


def test_update_centre_moves_by_its_momentum_and_is_pure() -> None:
    centre = torch.tensor([[1.0, 2.0, 3.0]])
    logits = torch.tensor([[0.0, 2.0, 6.0], [4.0, 0.0, 0.0]])  # mean (2, 1, 3)
    new = update_centre(centre, logits, 0.9)
    assert new[0].tolist() == pytest.approx([0.9 * 1 + 0.1 * 2, 0.9 * 2 + 0.1 * 1, 0.9 * 3 + 0.1 * 3])
    assert centre.tolist() == [[1.0, 2.0, 3.0]]  # input untouched
    assert update_centre(centre, logits, 1.0).tolist() == centre.tolist()
    # Patch logits (B, L, K): the mean runs over every token of every sample.
    patches = torch.arange(12.0).reshape(2, 2, 3)
    assert update_centre(torch.zeros(1, 3), patches, 0.0).tolist() == [[4.5, 5.5, 6.5]]


def test_centering_module_follows_update_centre() -> None:
    centring = Centering(3, momentum=0.8)
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    centring.update(logits)
    assert centring.centre[0].tolist() == pytest.approx([0.4, 0.4, 0.4])
    centring.update(logits)
    assert centring.centre[0].tolist() == pytest.approx([0.72, 0.72, 0.72])
    assert "centre" in centring.state_dict()  # checkpointed with the method


def test_masked_patch_ce_matches_hand_value_and_ignores_unmasked_tokens() -> None:
    student = torch.tensor([[[1.0, 0.0], [5.0, -5.0]]])  # (B=1, L=2, K=2)
    teacher = torch.tensor([[[0.75, 0.25], [0.1, 0.9]]])
    mask = torch.tensor([[True, False]])
    ls = _log_softmax_2(1.0, 0.0)
    expected = -(0.75 * ls[0] + 0.25 * ls[1])
    got = masked_patch_ce(student, teacher, mask, 1.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)

    other_student = student.clone()
    other_student[0, 1] = torch.tensor([-3.0, 7.0])
    other_teacher = teacher.clone()
    other_teacher[0, 1] = torch.tensor([0.5, 0.5])
    assert masked_patch_ce(other_student, other_teacher, mask, 1.0).item() == pytest.approx(got.item(), rel=1e-7)

    # Gradients reach masked tokens only.
    leaf = student.clone().requires_grad_(True)
    masked_patch_ce(leaf, teacher, mask, 1.0).backward()
    assert leaf.grad[0, 1].abs().sum().item() == 0.0 and leaf.grad[0, 0].abs().sum().item() > 0


def test_masked_patch_ce_is_a_per_sample_mean_over_masked_tokens() -> None:
    torch.manual_seed(1)
    student = torch.randn(2, 4, 6)
    teacher = torch.softmax(torch.randn(2, 4, 6), dim=-1)
    ce = -(teacher * torch.log_softmax(student / 0.1, dim=-1)).sum(-1)
    mask = torch.tensor([[True, True, False, False], [False, False, False, False]])
    # A sample with nothing masked contributes 0 but still counts in the batch mean.
    expected = (ce[0, :2].mean() + 0.0) / 2
    assert masked_patch_ce(student, teacher, mask, 0.1).item() == pytest.approx(expected.item(), rel=1e-6)
    # Everything masked: the plain mean. Fractional weights: a weighted mean per sample.
    assert masked_patch_ce(student, teacher, torch.ones(2, 4), 0.1).item() == pytest.approx(ce.mean().item(), rel=1e-6)
    weights = torch.tensor([[0.5, 0.0, 0.0, 0.25], [1.0, 1.0, 0.0, 0.0]])
    per_sample = (ce * weights).sum(-1) / weights.sum(-1)
    got = masked_patch_ce(student, teacher, weights, 0.1)
    assert got.item() == pytest.approx(per_sample.mean().item(), rel=1e-6)


def test_softmax_entropy_values() -> None:
    uniform = torch.full((3, 8), 1 / 8)
    assert softmax_entropy(uniform).item() == pytest.approx(math.log(8), rel=1e-6)
    one_hot = torch.nn.functional.one_hot(torch.tensor([1, 4]), 8).float()
    assert softmax_entropy(one_hot).item() == 0.0
    two = torch.tensor([[0.5, 0.5, 0.0]])
    assert softmax_entropy(two).item() == pytest.approx(math.log(2), rel=1e-6)
