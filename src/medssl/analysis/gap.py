"""Data efficiency (few-shot vs many-shot gap) and the CT vs MRI summary, on the tidy results table.

The results table has one row per fine-tuning run × test case × structure with columns
``method, family, task, modality, budget (str), n_train, seed, case, label, structure, dice,
hd95, nsd, run_id``. A run's score is the mean over its cases and structures.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from medssl.budget import Budget

RUN_KEYS = ["method", "family", "task", "modality", "budget", "n_train", "seed", "run_id"]


def budget_key(budget: object) -> float:
    """Sort key of a label budget (``Budget.sort_key``): numbers by value, ``"all"`` after every number."""
    return Budget.parse(budget).sort_key()


def order_budgets(budgets: Iterable[object]) -> list[str]:
    """Distinct budgets as labels, smallest first, ``"all"`` last."""
    return [b.label for b in sorted({Budget.parse(b) for b in budgets})]


def run_means(results: pd.DataFrame, metric: str = "dice") -> pd.DataFrame:
    """One row per run: the mean of ``metric`` over its cases and structures (NaN ignored)."""
    keys = [c for c in RUN_KEYS if c in results.columns]
    if results.empty:
        return pd.DataFrame(columns=keys + [metric])
    frame = results.assign(budget=results["budget"].astype(str))
    return frame.groupby(keys, dropna=False, sort=True)[metric].mean().reset_index()


def _seed_scores(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean per method × task × budget × seed (several runs of one cell are averaged)."""
    runs = run_means(results, metric)
    keys = ["method", "family", "task", "modality", "budget", "seed"]
    return (
        runs.groupby(keys, dropna=False, sort=True)
        .agg(score=(metric, "mean"), n_train=("n_train", "mean"))
        .reset_index()
    )


def _count(value: float) -> int | None:
    return int(round(value)) if np.isfinite(value) else None


GAP_COLUMNS = [
    "method",
    "family",
    "task",
    "modality",
    "seed",
    "few_budget",
    "many_budget",
    "few_n_train",
    "many_n_train",
    "dice_few",
    "dice_many",
    "gap",
]


def few_many_gap(results: pd.DataFrame, metric: str = "dice") -> pd.DataFrame:
    """Per method × task × seed: score at the task's largest budget minus score at its smallest.

    The largest budget is ``"all"`` when the task has it, else the largest number; both budgets
    are the task's (over every method), so all methods of a task are compared at the same pair.
    A method × seed missing either budget gets no row; a task with one budget has no rows.
    """
    if results.empty:
        return pd.DataFrame(columns=GAP_COLUMNS)
    scores = _seed_scores(results, metric)
    rows = []
    for task, task_scores in scores.groupby("task", sort=True):
        budgets = order_budgets(task_scores["budget"])
        if len(budgets) < 2:
            continue
        few, many = budgets[0], budgets[-1]
        for (method, seed), group in task_scores.groupby(["method", "seed"], sort=True):
            by_budget = group.set_index("budget")
            if few not in by_budget.index or many not in by_budget.index:
                continue
            lo, hi = by_budget.loc[few], by_budget.loc[many]
            rows.append(
                {
                    "method": method,
                    "family": lo["family"],
                    "task": task,
                    "modality": lo["modality"],
                    "seed": seed,
                    "few_budget": few,
                    "many_budget": many,
                    "few_n_train": _count(lo["n_train"]),
                    "many_n_train": _count(hi["n_train"]),
                    "dice_few": lo["score"],
                    "dice_many": hi["score"],
                    "gap": hi["score"] - lo["score"],
                }
            )
    return pd.DataFrame(rows, columns=GAP_COLUMNS)


RANK_COLUMNS = ["method", "family", "task", "modality", "gap", "gap_std", "n_seeds", "rank", "mean_rank"]


def gap_ranks(gaps: pd.DataFrame) -> pd.DataFrame:
    """Rank methods per task by their mean gap over seeds (smallest gap = most data-efficient =
    rank 1; ties share the average rank) and add each method's mean rank over tasks.

    Only a positive mean gap is ranked. A gap <= 0 says the smallest budget scored at least as well as
    the largest: for a task that was learned that is noise of short or unconverged runs, and for one
    that was not (both budgets near 0 Dice) there is nothing to be efficient about. Such a method gets
    no rank (NaN) on that task, instead of rank 1, and its mean rank is over the tasks where it was
    ranked (NaN when none).

    Takes the output of :func:`few_many_gap` (a results table is converted first).
    """
    if "gap" not in gaps.columns:
        gaps = few_many_gap(gaps)
    if gaps.empty:
        return pd.DataFrame(columns=RANK_COLUMNS)
    per_task = (
        gaps.groupby(["method", "family", "task", "modality"], dropna=False, sort=True)
        .agg(gap=("gap", "mean"), gap_std=("gap", "std"), n_seeds=("seed", "nunique"))
        .reset_index()
    )
    ranked = per_task["gap"].where(per_task["gap"] > 0)
    per_task["rank"] = ranked.groupby(per_task["task"]).rank(method="average", ascending=True)
    per_task["mean_rank"] = per_task.groupby("method")["rank"].transform("mean")
    return per_task.sort_values(["task", "rank", "method"], kind="stable").reset_index(drop=True)[RANK_COLUMNS]


MODALITY_COLUMNS = ["method", "family", "budget", "ct", "mri", "mri_minus_ct", "n_ct_tasks", "n_mri_tasks"]


def modality_summary(results: pd.DataFrame, budget: str | None = None, metric: str = "dice") -> pd.DataFrame:
    """CT and MRI side by side: per method × budget the mean score over the tasks of each modality
    (each task weighs the same: its score is first averaged over seeds), and MRI − CT.

    ``budget`` keeps one budget only. A modality without tasks gives NaN in its column.
    """
    if budget is not None and not results.empty:
        results = results[results["budget"].astype(str) == str(budget)]
    if results.empty:
        return pd.DataFrame(columns=MODALITY_COLUMNS)
    scores = _seed_scores(results, metric)
    per_task = (
        scores.groupby(["method", "family", "task", "modality", "budget"], dropna=False, sort=True)["score"]
        .mean()
        .reset_index()
    )
    summary = per_task.pivot_table(
        index=["method", "family", "budget"], columns="modality", values="score", aggfunc="mean"
    )
    counts = per_task.pivot_table(
        index=["method", "family", "budget"], columns="modality", values="task", aggfunc="nunique"
    )
    out = pd.DataFrame(index=summary.index)
    for modality in ("ct", "mri"):
        out[modality] = summary[modality] if modality in summary.columns else np.nan
        out[f"n_{modality}_tasks"] = counts[modality].fillna(0).astype(int) if modality in counts.columns else 0
    out["mri_minus_ct"] = out["mri"] - out["ct"]
    out = out.reset_index()
    out["_order"] = out["budget"].map(budget_key)
    out = out.sort_values(["_order", "method"], kind="stable").drop(columns="_order").reset_index(drop=True)
    return out[MODALITY_COLUMNS]
