"""Significance and uncertainty: paired Wilcoxon with Holm, bootstrap CIs, Friedman ranks with the
Nemenyi critical difference, and the critical-difference plot (Demšar 2006).

All functions take the tidy results table (one row per run × case × structure; columns ``method,
family, task, modality, budget, n_train, seed, case, label, structure, dice, hd95, nsd, run_id``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from medssl.analysis.gap import budget_key, order_budgets
from medssl.config import RANDOM_INIT

LOWER_IS_BETTER = {"hd95"}
WILCOXON_COLUMNS = [
    "method",
    "task",
    "budget",
    "comparison",
    "other",
    "n",
    "statistic",
    "p",
    "p_holm",
    "significant",
    "mean_diff",
]


def _higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


PairingUnit = Literal["case", "case_seed"]


def per_case_scores(results: pd.DataFrame, metric: str = "dice", unit: PairingUnit = "case") -> pd.DataFrame:
    """Method × unit scores per task × budget: a unit's score is its mean over structures.

    ``unit="case"``: one score per test case, the mean over seeds (long table ``task, budget, method,
    case, score``). ``unit="case_seed"``: one score per (test case, seed) — each seed trains its own
    model on its own cases, so every (case, seed) is a separate evaluation; the ``case`` column then
    reads ``<case>@s<seed>`` so the same pivot pairs methods on it.
    """
    if results.empty:
        return pd.DataFrame(columns=["task", "budget", "method", "case", "score"])
    if unit not in ("case", "case_seed"):
        raise ValueError(f"unit must be 'case' or 'case_seed', got {unit!r}")
    frame = results.assign(budget=results["budget"].astype(str))
    per_seed = frame.groupby(["task", "budget", "method", "seed", "case"], sort=True)[metric].mean()
    if unit == "case":
        per_case = per_seed.groupby(["task", "budget", "method", "case"], sort=True).mean()
        return per_case.rename("score").reset_index()
    table = per_seed.rename("score").reset_index()
    table["case"] = table["case"].astype(str) + "@s" + table["seed"].astype(str)
    return table.drop(columns="seed")[["task", "budget", "method", "case", "score"]]


MIN_PAIRS_FOR_SIGNIFICANCE = 6  # the fewest pairs whose smallest two-sided Wilcoxon p is below 0.05


def smallest_wilcoxon_p(n: int) -> float:
    """The smallest two-sided p a Wilcoxon signed-rank test on ``n`` pairs can give: every difference of
    one sign, exact null distribution, ``2 / 2**n`` (0.25 at n = 3, 0.0625 at 5, 0.031 at 6). A test on
    fewer than :data:`MIN_PAIRS_FOR_SIGNIFICANCE` pairs cannot reach p < 0.05 whatever the data."""
    return 1.0 if n < 1 else min(1.0, 2.0 / 2.0**n)


def smallest_holm_p(n: int, tests: int) -> float:
    """The smallest Holm-corrected p within a family of ``tests`` tests on ``n`` pairs each: Holm
    multiplies the smallest p of the family by the number of tests."""
    return min(1.0, max(tests, 1) * smallest_wilcoxon_p(n))


def _wilcoxon(differences: np.ndarray) -> tuple[float, float]:
    """Signed-rank statistic and two-sided p; all-zero (or no) differences give (0, 1)."""
    nonzero = differences[differences != 0]
    if len(nonzero) == 0:
        return 0.0, 1.0
    result = sps.wilcoxon(differences)
    return float(result.statistic), float(result.pvalue)


def paired_wilcoxon(
    results: pd.DataFrame,
    reference: str = RANDOM_INIT,
    metric: str = "dice",
    alpha: float = 0.05,
    unit: PairingUnit = "case",
) -> pd.DataFrame:
    """Per task × budget: paired Wilcoxon signed-rank tests on per-case scores of every method vs
    ``reference`` (``comparison="reference"``) and vs the best method by mean (``"best"``).

    Units (``unit``: test cases averaged over seeds, or (case, seed) pairs, see ``per_case_scores``)
    are paired within a task × budget (the test split of a seed is the same for every method); a unit
    missing for either method is left out of that pair. ``mean_diff`` = mean(method − other) (for
    hd95, lower is better: the best method is the one with the lowest mean). Holm correction runs
    over the tests of one comparison kind within one task × budget — each kind is its own family
    of hypotheses (is it better than random init? is it worse than the best?).
    """
    scores = per_case_scores(results, metric, unit)
    rows: list[dict[str, Any]] = []
    for (task, budget), cell in scores.groupby(["task", "budget"], sort=True):
        wide = cell.pivot_table(index="case", columns="method", values="score", aggfunc="mean")
        means = wide.mean(axis=0, skipna=True).dropna()
        if means.empty:
            continue
        best = means.idxmax() if _higher_is_better(metric) else means.idxmin()
        for comparison, other in (("reference", reference), ("best", best)):
            if other not in wide.columns:
                continue
            family: list[dict[str, Any]] = []
            for method in wide.columns:
                if method == other:
                    continue
                pair = wide[[method, other]].dropna()
                differences = (pair[method] - pair[other]).to_numpy(dtype=float)
                if len(differences):
                    statistic, p = _wilcoxon(differences)
                    mean_diff = float(differences.mean())
                else:
                    statistic, p, mean_diff = float("nan"), float("nan"), float("nan")
                family.append(
                    {
                        "method": method,
                        "task": task,
                        "budget": budget,
                        "comparison": comparison,
                        "other": other,
                        "n": len(differences),
                        "statistic": statistic,
                        "p": p,
                        "mean_diff": mean_diff,
                    }
                )
            _holm(family, alpha)
            rows.extend(family)
    table = pd.DataFrame(rows, columns=WILCOXON_COLUMNS)
    if not table.empty:
        table["_order"] = table["budget"].map(budget_key)
        table = table.sort_values(["task", "_order", "comparison", "method"], kind="stable").drop(columns="_order")
    return table.reset_index(drop=True)


def _holm(family: list[dict[str, Any]], alpha: float) -> None:
    """Holm-adjusted p values (statsmodels) for the rows with a defined p, in place."""
    tested = [row for row in family if math.isfinite(row["p"])]
    for row in family:
        row["p_holm"], row["significant"] = float("nan"), False
    if not tested:
        return
    reject, adjusted, _, _ = multipletests([row["p"] for row in tested], alpha=alpha, method="holm")
    for row, rej, p_adj in zip(tested, reject, adjusted, strict=True):
        row["p_holm"], row["significant"] = float(p_adj), bool(rej)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, n_boot: int = 2000, ci: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Percentile bootstrap CI of the mean: ``(mean, lo, hi)``; NaN values are dropped.

    One value gives ``(v, v, v)``; none gives NaNs.
    """
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    x = np.asarray(values, dtype=float).ravel()
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(x.mean())
    if len(x) == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    resampled = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    tail = (1.0 - ci) / 2.0 * 100.0
    lo, hi = np.percentile(resampled, [tail, 100.0 - tail])
    return mean, float(lo), float(hi)


def nemenyi_cd(k: int, n: int, alpha: float = 0.05) -> float:
    """Nemenyi critical difference of mean ranks for ``k`` methods over ``n`` datasets:
    ``q_α · sqrt(k(k+1) / (6n))`` with ``q_α`` the studentized range quantile over sqrt(2)."""
    if k < 2 or n < 1:
        raise ValueError(f"the critical difference needs k ≥ 2 methods and n ≥ 1 tasks (k={k}, n={n})")
    q_alpha = sps.studentized_range.ppf(1.0 - alpha, k, np.inf) / math.sqrt(2.0)
    return float(q_alpha * math.sqrt(k * (k + 1) / (6.0 * n)))


def _friedman_level(matrix: pd.DataFrame, budgets: dict[str, str], metric: str, alpha: float) -> dict[str, Any]:
    """Ranks, Friedman test and CD on a method × task matrix (complete tasks only)."""
    complete = matrix.dropna(axis=1, how="any")
    dropped = sorted(set(matrix.columns) - set(complete.columns))
    k, n = complete.shape
    out: dict[str, Any] = {
        "budgets": {t: budgets[t] for t in complete.columns},
        "matrix": complete,
        "dropped_tasks": dropped,
        "k": int(k),
        "n": int(n),
        "mean_ranks": {},
        "statistic": None,
        "p": None,
        "cd": None,
        "reason": None,
    }
    if k == 0 or n == 0:
        out["reason"] = "no task has a score for every method"
        return out
    ranks = complete.rank(axis=0, ascending=not _higher_is_better(metric), method="average")
    out["rank_matrix"] = ranks
    out["mean_ranks"] = {m: float(r) for m, r in ranks.mean(axis=1).sort_values(kind="stable").items()}
    if k >= 2:
        out["cd"] = nemenyi_cd(k, n, alpha)
    if k < 3 or n < 2:
        out["reason"] = f"the Friedman test needs at least 3 methods and 2 tasks (have {k} and {n})"
        return out
    statistic, p = sps.friedmanchisquare(*[complete.loc[m].to_numpy(dtype=float) for m in complete.index])
    if not math.isfinite(statistic):
        # Every task ranks all methods equal: no evidence of any difference.
        out["statistic"], out["p"], out["reason"] = 0.0, 1.0, "all methods tie on every task"
    else:
        out["statistic"], out["p"] = float(statistic), float(p)
    return out


def friedman_ranks(results: pd.DataFrame, metric: str = "dice", alpha: float = 0.05) -> dict[str, Any]:
    """Friedman test and mean ranks of methods across tasks, at each task's largest budget
    (``"all"`` where present) and at its smallest budget.

    Returns ``{"largest": level, "smallest": level}``; a level holds ``matrix`` (method × task
    DataFrame of mean scores over cases, structures and seeds), ``budgets`` (task → budget used),
    ``rank_matrix`` (method × task ranks, rank 1 = best), ``mean_ranks`` (method → mean rank, best
    first), ``statistic``, ``p``, ``cd`` (Nemenyi critical difference at ``alpha``), ``k``, ``n``,
    ``dropped_tasks`` (tasks without a score for every method) and ``reason`` (why ``p`` is None).
    """
    levels: dict[str, Any] = {}
    frame = results.assign(budget=results["budget"].astype(str)) if not results.empty else results
    for level in ("largest", "smallest"):
        cells: dict[str, pd.Series] = {}
        budgets: dict[str, str] = {}
        if not frame.empty:
            for task, task_rows in frame.groupby("task", sort=True):
                ordered = order_budgets(task_rows["budget"])
                budget = ordered[-1] if level == "largest" else ordered[0]
                rows = task_rows[task_rows["budget"] == budget]
                per_seed = rows.groupby(["method", "seed"])[metric].mean()
                cells[task] = per_seed.groupby("method").mean()
                budgets[task] = budget
        matrix = pd.DataFrame(cells)
        levels[level] = _friedman_level(matrix, budgets, metric, alpha)
    return levels


def cliques(ranks: Mapping[str, float], cd: float | None) -> list[list[str]]:
    """Maximal groups of methods whose mean ranks differ by at most ``cd`` (not significantly
    different), as lists of names in rank order; single methods are not listed."""
    if cd is None or not math.isfinite(cd) or len(ranks) < 2:
        return []
    ordered = sorted(ranks.items(), key=lambda item: item[1])
    values = [r for _, r in ordered]
    groups: list[list[str]] = []
    last_end = -1
    for i in range(len(ordered)):
        j = i
        while j + 1 < len(ordered) and values[j + 1] - values[i] <= cd + 1e-12:
            j += 1
        if j > i and j > last_end:  # not contained in the previous group
            groups.append([name for name, _ in ordered[i : j + 1]])
            last_end = j
    return groups


def critical_difference_figure(ranks: Mapping[str, float], cd: float | None, title: str | None = None) -> Any:
    """Demšar's critical-difference diagram as a matplotlib ``Figure`` (Agg): methods on a mean-rank axis
    (rank 1 = best, left), the CD as a bar with its "CD =" label, methods not significantly different
    joined by thick lines, and the title in a row of its own above the CD label."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # Agg: no pyplot state, no display

    if not ranks:
        raise ValueError("no methods to plot")
    ordered = sorted(ranks.items(), key=lambda item: item[1])
    k = len(ordered)
    lo_axis, hi_axis = 1, max(k, math.ceil(max(r for _, r in ordered)))
    left = ordered[: math.ceil(k / 2)]
    right = ordered[math.ceil(k / 2) :]
    n_rows = max(len(left), len(right))
    groups = cliques(ranks, cd)
    title_room = 0.45 if title else 0.0  # data units (about inches) above the CD label
    height = 1.6 + 0.32 * n_rows + 0.18 * len(groups) + title_room
    fig = Figure(figsize=(7.5, height), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.03, 0.02, 0.94, 0.96))
    axis_y, label_step = 0.0, 0.32
    bottom = -(0.35 + len(groups) * 0.18 + n_rows * label_step + 0.2)
    top = 0.95 + title_room
    ax.set_xlim(lo_axis - 1.1, hi_axis + 1.1)
    ax.set_ylim(bottom, top)
    ax.axis("off")
    ax.hlines(axis_y, lo_axis, hi_axis, color="black", linewidth=1.2)
    for tick in range(lo_axis, hi_axis + 1):
        ax.vlines(tick, axis_y, axis_y + 0.08, color="black", linewidth=1.0)
        ax.text(tick, axis_y + 0.12, str(tick), ha="center", va="bottom", fontsize=9)
    ax.text((lo_axis + hi_axis) / 2, axis_y + 0.3, "mean rank (1 = best)", ha="center", va="bottom", fontsize=9)
    if cd is not None and math.isfinite(cd):
        ax.hlines(0.7, lo_axis, lo_axis + cd, color="black", linewidth=2.0)
        for x in (lo_axis, lo_axis + cd):
            ax.vlines(x, 0.65, 0.75, color="black", linewidth=1.0)
        ax.text(lo_axis + cd / 2, 0.77, f"CD = {cd:.2f}", ha="center", va="bottom", fontsize=9, gid="cd-label")
    for g, members in enumerate(groups):
        y = -0.2 - g * 0.18
        xs = [ranks[m] for m in members]
        ax.hlines(y, min(xs) - 0.03, max(xs) + 0.03, color="tab:red", linewidth=4.0, alpha=0.85)
    label_top = -0.35 - len(groups) * 0.18
    for side, entries in (("left", left), ("right", right)):
        for row, (name, rank) in enumerate(entries if side == "left" else reversed(entries)):
            y = label_top - row * label_step
            x_text = lo_axis - 0.15 if side == "left" else hi_axis + 0.15
            ax.vlines(rank, y, axis_y, color="0.35", linewidth=0.8)
            ax.hlines(y, min(rank, x_text), max(rank, x_text), color="0.35", linewidth=0.8)
            ax.text(
                x_text,
                y,
                f"{name} ({rank:.2f})",
                ha="right" if side == "left" else "left",
                va="center",
                fontsize=9,
            )
    if title:
        # in the axes' own coordinates, above the CD label's row: a figure title sat on top of that label
        ax.text((lo_axis + hi_axis) / 2, top - 0.05, title, ha="center", va="top", fontsize=10, gid="cd-title")
    return fig


def critical_difference_plot(
    ranks: Mapping[str, float], cd: float | None, path: str | Path, title: str | None = None
) -> None:
    """:func:`critical_difference_figure` written to ``path`` (PNG)."""
    fig = critical_difference_figure(ranks, cd, title)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
