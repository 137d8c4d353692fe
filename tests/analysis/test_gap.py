"""Few/many-shot gap, its ranks, and the CT vs MRI summary on hand-made results tables."""

from __future__ import annotations

import pandas as pd
import pytest

from medssl.analysis.gap import budget_key, few_many_gap, gap_ranks, modality_summary, order_budgets, run_means

FAMILY = {"none": "none", "simmim": "mim", "simclr": "contrastive"}
N_TRAIN = {"2": 2, "5": 5, "all": 9}


def _results(scores: dict[tuple[str, str, str, int], float], modality: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per run × case × structure; case/structure values spread around the run's mean."""
    rows = []
    for (method, task, budget, seed), mean in scores.items():
        for case, offset in (("case_a", -0.05), ("case_b", 0.05)):
            for label, structure, extra in ((1, "liver", 0.02), (2, "spleen", -0.02)):
                rows.append(
                    {
                        "method": method,
                        "family": FAMILY[method],
                        "task": task,
                        "modality": (modality or {}).get(task, "ct"),
                        "budget": budget,
                        "n_train": N_TRAIN[budget],
                        "seed": seed,
                        "case": case,
                        "label": label,
                        "structure": structure,
                        "dice": mean + offset + extra,
                        "hd95": 3.0,
                        "nsd": 0.8,
                        "run_id": f"ft-{method}-{task}-b{budget}-s{seed}",
                    }
                )
    return pd.DataFrame(rows)


def test_budget_order_puts_all_last():
    assert order_budgets(["all", "10", "5", "5", 20]) == ["5", "10", "20", "all"]
    assert budget_key("all") == float("inf")
    with pytest.raises(ValueError, match="unknown label budget"):
        budget_key("many")


def test_run_means_average_cases_and_structures():
    table = _results({("simmim", "t1", "5", 0): 0.6})
    means = run_means(table)
    assert len(means) == 1 and means["dice"].iloc[0] == pytest.approx(0.6)


def test_few_many_gap_uses_the_tasks_smallest_and_largest_budgets():
    table = _results(
        {
            ("simmim", "t1", "2", 0): 0.4,
            ("simmim", "t1", "5", 0): 0.6,
            ("simmim", "t1", "all", 0): 0.8,
            ("none", "t1", "2", 0): 0.1,
            ("none", "t1", "all", 0): 0.7,
            ("simmim", "t1", "2", 1): 0.5,
            ("simmim", "t1", "all", 1): 0.8,
            ("none", "t1", "5", 1): 0.3,  # seed 1 of "none" lacks budget "all": no row
        }
    )
    gaps = few_many_gap(table).set_index(["method", "seed"])
    assert len(gaps) == 3
    assert gaps.loc[("simmim", 0), "gap"] == pytest.approx(0.4)
    assert gaps.loc[("simmim", 1), "gap"] == pytest.approx(0.3)
    assert gaps.loc[("none", 0), "gap"] == pytest.approx(0.6)
    row = gaps.loc[("simmim", 0)]
    assert (row["few_budget"], row["many_budget"], row["few_n_train"], row["many_n_train"]) == ("2", "all", 2, 9)
    assert row["dice_few"] == pytest.approx(0.4) and row["dice_many"] == pytest.approx(0.8)


def test_largest_numeric_budget_when_there_is_no_all():
    table = _results({("simmim", "t1", "2", 0): 0.3, ("simmim", "t1", "5", 0): 0.5})
    gaps = few_many_gap(table)
    assert gaps["many_budget"].tolist() == ["5"] and gaps["gap"].iloc[0] == pytest.approx(0.2)


def test_one_budget_gives_an_empty_gap_table():
    table = _results({("simmim", "t1", "all", 0): 0.8, ("none", "t1", "all", 0): 0.7})
    assert few_many_gap(table).empty
    assert gap_ranks(few_many_gap(table)).empty
    assert few_many_gap(table.iloc[0:0]).empty


def test_gap_ranks_rank_small_gaps_first_and_average_over_tasks():
    scores = {}
    # task t1: gaps simmim 0.1, simclr 0.3, none 0.5; task t2: simclr 0.1, simmim 0.2, none 0.4
    for task, gaps in (
        ("t1", {"simmim": 0.1, "simclr": 0.3, "none": 0.5}),
        ("t2", {"simmim": 0.2, "simclr": 0.1, "none": 0.4}),
    ):
        for method, gap in gaps.items():
            for seed, jitter in ((0, 0.01), (1, -0.01)):
                scores[(method, task, "all", seed)] = 0.9
                scores[(method, task, "5", seed)] = 0.9 - gap + jitter
    ranks = gap_ranks(few_many_gap(_results(scores)))
    by_key = ranks.set_index(["task", "method"])
    assert by_key.loc[("t1", "simmim"), "rank"] == 1 and by_key.loc[("t1", "none"), "rank"] == 3
    assert by_key.loc[("t2", "simclr"), "rank"] == 1
    assert by_key.loc[("t1", "simmim"), "gap"] == pytest.approx(0.1)
    assert by_key.loc[("t1", "simmim"), "n_seeds"] == 2
    mean_rank = ranks.drop_duplicates("method").set_index("method")["mean_rank"]
    assert mean_rank["simmim"] == pytest.approx(1.5) and mean_rank["none"] == pytest.approx(3.0)
    # A results table is accepted too.
    assert gap_ranks(_results(scores)).equals(ranks)


def test_gap_rank_ties_share_the_average_rank():
    scores = {
        ("simmim", "t1", "all", 0): 0.9,
        ("simmim", "t1", "5", 0): 0.7,
        ("simclr", "t1", "all", 0): 0.8,
        ("simclr", "t1", "5", 0): 0.6,
    }
    ranks = gap_ranks(_results(scores))
    assert ranks["rank"].tolist() == [1.5, 1.5]


def test_modality_summary_puts_ct_and_mri_side_by_side():
    scores = {
        ("simmim", "ct1", "all", 0): 0.8,
        ("simmim", "ct2", "all", 0): 0.6,
        ("simmim", "mr1", "all", 0): 0.5,
        ("simmim", "mr1", "all", 1): 0.3,
        ("none", "ct1", "all", 0): 0.5,
        ("none", "mr1", "all", 0): 0.2,
        ("simmim", "ct1", "5", 0): 0.4,
    }
    table = _results(scores, modality={"ct1": "ct", "ct2": "ct", "mr1": "mri"})
    summary = modality_summary(table)
    assert summary["budget"].tolist() == ["5", "all", "all"]
    at_all = modality_summary(table, budget="all").set_index("method")
    assert at_all.loc["simmim", "ct"] == pytest.approx(0.7)  # tasks weigh equally
    assert at_all.loc["simmim", "mri"] == pytest.approx(0.4)  # seeds averaged first
    assert at_all.loc["simmim", "mri_minus_ct"] == pytest.approx(-0.3)
    assert at_all.loc["simmim", "n_ct_tasks"] == 2 and at_all.loc["simmim", "n_mri_tasks"] == 1
    assert at_all.loc["none", "mri_minus_ct"] == pytest.approx(-0.3)
    only_five = modality_summary(table, budget="5").set_index("method")
    assert pd.isna(only_five.loc["simmim", "mri"]) and only_five.loc["simmim", "n_mri_tasks"] == 0
    assert modality_summary(table.iloc[0:0]).empty
