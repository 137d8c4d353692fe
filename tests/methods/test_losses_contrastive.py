"""Contrastive and rotation losses against their formulas on tiny hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medssl.methods.losses import byol_loss, moco_v3_infonce, nt_xent, rotation_ce


def _unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _nt_xent_by_hand(z1: list[list[float]], z2: list[list[float]], tau: float) -> float:
    """NT-Xent written out term by term with Python floats."""
    views = [_unit(v) for v in z1 + z2]
    n = len(z1)
    total = 0.0
    for i, u in enumerate(views):
        positive = (i + n) % (2 * n)
        denominator = sum(math.exp(_dot(u, w) / tau) for j, w in enumerate(views) if j != i)
        total += -math.log(math.exp(_dot(u, views[positive]) / tau) / denominator)
    return total / (2 * n)


# --------------------------------------------------------------------------- NT-Xent


def test_nt_xent_matches_hand_computation_on_2x2():
    z1 = [[1.0, 0.0], [1.0, 1.0]]
    z2 = [[2.0, 1.0], [0.0, 3.0]]
    expected = _nt_xent_by_hand(z1, z2, tau=0.5)
    got = nt_xent(torch.tensor(z1), torch.tensor(z2), temperature=0.5)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # Worked out on paper: views u0 = (1, 0), u1 = (1, 1)/sqrt2, u2 = (2, 1)/sqrt5, u3 = (0, 1); with
    # tau 0.5 the four terms are l0 = 0.6177, l1 = 1.2868, l2 = 0.9256, l3 = 0.6085 (mean 0.8597), e.g.
    # l0 = -(2/sqrt5)/0.5 + log(e^{(1/sqrt2)/0.5} + e^{(2/sqrt5)/0.5} + e^0).
    l0 = -4 / math.sqrt(5) + math.log(math.exp(2 / math.sqrt(2)) + math.exp(4 / math.sqrt(5)) + 1.0)
    assert l0 == pytest.approx(0.6177, abs=1e-4)
    assert got.item() == pytest.approx(0.8597, abs=1e-4)


def test_nt_xent_is_symmetric_in_its_views_and_pair_order():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    a = nt_xent(z1, z2, 0.1)
    assert nt_xent(z2, z1, 0.1).item() == pytest.approx(a.item(), rel=1e-6)
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert nt_xent(z1[perm], z2[perm], 0.1).item() == pytest.approx(a.item(), rel=1e-6)
    # Invariant to the scale of each embedding (it normalises).
    assert nt_xent(3 * z1, 0.2 * z2, 0.1).item() == pytest.approx(a.item(), rel=1e-5)


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_nt_xent_identical_positives_orthogonal_negatives(tau):
    n = 3
    z = torch.eye(n)  # every positive pair identical, every negative orthogonal
    bound = math.log(1.0 + (2 * n - 2) * math.exp(-1.0 / tau))
    assert nt_xent(z, z.clone(), tau).item() == pytest.approx(bound, rel=1e-4, abs=1e-6)
    # Moving a positive away from its anchor can only raise the loss.
    worse = z.clone()
    worse[0] = torch.tensor([1.0, 0.5, 0.0])
    assert nt_xent(z, worse, tau).item() > bound


def test_nt_xent_temperature_limits():
    z = torch.eye(4)
    separable = nt_xent(z, z.clone(), temperature=0.01)
    assert separable.item() < 1e-8  # tau -> 0: a perfectly separable batch costs nothing
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    uniform = math.log(2 * 4 - 1)  # tau -> infinity: every view equally likely
    assert nt_xent(z1, z2, temperature=1e6).item() == pytest.approx(uniform, rel=1e-4)
    same = torch.ones(4, 6)
    assert nt_xent(same, same, temperature=0.1).item() == pytest.approx(uniform, rel=1e-5)


def test_nt_xent_gradient_is_finite():
    z1 = torch.randn(4, 8, requires_grad=True)
    z2 = torch.randn(4, 8, requires_grad=True)
    nt_xent(z1, z2, 0.1).backward()
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()


# --------------------------------------------------------------------------- MoCo v3


def test_moco_v3_infonce_is_two_tau_times_hand_ce():
    q = [[1.0, 2.0], [0.5, -1.0], [-1.0, 0.0]]
    k = [[1.0, 1.0], [0.0, -2.0], [-3.0, 1.0]]
    tau = 0.2
    qn, kn = [_unit(v) for v in q], [_unit(v) for v in k]
    ce = 0.0
    for i, qi in enumerate(qn):
        logits = [_dot(qi, kj) / tau for kj in kn]
        ce += -logits[i] + math.log(sum(math.exp(x) for x in logits))
    expected = 2 * tau * ce / len(q)
    got = moco_v3_infonce(torch.tensor(q), torch.tensor(k), tau)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_moco_v3_infonce_label_offset_selects_gathered_positives():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 5, generator=g), torch.randn(6, 5, generator=g)
    # As process 1 of 3: its queries' positives are keys 2 and 3 of the gathered 6.
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).t() / 0.2
    expected = F.cross_entropy(logits, torch.tensor([2, 3])) * 0.4
    assert moco_v3_infonce(q, k, 0.2, label_offset=2).item() == pytest.approx(expected.item(), rel=1e-6)


def test_moco_v3_infonce_perfect_match_tends_to_zero():
    z = torch.eye(3)
    assert moco_v3_infonce(z, z, temperature=0.01).item() < 1e-8


# --------------------------------------------------------------------------- BYOL


def test_byol_loss_values():
    p = torch.tensor([[1.0, 2.0, -1.0]])
    assert byol_loss(p, 5 * p).item() == pytest.approx(0.0, abs=1e-6)  # parallel
    assert byol_loss(p, -p).item() == pytest.approx(4.0, abs=1e-6)  # opposite
    assert byol_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])).item() == pytest.approx(2.0)


def test_byol_loss_is_scale_invariant_and_a_batch_mean():
    g = torch.Generator().manual_seed(3)
    p, z = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    base = byol_loss(p, z)
    assert byol_loss(10 * p, 0.01 * z).item() == pytest.approx(base.item(), rel=1e-5)
    per_row = 2 - 2 * F.cosine_similarity(p, z, dim=1)
    assert base.item() == pytest.approx(per_row.mean().item(), rel=1e-5)


# --------------------------------------------------------------------------- rotation


def test_rotation_ce_equals_cross_entropy():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 4, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 1, 0])
    assert rotation_ce(logits, labels).item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    confident = torch.full((2, 4), -50.0)
    confident[0, 2] = confident[1, 0] = 50.0
    assert rotation_ce(confident, torch.tensor([2, 0])).item() < 1e-6
