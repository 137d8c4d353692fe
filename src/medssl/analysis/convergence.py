"""Convergence of fine-tuning: how soon validation Dice gets close to its best, and how high it runs.

Both measures are per run, on the validation curve (``curves`` table: one row per run × step):

* steps (and epochs) until validation Dice first reaches ``fraction`` (95%) of that run's best;
  None when the run never learned anything (best Dice 0) or has no curve;
* the normalised area under the curve: steps rescaled to [0, 1] over the logged range, trapezoid
  rule. It is the time-averaged validation Dice, so a run that gets high early scores higher even
  when two runs end at the same Dice. Runs compared this way share the schedule (same steps and
  ``val_every``), which makes the rescaling fair.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.integrate import trapezoid

RUN_COLUMNS = ["method", "family", "task", "modality", "budget", "n_train", "seed", "run_id"]
GROUP_COLUMNS = ["method", "family", "task", "modality", "budget"]


def _curve_arrays(
    curve: pd.DataFrame | Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) sorted by step, without points whose value is missing."""
    if isinstance(curve, pd.DataFrame):
        if values is not None:
            raise ValueError("pass either a curve DataFrame or steps and values, not both")
        steps, vals = curve["step"].to_numpy(dtype=float), curve["val_dice"].to_numpy(dtype=float)
    else:
        if values is None:
            raise ValueError("values are required when steps are given as an array")
        steps, vals = np.asarray(curve, dtype=float), np.asarray(values, dtype=float)
    if steps.shape != vals.shape or steps.ndim != 1:
        raise ValueError(f"steps and values must be 1-D of equal length, got {steps.shape} and {vals.shape}")
    keep = np.isfinite(steps) & np.isfinite(vals)
    order = np.argsort(steps[keep], kind="stable")
    return steps[keep][order], vals[keep][order]


def steps_to_fraction(
    curve: pd.DataFrame | Sequence[float] | np.ndarray,
    values: Sequence[float] | np.ndarray | None = None,
    fraction: float = 0.95,
) -> int | None:
    """First step whose validation Dice is ≥ ``fraction`` × the run's best.

    ``curve`` is a DataFrame with ``step`` and ``val_dice`` columns, or the steps with ``values``.
    None when there are no points or the best value is not positive (the run never learned).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    steps, vals = _curve_arrays(curve, values)
    if len(vals) == 0 or vals.max() <= 0:
        return None
    reached = np.flatnonzero(vals >= fraction * vals.max())
    return int(steps[reached[0]])


def normalised_auc(steps: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray) -> float:
    """Area under the validation curve with steps rescaled to [0, 1] (trapezoid rule).

    A single point has no extent to rescale; its value is returned (the limit of a flat curve).
    NaN for an empty curve.
    """
    s, v = _curve_arrays(steps, values)
    if len(v) == 0:
        return float("nan")
    if len(v) == 1 or s[-1] == s[0]:
        return float(v.mean())
    x = (s - s[0]) / (s[-1] - s[0])
    return float(trapezoid(v, x))


def convergence_table(curves: pd.DataFrame, fraction: float = 0.95, aggregate: bool = False) -> pd.DataFrame:
    """Per run: best validation Dice and its step, steps/epochs to ``fraction`` of the best, AUC.

    With ``aggregate=True`` the per-run rows are summarised per method × task × budget (see
    :func:`convergence_summary`).
    """
    per_run_columns = RUN_COLUMNS + [
        "n_points",
        "best_val_dice",
        "best_step",
        "steps_to_95",
        "epochs_to_95",
        "auc",
    ]
    rows = []
    if len(curves):
        keys = [c for c in RUN_COLUMNS if c in curves.columns]
        for key, run in curves.groupby(keys, dropna=False, sort=True):
            run = run.sort_values("step", kind="stable")
            run = run[np.isfinite(run["val_dice"].to_numpy(dtype=float))]
            row = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
            step = steps_to_fraction(run, fraction=fraction)
            epoch = None
            if step is not None and "epoch" in run.columns:
                epoch = float(run.loc[run["step"] == step, "epoch"].iloc[0])
            if len(run):
                best = run.loc[run["val_dice"].idxmax()]
                best_dice, best_step = float(best["val_dice"]), int(best["step"])
            else:
                best_dice, best_step = float("nan"), None
            row.update(
                n_points=len(run),
                best_val_dice=best_dice,
                best_step=best_step,
                steps_to_95=step,
                epochs_to_95=epoch,
                auc=normalised_auc(run["step"], run["val_dice"]),
            )
            rows.append(row)
    table = pd.DataFrame(rows, columns=per_run_columns)
    for column in ("best_step", "steps_to_95"):
        table[column] = table[column].astype("Int64")  # integers with missing values
    table["epochs_to_95"] = table["epochs_to_95"].astype(float)
    return convergence_summary(table) if aggregate else table


def convergence_summary(per_run: pd.DataFrame) -> pd.DataFrame:
    """Per method × task × budget: means and standard deviations over seeds.

    ``steps_to_95`` averages the runs that reached the threshold; ``n_converged`` says how many did.
    """
    columns = GROUP_COLUMNS + [
        "n_runs",
        "n_converged",
        "steps_to_95",
        "steps_to_95_std",
        "epochs_to_95",
        "auc",
        "auc_std",
        "best_val_dice",
    ]
    if per_run.empty:
        return pd.DataFrame(columns=columns)
    keys = [c for c in GROUP_COLUMNS if c in per_run.columns]
    steps = per_run["steps_to_95"].astype(float)
    frame = per_run.assign(_steps=steps, _converged=steps.notna())
    summary = (
        frame.groupby(keys, dropna=False, sort=True)
        .agg(
            n_runs=("run_id", "size") if "run_id" in frame.columns else ("_steps", "size"),
            n_converged=("_converged", "sum"),
            steps_to_95=("_steps", "mean"),
            steps_to_95_std=("_steps", "std"),
            epochs_to_95=("epochs_to_95", "mean"),
            auc=("auc", "mean"),
            auc_std=("auc", "std"),
            best_val_dice=("best_val_dice", "mean"),
        )
        .reset_index()
    )
    summary["n_converged"] = summary["n_converged"].astype(int)
    return summary.reindex(columns=[c for c in columns if c in summary.columns])
