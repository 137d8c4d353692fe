"""The findings in words: one headline per task (the best pretrained encoder against random init, with
the CI of the difference and whether it is significant), the null result, and which paired tests
could not have been significant whatever the data.

Everything here reads the tidy results table and the paired Wilcoxon table
(``medssl.analysis.stats.paired_wilcoxon``) the other sections use; it computes no test of its own
besides the bootstrap CI of the paired difference.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from medssl.analysis.stats import MIN_PAIRS_FOR_SIGNIFICANCE, bootstrap_ci, per_case_scores, smallest_holm_p
from medssl.report.tables import PAIRING_UNIT, RANDOM_INIT, display_method, fmt, fmt_p, largest_budget

ALPHA = 0.05


def _signed(value: float) -> str:
    return f"{value:+.3f}".replace("-", "−")


def _family_size(wilcoxon: pd.DataFrame, task: str, budget: str, comparison: str) -> int:
    rows = wilcoxon[
        (wilcoxon["task"] == task) & (wilcoxon["budget"].astype(str) == budget) & (wilcoxon["comparison"] == comparison)
    ]
    return int(rows["p"].notna().sum())


def task_headline(results: pd.DataFrame, wilcoxon: pd.DataFrame | None, task: str) -> str:
    """One sentence for ``task`` at its largest budget: the best pretrained encoder against random init."""
    budget = str(largest_budget(results, task))
    rows = results[(results["task"] == task) & (results["budget"].astype(str) == budget)]
    units = per_case_scores(rows, unit=PAIRING_UNIT)
    wide = units.pivot_table(index="case", columns="method", values="score", aggfunc="mean")
    means = wide.mean(axis=0).dropna()
    where = f"{task} (budget {budget})"
    pretrained = means.drop(RANDOM_INIT, errors="ignore")
    if pretrained.empty:
        return f"{where}: only random init was fine-tuned; no pretrained encoder to compare."
    best = str(pretrained.idxmax())
    if RANDOM_INIT not in means.index:
        return (
            f"{where}: the best encoder, {display_method(best)}, scores {fmt(means[best])} mean test Dice; "
            "there are no random-init runs to compare it with."
        )
    pair = wide[[best, RANDOM_INIT]].dropna()
    differences = (pair[best] - pair[RANDOM_INIT]).to_numpy(dtype=float)
    n = len(differences)
    mean_diff, lo, hi = bootstrap_ci(differences)
    lead = (
        f"the best pretrained encoder, {display_method(best)},"
        if means[best] >= means[RANDOM_INIT]
        else f"no pretrained encoder beats random init; the best, {display_method(best)},"
    )
    text = (
        f"{where}: {lead} scores {fmt(means[best])} mean test Dice against {fmt(means[RANDOM_INIT])} for random "
        f"init, a paired difference of {_signed(mean_diff)} [95% CI {_signed(lo)}, {_signed(hi)}] over {n} "
        "(test case, seed) pairs"
    )
    test = None
    if wilcoxon is not None and not wilcoxon.empty:
        match = wilcoxon[
            (wilcoxon["task"] == task)
            & (wilcoxon["budget"].astype(str) == budget)
            & (wilcoxon["comparison"] == "reference")
            & (wilcoxon["method"] == best)
        ]
        test = match.iloc[0] if not match.empty else None
    if test is None or not math.isfinite(float(test["p_holm"])):
        return text + "; no paired test (no pairs in common)."
    p_holm = fmt_p(test["p_holm"])
    if bool(test["significant"]):
        direction = "better" if mean_diff > 0 else "worse"
        return text + f": significantly {direction} than random init (paired Wilcoxon, Holm-corrected p = {p_holm})."
    text += f": not a significant difference (paired Wilcoxon, Holm-corrected p = {p_holm})"
    assert wilcoxon is not None  # a test was found in it
    tests = _family_size(wilcoxon, task, budget, "reference")
    floor = smallest_holm_p(n, tests)
    if floor >= ALPHA:
        text += (
            f"; with {n} pairs and {tests} tests against random init no encoder could have reached p < 0.05 "
            f"here (the smallest possible Holm-corrected p is {fmt_p(floor)})"
        )
    return text + "."


def null_result(wilcoxon: pd.DataFrame | None) -> str | None:
    """The result against random init in words: which encoders differ significantly, or that none does."""
    if wilcoxon is None or wilcoxon.empty:
        return None
    reference = wilcoxon[(wilcoxon["comparison"] == "reference") & wilcoxon["p"].notna()]
    if reference.empty:
        return None
    significant = reference[reference["significant"].astype(bool)]
    if significant.empty:
        return (
            f"No encoder differs significantly from random init on any task at any budget: every one of the "
            f"{len(reference)} paired Wilcoxon tests against random init has a Holm-corrected p ≥ 0.05 "
            "(a null result: these runs show no effect of pretraining, which is not evidence that there is none)."
        )
    parts = [
        f"{display_method(r.method)} on {r.task} (budget {r.budget}, {'better' if r.mean_diff > 0 else 'worse'}, "
        f"p = {fmt_p(r.p_holm)})"
        for r in significant.itertuples()
    ]
    return (
        f"{len(significant)} of {len(reference)} paired tests against random init are significant "
        f"(Holm-corrected p < 0.05): " + "; ".join(parts) + ". The others show no significant difference."
    )


def untestable(wilcoxon: pd.DataFrame | None) -> str | None:
    """A sentence when some paired tests could not reach significance whatever the data (too few pairs
    for the number of tests Holm corrects for); None when every test could have."""
    if wilcoxon is None or wilcoxon.empty:
        return None
    tested = wilcoxon[wilcoxon["p"].notna()]
    if tested.empty:
        return None
    floors = floor_p_holm(tested)
    blocked = tested[floors >= ALPHA]
    if blocked.empty:
        return None
    few = int((blocked["n"] < MIN_PAIRS_FOR_SIGNIFICANCE).sum())
    ns = sorted({int(n) for n in blocked["n"]})
    shown = ", ".join(str(n) for n in ns[:6]) + ("…" if len(ns) > 6 else "")
    return (
        f"{len(blocked)} of {len(tested)} paired tests cannot reach significance whatever the data "
        f"(pairs per test: {shown}). With n pairs the smallest two-sided Wilcoxon p is 2/2^n — 0.25 at n = 3, "
        f"0.0625 at n = 5 — so a test on fewer than {MIN_PAIRS_FOR_SIGNIFICANCE} pairs never reaches p < 0.05 "
        f"({few} tests here); and Holm multiplies the smallest p of a family by its number of tests, which "
        "raises the pairs needed (e.g. 9 tests need n ≥ 9). More test cases or seeds would lift this floor."
    )


def floor_p_holm(wilcoxon: pd.DataFrame) -> pd.Series:
    """Per row of a Wilcoxon table: the smallest Holm-corrected p its test could have given."""
    sizes = wilcoxon.groupby(["task", "budget", "comparison"])["p"].transform(lambda p: p.notna().sum())
    return pd.Series(
        [smallest_holm_p(int(n), int(m)) for n, m in zip(wilcoxon["n"], sizes, strict=True)],
        index=wilcoxon.index,
        dtype=np.float64,
    )


def headlines(results: pd.DataFrame, wilcoxon: pd.DataFrame | None) -> list[str]:
    """A headline per task (in name order), then the null result or the significant differences."""
    if results.empty:
        return []
    lines = [task_headline(results, wilcoxon, str(task)) for task in sorted(results["task"].unique())]
    verdict = null_result(wilcoxon)
    if verdict:
        lines.append(verdict)
    return lines
