"""Convergence measures on hand-made validation curves."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from medssl.analysis.convergence import convergence_summary, convergence_table, normalised_auc, steps_to_fraction

STEPS = [25, 50, 75, 100, 125]


def test_steps_to_fraction_on_a_monotone_curve():
    values = [0.2, 0.5, 0.8, 0.9, 1.0]
    assert steps_to_fraction(STEPS, values) == 125  # 0.9 < 0.95
    assert steps_to_fraction(STEPS, values, fraction=0.9) == 100
    assert steps_to_fraction(STEPS, values, fraction=0.5) == 50  # equality counts


def test_steps_to_fraction_on_a_plateau_and_a_noisy_curve():
    plateau = [0.3, 0.79, 0.8, 0.8, 0.8]
    assert steps_to_fraction(STEPS, plateau) == 50  # 0.79 ≥ 0.95·0.8 = 0.76
    noisy = [0.1, 0.7, 0.4, 0.72, 0.6]  # best 0.72, threshold 0.684: first reached at step 50
    assert steps_to_fraction(STEPS, noisy) == 50


def test_steps_to_fraction_sorts_steps_and_reads_dataframes():
    frame = pd.DataFrame({"step": [75, 25, 50], "val_dice": [0.9, 0.1, 0.88]})
    assert steps_to_fraction(frame) == 50
    assert steps_to_fraction([75, 25, 50], [0.9, 0.1, 0.88]) == 50


def test_steps_to_fraction_edge_cases():
    assert steps_to_fraction([40], [0.6]) == 40  # a single point is its own best
    assert steps_to_fraction(STEPS, [0.0] * 5) is None  # never learned
    assert steps_to_fraction([], []) is None
    assert steps_to_fraction([10, 20], [float("nan"), 0.5]) == 20
    with pytest.raises(ValueError):
        steps_to_fraction(STEPS, [0.1] * 5, fraction=0.0)
    with pytest.raises(ValueError):
        steps_to_fraction(STEPS, [0.1] * 4)


def test_normalised_auc_matches_hand_trapezoids():
    # Steps 0..100 rescaled to 0..1; linear ramp 0 -> 1 has area 1/2.
    assert normalised_auc([0, 50, 100], [0.0, 0.5, 1.0]) == pytest.approx(0.5)
    # Rescaling uses the logged range, so the step units do not matter.
    assert normalised_auc([25, 50, 75, 100, 125], [0.2, 0.5, 0.8, 0.9, 1.0]) == pytest.approx(
        np.mean([(0.2 + 0.5) / 2, (0.5 + 0.8) / 2, (0.8 + 0.9) / 2, (0.9 + 1.0) / 2])
    )
    # Irregular spacing: areas weighted by the interval widths.
    assert normalised_auc([0, 10, 100], [0.0, 1.0, 1.0]) == pytest.approx(0.1 * 0.5 + 0.9 * 1.0)
    assert normalised_auc(STEPS, [0.7] * 5) == pytest.approx(0.7)  # plateau
    assert normalised_auc(STEPS, [0.0] * 5) == 0.0
    assert normalised_auc([60], [0.4]) == pytest.approx(0.4)  # single point: its value
    assert math.isnan(normalised_auc([], []))
    # A curve that gets high earlier has a larger area, at the same final Dice.
    assert normalised_auc(STEPS, [0.8, 0.9, 0.9, 0.9, 0.9]) > normalised_auc(STEPS, [0.1, 0.2, 0.5, 0.8, 0.9])


def _curves() -> pd.DataFrame:
    rows = []

    def add(method, seed, values, budget="all", task="ct_organs"):
        run_id = f"ft-{method}-{task}-b{budget}-s{seed}"
        for i, (step, value) in enumerate(zip(STEPS, values, strict=True)):
            rows.append(
                {
                    "method": method,
                    "family": "mim" if method == "simmim" else "none",
                    "task": task,
                    "modality": "ct",
                    "budget": budget,
                    "n_train": 10,
                    "seed": seed,
                    "run_id": run_id,
                    "step": step,
                    "epoch": 0.5 * (i + 1),
                    "val_dice": value,
                }
            )

    add("simmim", 0, [0.5, 0.8, 0.9, 0.9, 0.9])
    add("simmim", 1, [0.3, 0.6, 0.85, 0.9, 0.92])
    add("none", 0, [0.0, 0.0, 0.0, 0.0, 0.0])
    add("none", 1, [0.1, 0.2, 0.3, 0.4, 0.6])
    return pd.DataFrame(rows)


def test_convergence_table_per_run():
    table = convergence_table(_curves())
    assert len(table) == 4
    by_run = table.set_index("run_id")
    first = by_run.loc["ft-simmim-ct_organs-ball-s0"]
    assert first["steps_to_95"] == 75 and first["epochs_to_95"] == pytest.approx(1.5)
    assert first["best_val_dice"] == pytest.approx(0.9) and first["best_step"] == 75
    assert first["auc"] == pytest.approx(normalised_auc(STEPS, [0.5, 0.8, 0.9, 0.9, 0.9]))
    flat = by_run.loc["ft-none-ct_organs-ball-s0"]
    assert pd.isna(flat["steps_to_95"]) and pd.isna(flat["epochs_to_95"]) and flat["auc"] == 0.0
    assert set(table.columns) >= {"method", "family", "task", "budget", "seed", "n_points"}


def test_convergence_summary_averages_seeds_and_counts_converged_runs():
    summary = convergence_table(_curves(), aggregate=True).set_index("method")
    assert summary.loc["simmim", "n_runs"] == 2 and summary.loc["simmim", "n_converged"] == 2
    assert summary.loc["simmim", "steps_to_95"] == pytest.approx((75 + 100) / 2)
    assert summary.loc["none", "n_converged"] == 1
    assert summary.loc["none", "steps_to_95"] == pytest.approx(125)  # only the run that learned
    assert summary.loc["simmim", "auc"] > summary.loc["none", "auc"]


def test_convergence_of_an_empty_table():
    empty = pd.DataFrame(
        columns=[
            "method",
            "family",
            "task",
            "modality",
            "budget",
            "n_train",
            "seed",
            "run_id",
            "step",
            "epoch",
            "val_dice",
        ]
    )
    assert convergence_table(empty).empty
    assert convergence_summary(convergence_table(empty)).empty
