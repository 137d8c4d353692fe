"""Representation-health metrics on cases whose values are known in closed form."""

from __future__ import annotations

import math

import pytest
import torch

from medssl.methods.health import effective_rank, entropy, health_metrics, normalised_std


def test_identical_rows_have_rank_one_and_no_spread() -> None:
    z = torch.randn(1, 16).repeat(8, 1)
    out = health_metrics(embedding=z)
    assert out["health/embedding_rank"].item() == pytest.approx(1.0, abs=1e-4)
    assert out["health/embedding_rank_ratio"].item() == pytest.approx(1.0 / 8, abs=1e-4)
    assert out["health/embedding_std"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["health/embedding_std_scaled"].item() == pytest.approx(0.0, abs=1e-5)


def test_orthogonal_rows_have_full_rank() -> None:
    z = 3.0 * torch.eye(8, 16)
    out = health_metrics(features=z)
    assert out["health/feature_rank"].item() == pytest.approx(8.0, rel=1e-4)
    assert out["health/feature_rank_ratio"].item() == pytest.approx(1.0, rel=1e-4)
    # Each of the first 8 dimensions holds one 1 among 8 rows (std sqrt(1/8)); the other 8 are 0.
    one_hot_std = math.sqrt((1 / 8) * (7 / 8) * 8 / 7)
    assert out["health/feature_std"].item() == pytest.approx(one_hot_std / 2, rel=1e-5)


def test_random_gaussian_rows_spread_about_one_over_sqrt_d() -> None:
    torch.manual_seed(0)
    d = 64
    z = torch.randn(4096, d)
    assert normalised_std(z).item() == pytest.approx(1 / math.sqrt(d), rel=0.02)
    out = health_metrics(embedding=z)
    assert out["health/embedding_std_scaled"].item() == pytest.approx(1.0, rel=0.02)
    assert out["health/embedding_rank"].item() > 0.9 * d


def test_rank_is_scale_invariant_and_zero_matrix_has_rank_zero() -> None:
    z = torch.randn(6, 10)
    assert effective_rank(z).item() == pytest.approx(effective_rank(100 * z).item(), rel=1e-4)
    assert effective_rank(torch.zeros(4, 5)).item() == 0.0
    assert math.isnan(normalised_std(torch.randn(1, 5)).item())


def test_uniform_teacher_has_entropy_log_k() -> None:
    k = 32
    out = health_metrics(teacher_probs=torch.full((6, k), 1.0 / k))
    assert out["health/teacher_entropy"].item() == pytest.approx(math.log(k), rel=1e-5)
    assert out["health/teacher_batch_entropy"].item() == pytest.approx(math.log(k), rel=1e-5)
    assert out["health/teacher_entropy_ratio"].item() == pytest.approx(1.0, rel=1e-5)


def test_one_hot_on_one_prototype_is_collapse_but_on_distinct_prototypes_is_not() -> None:
    k = 16
    same = torch.zeros(8, k)
    same[:, 3] = 1.0
    out = health_metrics(teacher_probs=same)
    assert out["health/teacher_entropy"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["health/teacher_batch_entropy"].item() == pytest.approx(0.0, abs=1e-6)
    distinct = torch.eye(8, k)
    out = health_metrics(teacher_probs=distinct)
    assert out["health/teacher_entropy"].item() == pytest.approx(0.0, abs=1e-6)
    # The batch mean is uniform over 8 of the 16 prototypes: entropy log 8, half of log 16.
    assert out["health/teacher_batch_entropy"].item() == pytest.approx(math.log(8), rel=1e-5)
    assert out["health/teacher_batch_entropy_ratio"].item() == pytest.approx(0.75, rel=1e-5)


def test_entropy_matches_hand_value_and_patch_tokens_count_as_rows() -> None:
    p = torch.tensor([[0.5, 0.25, 0.25]])
    assert entropy(p).item() == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)), rel=1e-6)
    tokens = torch.softmax(torch.randn(2, 5, 7), dim=-1)
    flat = health_metrics(teacher_probs=tokens.reshape(10, 7))
    assert health_metrics(teacher_probs=tokens)["health/teacher_batch_entropy"].item() == pytest.approx(
        flat["health/teacher_batch_entropy"].item(), rel=1e-6
    )


def test_values_are_detached_float_scalars() -> None:
    z = torch.randn(4, 8, requires_grad=True)
    probs = torch.softmax(torch.randn(4, 8, requires_grad=True), dim=-1)
    out = health_metrics(embedding=z.half().float(), features=z, teacher_probs=probs)
    assert all(key.startswith("health/") for key in out)
    for value in out.values():
        assert value.ndim == 0 and value.dtype == torch.float32 and not value.requires_grad
    assert health_metrics() == {}


def test_singular_values_match_svd_for_wide_and_tall_matrices() -> None:
    from medssl.methods.health import singular_values

    gen = torch.Generator().manual_seed(0)
    for shape in ((6, 300), (300, 6), (5, 5)):
        x = torch.randn(*shape, generator=gen) * torch.logspace(0, -3, shape[1])
        assert torch.allclose(singular_values(x), torch.linalg.svdvals(x), rtol=1e-4, atol=1e-6 * float(x.norm()))


def test_window_rank_counts_directions_beyond_the_batch_and_flags_one_direction() -> None:
    from medssl.methods.health import RANK_HISTORY_MIN_ROWS, RankHistory, health_metrics
    from medssl.methods.verdict import WINDOW_RANK_FLOOR, health_verdict

    gen = torch.Generator().manual_seed(0)
    healthy, line = RankHistory(), RankHistory()
    centre, direction = torch.randn(64, generator=gen), torch.randn(64, generator=gen)
    records_healthy, records_line = [], []
    for step in range(RANK_HISTORY_MIN_ROWS + 4):
        spread = torch.randn(2, 64, generator=gen)  # two samples per step: a batch rank of at most 2
        along = torch.randn(2, 1, generator=gen) * direction  # varies along one direction only
        out_h = health_metrics(embedding=centre + spread, history=healthy)
        out_l = health_metrics(embedding=centre + 0.01 * along, history=line)
        assert float(out_h["health/embedding_rank"]) <= 2.0 + 1e-4
        if step + 1 < RANK_HISTORY_MIN_ROWS:  # one independent row per step of two samples
            assert "health/embedding_window_rank" not in out_h
        records_healthy.append({k: float(v) for k, v in out_h.items()})
        records_line.append({k: float(v) for k, v in out_l.items()})
    assert records_healthy[-1]["health/embedding_window_rank"] > 0.8 * RANK_HISTORY_MIN_ROWS
    assert records_line[-1]["health/embedding_window_rank"] == pytest.approx(1.0, abs=0.05)
    assert not health_verdict(records_healthy)["collapsed"]
    line_verdict = health_verdict(records_line)
    assert line_verdict["collapsed"] and "dimensional collapse" in line_verdict["reason"]
    assert records_line[-1]["health/embedding_window_rank"] < WINDOW_RANK_FLOOR
