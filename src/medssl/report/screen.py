"""Values read from run directories are checked before anything is ranked.

A run directory is a file on disk: copied between machines, edited, or written by another version.
A fine-tuning run whose results hold an impossible value (a Dice of 5.0 or NaN, a negative HD95) is
left out of every table, figure and test, and the report names it with the first such value, so a
corrupt run can never lead a ranking. What a possible value is follows the metrics' own definitions
(``medssl.evaluate.metrics``): Dice and NSD in [0, 1]; HD95 a distance >= 0 in mm; HD95 and NSD may be
absent (a structure not predicted), Dice never is.
"""

from __future__ import annotations

import math
from typing import Any

from medssl.results import FinishedRun, RunCollection

CASE_METRICS = {  # name -> (lowest, highest, may be absent)
    "dice": (0.0, 1.0, False),
    "hd95": (0.0, math.inf, True),
    "nsd": (0.0, 1.0, True),
}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _check_value(name: str, value: Any, lowest: float, highest: float, optional: bool) -> str | None:
    """Why ``value`` is impossible for the metric ``name``; None when it is possible."""
    if value is None:
        return None if optional else f"{name} is missing"
    number = _number(value)
    if number is None:
        return f"{name} {value!r} is not a number"
    if not math.isfinite(number):
        return f"{name} {number} is not finite"
    if not lowest <= number <= highest:
        allowed = f">= {lowest:g}" if highest == math.inf else f"in [{lowest:g}, {highest:g}]"
        return f"{name} {number:g} is not {allowed}"
    return None


def impossible_value(run: FinishedRun) -> str | None:
    """The first impossible value in a finished fine-tuning run's results, as a phrase; None if all fit."""
    cases = run.results.get("cases")
    if cases is None:
        return None
    if not isinstance(cases, list):
        return "results.json 'cases' is not a list"
    for index, case in enumerate(cases):
        if not isinstance(case, dict):
            return f"results.json cases[{index}] is not an object"
        for name, (lowest, highest, optional) in CASE_METRICS.items():
            problem = _check_value(name, case.get(name), lowest, highest, optional)
            if problem is not None:
                return (
                    f"{problem} (case {case.get('case')!s}, structure {case.get('structure') or case.get('label')!s})"
                )
    for point in run.results.get("val_curve") or []:
        if isinstance(point, dict):
            problem = _check_value("validation Dice", point.get("val_dice"), 0.0, 1.0, True)
            if problem is not None:
                return f"{problem} (validation at step {point.get('step')!s})"
    return None


def screen_runs(collection: RunCollection) -> list[tuple[str, str]]:
    """Leave fine-tuning runs with an impossible value out of ``collection`` (in place); each one is
    added to ``collection.skipped`` and returned as ``(run id, reason)``."""
    kept, excluded = [], []
    for run in collection.finetune:
        problem = impossible_value(run)
        if problem is None:
            kept.append(run)
        else:
            excluded.append((run.run_id, f"impossible value, not ranked: {problem}"))
    collection.runs["finetune"] = kept
    collection.skipped.extend(excluded)
    return excluded
