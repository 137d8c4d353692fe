"""Statistics against scipy/statsmodels on known inputs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from medssl.analysis.stats import (
    bootstrap_ci,
    cliques,
    critical_difference_plot,
    friedman_ranks,
    nemenyi_cd,
    paired_wilcoxon,
    per_case_scores,
)

FAMILY = {"none": "none", "simmim": "mim", "simclr": "contrastive", "dino": "self_distillation"}


def _rows(method, task, budget, seed, case, structure, dice, hd95=3.0):
    return {
        "method": method,
        "family": FAMILY[method],
        "task": task,
        "modality": "ct",
        "budget": budget,
        "n_train": 5 if budget == "5" else 20,
        "seed": seed,
        "case": case,
        "label": 1 if structure == "liver" else 2,
        "structure": structure,
        "dice": dice,
        "hd95": hd95,
        "nsd": 0.8,
        "run_id": f"ft-{method}-{task}-{budget}-{seed}",
    }


def _table(per_method: dict[str, np.ndarray], task: str = "t1", budget: str = "all") -> pd.DataFrame:
    """One seed, one structure: per-case scores are exactly the given values."""
    return pd.DataFrame(
        [
            _rows(method, task, budget, 0, f"case_{i:02d}", "liver", float(v))
            for method, values in per_method.items()
            for i, v in enumerate(values)
        ]
    )


def _scores(seed: int = 0, n: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.4, 0.7, size=n)
    return {
        "none": base,
        "simmim": base + 0.1 + rng.normal(0, 0.03, size=n),
        "simclr": base + 0.02 + rng.normal(0, 0.05, size=n),
        "dino": base + 0.12 + rng.normal(0, 0.03, size=n),
    }


# --------------------------------------------------------------------------- Wilcoxon + Holm


def test_paired_wilcoxon_matches_scipy_and_holm_matches_statsmodels():
    scores = _scores()
    table = paired_wilcoxon(_table(scores), reference="none")
    vs_ref = table[table["comparison"] == "reference"].set_index("method")
    assert set(vs_ref.index) == {"simmim", "simclr", "dino"}
    for method in vs_ref.index:
        expected = sps.wilcoxon(scores[method] - scores["none"])
        assert vs_ref.loc[method, "p"] == pytest.approx(expected.pvalue, rel=1e-12)
        assert vs_ref.loc[method, "statistic"] == pytest.approx(expected.statistic)
        assert vs_ref.loc[method, "n"] == 12
        assert vs_ref.loc[method, "mean_diff"] == pytest.approx(np.mean(scores[method] - scores["none"]))
        assert vs_ref.loc[method, "other"] == "none"
    reject, adjusted, _, _ = multipletests(vs_ref["p"].to_numpy(), method="holm")
    assert np.allclose(vs_ref["p_holm"].to_numpy(), adjusted)
    assert vs_ref["significant"].tolist() == list(reject)
    assert bool(vs_ref.loc["dino", "significant"]) is True


def test_paired_wilcoxon_against_the_best_method():
    scores = _scores()
    best = max(scores, key=lambda m: scores[m].mean())
    table = paired_wilcoxon(_table(scores), reference="none")
    vs_best = table[table["comparison"] == "best"].set_index("method")
    assert best == "dino" and set(vs_best["other"]) == {best}
    assert best not in vs_best.index and len(vs_best) == 3
    expected = sps.wilcoxon(scores["simclr"] - scores[best])
    assert vs_best.loc["simclr", "p"] == pytest.approx(expected.pvalue, rel=1e-12)
    assert vs_best.loc["simclr", "mean_diff"] < 0
    assert set(table.columns) >= {
        "method",
        "task",
        "budget",
        "comparison",
        "n",
        "statistic",
        "p",
        "p_holm",
        "significant",
        "mean_diff",
    }


def test_paired_wilcoxon_averages_structures_then_seeds():
    rows = []
    rng = np.random.default_rng(1)
    expected = {"none": [], "simmim": []}
    for i in range(8):
        for method in ("none", "simmim"):
            values = rng.uniform(0.3, 0.9, size=(2, 2))  # seed × structure
            for seed in range(2):
                for s, structure in enumerate(("liver", "spleen")):
                    rows.append(_rows(method, "t1", "5", seed, f"c{i}", structure, values[seed, s]))
            expected[method].append(values.mean())
    table = pd.DataFrame(rows)
    per_case = per_case_scores(table).pivot_table(index="case", columns="method", values="score")
    assert np.allclose(per_case["simmim"].to_numpy(), expected["simmim"])
    result = paired_wilcoxon(table, reference="none").query("comparison == 'reference'")
    want = sps.wilcoxon(np.array(expected["simmim"]) - np.array(expected["none"]))
    assert result["p"].iloc[0] == pytest.approx(want.pvalue, rel=1e-12)
    assert result["budget"].iloc[0] == "5"


def test_all_zero_differences_give_p_one():
    scores = {"none": np.linspace(0.2, 0.8, 6), "simmim": np.linspace(0.2, 0.8, 6)}
    table = paired_wilcoxon(_table(scores), reference="none")
    row = table[table["comparison"] == "reference"].iloc[0]
    assert row["p"] == 1.0 and row["statistic"] == 0.0 and row["p_holm"] == 1.0 and not row["significant"]


def test_missing_reference_and_unpaired_cases():
    scores = _scores(n=8)
    table = _table({m: v for m, v in scores.items() if m != "none"})
    result = paired_wilcoxon(table, reference="none")
    assert set(result["comparison"]) == {"best"}
    # A case only one method has is dropped from that pair.
    extra = pd.DataFrame([_rows("simmim", "t1", "all", 0, "lonely", "liver", 0.99)])
    result = paired_wilcoxon(pd.concat([_table(scores), extra]), reference="none")
    assert result.query("comparison == 'reference' and method == 'simmim'")["n"].iloc[0] == 8


def test_hd95_lower_is_better():
    rows = [
        _rows(m, "t1", "all", 0, f"c{i}", "liver", 0.5, hd95=h + i)
        for m, h in (("none", 9.0), ("simmim", 2.0), ("simclr", 5.0))
        for i in range(6)
    ]
    result = paired_wilcoxon(pd.DataFrame(rows), metric="hd95")
    assert set(result.query("comparison == 'best'")["other"]) == {"simmim"}


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_contains_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.7, 0.1, size=10), rng.normal(0.7, 0.1, size=1000)
    mean_s, lo_s, hi_s = bootstrap_ci(small)
    mean_l, lo_l, hi_l = bootstrap_ci(large)
    assert mean_s == pytest.approx(small.mean()) and lo_s < mean_s < hi_s
    assert lo_l < mean_l < hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 5  # width ~ 1/sqrt(n): 10x more data, ~3x... at 100x, 10x
    # Close to the normal-theory interval for a large sample.
    half_width = 1.96 * large.std(ddof=1) / math.sqrt(len(large))
    assert (hi_l - lo_l) / 2 == pytest.approx(half_width, rel=0.15)
    assert bootstrap_ci(small, seed=3) == bootstrap_ci(small, seed=3)
    assert bootstrap_ci(small, ci=0.5)[2] - bootstrap_ci(small, ci=0.5)[1] < hi_s - lo_s


def test_bootstrap_ci_edge_cases():
    assert bootstrap_ci([0.4]) == (0.4, 0.4, 0.4)
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    assert bootstrap_ci([0.2, float("nan"), 0.4])[0] == pytest.approx(0.3)
    assert bootstrap_ci([0.5] * 7) == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError):
        bootstrap_ci([0.1, 0.2], ci=1.0)


# --------------------------------------------------------------------------- Friedman and CD


def test_nemenyi_critical_difference_by_hand():
    # k = 4, N = 10, alpha 0.05: q = 2.569, CD = 2.569 * sqrt(4 * 5 / 60) = 1.483.
    assert nemenyi_cd(4, 10) == pytest.approx(2.569 * math.sqrt(4 * 5 / 60), abs=1e-3)
    assert nemenyi_cd(4, 10) == pytest.approx(1.483, abs=1e-3)
    assert nemenyi_cd(2, 10) == pytest.approx(1.960 * math.sqrt(2 * 3 / 60), abs=1e-3)
    with pytest.raises(ValueError):
        nemenyi_cd(1, 5)


def _friedman_table() -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(2)
    methods, tasks = ["none", "simmim", "simclr", "dino"], [f"t{i}" for i in range(5)]
    matrix = pd.DataFrame(rng.uniform(0.3, 0.9, size=(4, 5)), index=methods, columns=tasks)
    matrix.loc["dino"] += 0.3  # best everywhere
    rows = []
    for m in methods:
        for t in tasks:
            for budget, shift in (("5", -0.2), ("all", 0.0)):
                for case, offset in (("a", -0.01), ("b", 0.01)):
                    rows.append(_rows(m, t, budget, 0, case, "liver", matrix.loc[m, t] + shift + offset))
    return pd.DataFrame(rows), matrix


def test_friedman_matches_scipy_and_ranks_are_by_hand():
    table, matrix = _friedman_table()
    result = friedman_ranks(table)
    largest = result["largest"]
    expected = sps.friedmanchisquare(*[matrix.loc[m].to_numpy() for m in matrix.index])
    assert largest["statistic"] == pytest.approx(expected.statistic)
    assert largest["p"] == pytest.approx(expected.pvalue)
    assert largest["k"] == 4 and largest["n"] == 5 and largest["reason"] is None
    assert largest["budgets"] == {t: "all" for t in matrix.columns}
    hand_ranks = matrix.rank(axis=0, ascending=False).mean(axis=1)
    assert largest["mean_ranks"] == {m: pytest.approx(hand_ranks[m]) for m in matrix.index}
    assert largest["mean_ranks"]["dino"] == 1.0 and next(iter(largest["mean_ranks"])) == "dino"
    assert largest["cd"] == pytest.approx(nemenyi_cd(4, 5))
    pd.testing.assert_frame_equal(largest["matrix"].loc[matrix.index, matrix.columns], matrix, check_names=False)
    smallest = result["smallest"]
    assert smallest["budgets"] == {t: "5" for t in matrix.columns}
    assert smallest["statistic"] == pytest.approx(expected.statistic)  # a constant shift keeps ranks


def test_friedman_needs_three_methods_and_two_tasks():
    table, _ = _friedman_table()
    two_methods = friedman_ranks(table[table["method"].isin(["none", "dino"])])["largest"]
    assert two_methods["p"] is None and "3 methods" in two_methods["reason"]
    assert two_methods["mean_ranks"] == {"dino": 1.0, "none": 2.0}
    one_task = friedman_ranks(table[table["task"] == "t0"])["largest"]
    assert one_task["p"] is None and one_task["n"] == 1
    # A task some method lacks is left out of the test, and named.
    partial = table[~((table["method"] == "simclr") & (table["task"] == "t4"))]
    level = friedman_ranks(partial)["largest"]
    assert level["dropped_tasks"] == ["t4"] and level["n"] == 4
    assert friedman_ranks(table.iloc[0:0])["largest"]["reason"]


def test_cliques_join_methods_within_the_critical_difference():
    ranks = {"A": 1.0, "B": 1.5, "C": 2.9, "D": 3.6}
    assert cliques(ranks, 1.483) == [["A", "B"], ["B", "C"], ["C", "D"]]
    assert cliques(ranks, 3.0) == [["A", "B", "C", "D"]]
    assert cliques(ranks, 0.1) == []
    assert cliques(ranks, None) == []


def test_critical_difference_plot_writes_a_png(tmp_path):
    table, _ = _friedman_table()
    level = friedman_ranks(table)["largest"]
    path = tmp_path / "figures" / "cd.png"
    critical_difference_plot(level["mean_ranks"], level["cd"], path, title="Dice at the largest budget")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    critical_difference_plot({"a": 1.2, "b": 1.8}, None, tmp_path / "no_cd.png")
    assert (tmp_path / "no_cd.png").stat().st_size > 1000
    with pytest.raises(ValueError):
        critical_difference_plot({}, 1.0, tmp_path / "empty.png")


def test_paired_wilcoxon_on_case_seed_pairs_keeps_every_evaluation():
    # Each seed has its own test split: a (case, seed) pair is one evaluation, not averaged away.
    rows = []
    rng = np.random.default_rng(2)
    differences = []
    for seed in range(3):
        for i in range(4):
            base, gain = rng.uniform(0.3, 0.8), rng.uniform(-0.05, 0.2)
            rows.append(_rows("none", "t1", "1", seed, f"c{seed}{i}", "liver", base))
            rows.append(_rows("simmim", "t1", "1", seed, f"c{seed}{i}", "liver", base + gain))
            differences.append(gain)
    table = pd.DataFrame(rows)
    units = per_case_scores(table, unit="case_seed")
    assert len(units) == 2 * 12 and units["case"].str.contains("@s").all()
    result = paired_wilcoxon(table, reference="none", unit="case_seed").query("comparison == 'reference'")
    assert result["n"].iloc[0] == 12
    assert result["p"].iloc[0] == pytest.approx(sps.wilcoxon(np.array(differences)).pvalue, rel=1e-9)
    with pytest.raises(ValueError, match="unit"):
        per_case_scores(table, unit="seed")


@pytest.mark.parametrize("k", [2, 3, 6, 11])
def test_critical_difference_title_does_not_overlap_the_cd_label(k):
    from medssl.analysis.stats import critical_difference_figure

    ranks = {f"method_{i}": 1.0 + i * (k - 1) / max(k - 1, 1) * 0.9 for i in range(k)}
    title = "Critical difference — largest budget per task"
    fig = critical_difference_figure(ranks, 1.9, title=title)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = {t.get_gid(): t for t in fig.axes[0].texts if t.get_gid()}
    title_box = texts["cd-title"].get_window_extent(renderer)
    label_box = texts["cd-label"].get_window_extent(renderer)
    assert not title_box.overlaps(label_box)
    assert title_box.y0 > label_box.y1  # the title sits above the label
    figure_box = fig.bbox
    assert title_box.y1 <= figure_box.y1 and title_box.x0 >= figure_box.x0  # inside the figure


@pytest.mark.parametrize("n", [3, 4, 5, 6, 7])
def test_smallest_wilcoxon_p_is_that_of_pairs_all_of_one_sign(n):
    from scipy import stats as sps

    from medssl.analysis.stats import MIN_PAIRS_FOR_SIGNIFICANCE, smallest_holm_p, smallest_wilcoxon_p

    differences = np.arange(1, n + 1, dtype=float) * 0.01  # distinct, all positive: the most extreme case
    assert smallest_wilcoxon_p(n) == pytest.approx(sps.wilcoxon(differences).pvalue)
    assert (smallest_wilcoxon_p(n) < 0.05) == (n >= MIN_PAIRS_FOR_SIGNIFICANCE)
    assert smallest_holm_p(n, 9) == pytest.approx(min(1.0, 9 * smallest_wilcoxon_p(n)))
