"""What a transfer study's report reads beyond the leaderboard: paired effects against random init
with their confidence intervals, the frozen-encoder probe's results and online curves, and how far
fine-tuning moved each encoder (its drift).

Every function reads tidy tables or finished runs (``medssl.results``), never a model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from medssl.analysis.gap import budget_key
from medssl.analysis.stats import bootstrap_ci, per_case_scores
from medssl.config import RANDOM_INIT
from medssl.results import FinishedRun, RunCollection

EFFECT_COLUMNS = ["task", "budget", "method", "n", "mean", "reference_mean", "diff", "ci_lo", "ci_hi", "p"]
DRIFT_PARTS = ("patch_embed", "stage1", "stage2", "stage3", "stage4", "encoder")


def wilcoxon_p(differences: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p of paired differences; 1 when none is non-zero."""
    if not np.any(differences != 0):
        return 1.0
    return float(sps.wilcoxon(differences).pvalue)


def paired_effects(results: pd.DataFrame, reference: str = RANDOM_INIT, metric: str = "dice") -> pd.DataFrame:
    """Per task x budget x method: the mean paired difference to ``reference`` over (test case, seed)
    pairs (each a case's mean over structures), its percentile-bootstrap 95% CI and the two-sided
    Wilcoxon signed-rank p. Units missing on either side are left out of that pair."""
    scores = per_case_scores(results, metric, unit="case_seed")
    rows: list[dict[str, Any]] = []
    for (task, budget), cell in scores.groupby(["task", "budget"], sort=True):
        wide = cell.pivot_table(index="case", columns="method", values="score", aggfunc="mean")
        if reference not in wide.columns:
            continue
        for method in wide.columns:
            if method == reference:
                continue
            pair = wide[[method, reference]].dropna()
            diff = (pair[method] - pair[reference]).to_numpy(dtype=float)
            if not len(diff):
                continue
            mean, lo, hi = bootstrap_ci(diff)
            rows.append(
                {
                    "task": task,
                    "budget": budget,
                    "method": method,
                    "n": len(diff),
                    "mean": float(pair[method].mean()),
                    "reference_mean": float(pair[reference].mean()),
                    "diff": mean,
                    "ci_lo": lo,
                    "ci_hi": hi,
                    "p": wilcoxon_p(diff),
                }
            )
    table = pd.DataFrame(rows, columns=EFFECT_COLUMNS)
    if not table.empty:
        table["_order"] = table["budget"].map(budget_key)
        table = table.sort_values(["task", "_order", "method"], kind="stable").drop(columns="_order")
    return table.reset_index(drop=True)


def _case_rows(run: FinishedRun) -> list[dict[str, Any]]:
    keys = {k: run.get(k) for k in ("method", "family", "task", "modality", "budget", "seed")}
    keys["budget"] = str(keys["budget"])
    rows = []
    for row in run.results.get("cases") or []:
        if isinstance(row, dict) and isinstance(row.get("dice"), int | float):
            rows.append({**keys, "case": row.get("case"), "structure": row.get("structure"), "dice": row["dice"]})
    return rows


def probe_results_table(collection: RunCollection) -> pd.DataFrame:
    """One row per probe run x test case x structure: ``method, family, task, modality, budget, seed,
    case, structure, dice`` (the shape ``per_case_scores`` and ``paired_effects`` read)."""
    columns = ["method", "family", "task", "modality", "budget", "seed", "case", "structure", "dice"]
    rows = [row for run in collection.runs.get("probe", []) for row in _case_rows(run)]
    return pd.DataFrame(rows, columns=columns)


def online_probe_curves(collection: RunCollection) -> pd.DataFrame:
    """The online probe of every pretraining run: ``method, run_id, step, dice`` (metrics.jsonl ``probe``)."""
    rows = []
    for run in collection.pretrain:
        for record in run.run.read_metrics():
            probe = record.get("probe")
            if isinstance(probe, dict) and isinstance(probe.get("dice"), int | float) and "step" in record:
                rows.append(
                    {
                        "method": run.get("method"),
                        "run_id": run.run_id,
                        "step": int(record["step"]),
                        "dice": probe["dice"],
                    }
                )
    frame = pd.DataFrame(rows, columns=["method", "run_id", "step", "dice"])
    return frame.sort_values(["method", "run_id", "step"], kind="stable", ignore_index=True)


def drift_table(collection: RunCollection) -> pd.DataFrame:
    """Mean encoder drift (relative weight change from the start, of the tested weights) per method and
    part over its fine-tuning runs: ``method, runs, patch_embed, stage1..4, encoder``."""
    rows = []
    for run in collection.finetune:
        drift = run.results.get("encoder_drift")
        if isinstance(drift, dict):
            rows.append({"method": run.get("method"), **{p: drift.get(p) for p in DRIFT_PARTS}})
    frame = pd.DataFrame(rows, columns=["method", *DRIFT_PARTS])
    if frame.empty:
        return pd.DataFrame(columns=["method", "runs", *DRIFT_PARTS])
    parts = frame[list(DRIFT_PARTS)].apply(pd.to_numeric, errors="coerce")
    grouped = parts.groupby(frame["method"])
    table = grouped.mean()
    table.insert(0, "runs", grouped.size())
    return table.reset_index()


def mean_score(results: pd.DataFrame, method: str, task: str, budget: str) -> float:
    """Mean over (case, seed) units of ``method`` at a task and budget (NaN when absent)."""
    scores = per_case_scores(results, unit="case_seed")
    cell = scores[(scores["method"] == method) & (scores["task"] == task) & (scores["budget"] == str(budget))]
    return float(cell["score"].mean()) if not cell.empty else float(np.nan)
