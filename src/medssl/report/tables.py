"""Report tables: summaries of the tidy results table and their Markdown, HTML and LaTeX forms.

A ``Table`` holds display strings (already formatted) and an optional mask of cells to set in bold,
so the three renderings agree cell for cell. The builders here work on the DataFrames of
``medssl.results``; statistics come from ``medssl.analysis``.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from medssl.analysis.gap import budget_key, order_budgets
from medssl.analysis.stats import PairingUnit, bootstrap_ci, per_case_scores
from medssl.config import RANDOM_INIT

# The unit of the report's paired tests and CIs: one (test case, seed) evaluation. Each seed has its
# own split and trains its own model, so a case scored under two seeds is two evaluations.
PAIRING_UNIT: PairingUnit = "case_seed"
NOT_SIGNIFICANT_FROM_BEST = "†"
SIGNIFICANT_VS_RANDOM = "*"
MISSING = "–"


@dataclass
class Table:
    """Display strings plus the cells to emphasise; ``frame.index`` is shown as the first column."""

    frame: pd.DataFrame
    caption: str = ""
    bold: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)
    index_name: str | None = None
    show_index: bool = True

    def is_bold(self, row: int, col: int) -> bool:
        return bool(self.bold is not None and self.bold.iat[row, col])


# --------------------------------------------------------------------------- formatting


def fmt(value: Any, digits: int = 3, scientific: bool = True) -> str:
    """A number for a table cell: fixed digits, a dash for missing values; tiny or huge magnitudes in
    scientific notation unless ``scientific`` is False (differences, where "0.000" is the message)."""
    if value is None:
        return MISSING
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(number):
        return MISSING
    if number != 0 and (abs(number) < 10**-digits or abs(number) >= 1e6):
        return f"{number:.2e}"
    return f"{number:.{digits}f}"


def fmt_p(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    value = float(value)
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def display_method(name: str) -> str:
    return "random init" if name == RANDOM_INIT else str(name)


def largest_budget(results: pd.DataFrame, task: str | None = None) -> str | None:
    frame = results if task is None else results[results["task"] == task]
    budgets = order_budgets(frame["budget"].dropna())
    return budgets[-1] if budgets else None


def at_largest_budget(results: pd.DataFrame) -> pd.DataFrame:
    """Rows at each task's largest label budget ("all" when present)."""
    if results.empty:
        return results
    largest = {task: largest_budget(results, task) for task in results["task"].unique()}
    return results[results["budget"] == results["task"].map(largest)]


def task_means(results: pd.DataFrame) -> pd.DataFrame:
    """Method × task mean test Dice at each task's largest budget: the mean over (test case, seed)
    pairs of each pair's mean over structures, as the leaderboard shows it."""
    units = per_case_scores(at_largest_budget(results), unit=PAIRING_UNIT)
    return units.groupby(["method", "task"])["score"].mean().unstack("task")


def method_order(results: pd.DataFrame) -> list[str]:
    """Methods best first, by the leaderboard's mean: over tasks of :func:`task_means` (each task weighs
    the same). Methods with every task come first; one missing a task follows, by its mean over the
    tasks it has. The order of every table."""
    if results.empty:
        return []
    means = task_means(results)
    complete = means.notna().all(axis=1)
    key = pd.DataFrame({"complete": complete, "mean": means.mean(axis=1, skipna=True)})
    key = key.sort_values(["complete", "mean"], ascending=[False, False], kind="stable")
    return list(key.index)


# --------------------------------------------------------------------------- renderers


_INLINE_CODE = re.compile(r"`([^`]+)`")


def inline_html(text: object) -> str:
    """Escaped text for HTML with Markdown's inline code (```medssl bench```) as ``<code>``: the page
    never shows a literal backtick."""
    escaped = html.escape(str(text))
    return _INLINE_CODE.sub(r"<code>\1</code>", escaped).replace("`", "")


def plain_text(text: object) -> str:
    """The text without Markdown's inline-code backticks (image alt texts, figure files)."""
    return str(text).replace("`", "")


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _header(table: Table) -> list[str]:
    columns = [str(c) for c in table.frame.columns]
    return [table.index_name or table.frame.index.name or "", *columns] if table.show_index else columns


def markdown_table(table: Table) -> str:
    frame = table.frame
    header = _header(table)
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    for r, (index, row) in enumerate(frame.iterrows()):
        cells = [_md_cell(index)] if table.show_index else []
        for c, value in enumerate(row):
            text = _md_cell(value)
            cells.append(f"**{text}**" if table.is_bold(r, c) and text != MISSING else text)
        lines.append("| " + " | ".join(cells) + " |")
    out = []
    if table.caption:
        out.append(f"*{table.caption}*\n")
    out.append("\n".join(lines))
    out.extend(f"\n{note}" for note in table.notes)
    return "\n".join(out) + "\n"


def html_table(table: Table) -> str:
    frame = table.frame
    header = _header(table)
    parts = ["<table>"]
    if table.caption:
        parts.append(f"<caption>{inline_html(table.caption)}</caption>")
    parts.append("<thead><tr>" + "".join(f"<th>{inline_html(h)}</th>" for h in header) + "</tr></thead><tbody>")
    for r, (index, row) in enumerate(frame.iterrows()):
        cells = [f'<th scope="row">{inline_html(index)}</th>'] if table.show_index else []
        for c, value in enumerate(row):
            text = inline_html(value)
            cells.append(f"<td><b>{text}</b></td>" if table.is_bold(r, c) else f"<td>{text}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table>")
    parts.extend(f'<p class="note">{inline_html(note)}</p>' for note in table.notes)
    return "\n".join(parts)


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "–": "--",
    "†": r"$^{\dagger}$",
    "*": r"$^{*}$",
    "±": r"$\pm$",
    "<": r"$<$",
    ">": r"$>$",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def latex_table(table: Table, label: str = "") -> str:
    """A booktabs table (pandas ``to_latex``) with bold cells as ``\\textbf``."""
    frame = table.frame.copy()
    for r in range(frame.shape[0]):
        for c in range(frame.shape[1]):
            text = latex_escape(frame.iat[r, c])
            frame.iat[r, c] = rf"\textbf{{{text}}}" if table.is_bold(r, c) and text != "--" else text
    frame.columns = [latex_escape(c) for c in frame.columns]
    if table.show_index:
        # The row labels as an ordinary first column: one header row, not pandas' two.
        frame.insert(
            0, latex_escape(table.index_name or table.frame.index.name or ""), [latex_escape(i) for i in frame.index]
        )
    return frame.to_latex(
        escape=False,
        index=False,
        caption=latex_escape(table.caption) if table.caption else None,
        label=label or None,
        column_format="l" + "c" * (frame.shape[1] - 1),
        position="t",
    )


# --------------------------------------------------------------------------- builders


def _best_mask(values: pd.DataFrame, higher_is_better: bool = True) -> pd.DataFrame:
    """True at each column's best value (ties all bold; NaN never)."""
    best = values.max() if higher_is_better else values.min()
    return values.eq(best, axis=1) & values.notna()


def _wilcoxon_lookup(wilcoxon: pd.DataFrame | None, task: str, budget: str) -> dict[tuple[str, str], bool]:
    """(method, "reference" | "best") → significant, for one task and budget."""
    if wilcoxon is None or wilcoxon.empty:
        return {}
    rows = wilcoxon[(wilcoxon["task"] == task) & (wilcoxon["budget"].astype(str) == str(budget))]
    return {(row.method, str(row.comparison)): bool(row.significant) for row in rows.itertuples()}


def _mean_ci_cells(
    units: pd.DataFrame, column: str, methods: list[str], columns: list[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Method × ``column`` means of the unit scores and their "mean [bootstrap 95% CI]" display cells."""
    means = pd.DataFrame(np.nan, index=methods, columns=columns)
    cells = pd.DataFrame(MISSING, index=methods, columns=columns)
    for (method, key), group in units.groupby(["method", column]):
        mean, lo, hi = bootstrap_ci(group["score"].to_numpy(dtype=float))
        means.loc[method, key] = mean
        cells.loc[method, key] = f"{fmt(mean)} [{fmt(lo)}, {fmt(hi)}]"
    return means, cells


def leaderboard(results: pd.DataFrame, wilcoxon: pd.DataFrame | None = None) -> tuple[Table, pd.DataFrame]:
    """Method × task mean Dice [95% CI] at each task's largest budget, with significance marks.

    Returns the display table and the numeric means (method × task). The CI is a bootstrap over the
    (test case, seed) Dice (mean over structures), the unit the Wilcoxon test pairs.
    """
    top = at_largest_budget(results)
    cases = per_case_scores(top, unit=PAIRING_UNIT)
    tasks = sorted(cases["task"].unique())
    means, cells = _mean_ci_cells(cases, "task", method_order(results), tasks)
    for task in tasks:
        column = means[task].dropna()
        if column.empty:
            continue
        best = column.idxmax()
        budget = largest_budget(results, task)
        significance = _wilcoxon_lookup(wilcoxon, task, budget) if budget is not None else {}
        for method in column.index:
            marks = ""
            if method != RANDOM_INIT and significance.get((method, "reference")):
                marks += SIGNIFICANT_VS_RANDOM
            if method != best and (method, "best") in significance and not significance[(method, "best")]:
                marks += NOT_SIGNIFICANT_FROM_BEST
            cells.loc[method, task] += marks
    if len(tasks) > 1:
        # Over tasks only where a method has every task, so a missing task does not flatter it.
        means["mean"] = means[tasks].mean(axis=1, skipna=False)
        cells["mean"] = means["mean"].map(fmt)
    budgets = {task: largest_budget(results, task) for task in tasks}
    column_labels = {task: f"{task} ({budgets[task]})" for task in tasks}
    display = cells.rename(columns=column_labels, index=display_method)
    bold = _best_mask(means).rename(columns=column_labels, index=display_method)
    table = Table(
        display,
        caption=(
            "Mean test Dice [bootstrap 95% CI over (test case, seed) pairs] at each task's largest label "
            "budget (in brackets)."
        ),
        bold=bold,
        index_name="method",
        notes=[
            f"Bold: best per column. {SIGNIFICANT_VS_RANDOM} significantly different from random init "
            "(paired Wilcoxon over (test case, seed) pairs, Holm-corrected, p < 0.05); "
            f"{NOT_SIGNIFICANT_FROM_BEST} not significantly different from the best method of the column."
        ],
    )
    return table, means


# Rows that are references rather than pretext families, shown after them in this order: encoders pretrained
# with labels (an external_encoders entry with ``family: supervised``, the transfer study's supervised control),
# other published encoders, and random initialisation.
REFERENCE_FAMILIES = ("supervised", "external", "none")


def family_summary(results: pd.DataFrame) -> Table:
    """Per pretext family: mean Dice per task at the largest budget (mean of its methods) and its best;
    the reference families (``REFERENCE_FAMILIES``) follow the pretext families."""
    top = at_largest_budget(results)
    per_method = top.groupby(["family", "method", "task"])["dice"].mean().reset_index()
    per_family = per_method.groupby(["family", "task"])["dice"].mean().unstack("task")
    overall = per_method.groupby(["family", "method"])["dice"].mean().reset_index()
    frame = per_family.copy()
    if per_family.shape[1] > 1:
        frame["mean"] = per_family.mean(axis=1, skipna=False)
    frame = frame.sort_values(frame.columns[-1], ascending=False)
    references = [f for f in REFERENCE_FAMILIES if f in frame.index]
    frame = frame.reindex([f for f in frame.index if f not in references] + references)
    display = frame.map(fmt)
    display["methods"] = [
        ", ".join(display_method(m) for m in overall[overall["family"] == fam]["method"]) for fam in frame.index
    ]
    display["best method"] = [
        display_method(overall[overall["family"] == fam].sort_values("dice").iloc[-1]["method"]) for fam in frame.index
    ]
    bold = pd.concat(
        [_best_mask(frame), pd.DataFrame(False, index=frame.index, columns=["methods", "best method"])], axis=1
    )
    return Table(
        display,
        caption="Mean test Dice per pretext family (mean of its methods) at the largest budget; "
        + (
            f"{', '.join(references)}: reference rows after the pretext families."
            if references
            else "no reference rows."
        ),
        bold=bold,
        index_name="family",
    )


def budget_summary(results: pd.DataFrame) -> pd.DataFrame:
    """Per task × method × budget: mean Dice over cases, structures and seeds, and mean ``n_train``."""
    grouped = results.groupby(["task", "method", "budget"])
    summary = grouped.agg(dice=("dice", "mean"), n_train=("n_train", "mean")).reset_index()
    summary["budget_order"] = summary["budget"].map(budget_key)
    return summary.sort_values(["task", "method", "budget_order"]).drop(columns="budget_order")


def budget_table(results: pd.DataFrame, wilcoxon: pd.DataFrame | None = None) -> Table:
    """Method × (task, budget) mean Dice [bootstrap 95% CI over (case, seed) pairs], with the
    leaderboard's significance marks at every budget (few-shot included)."""
    units = per_case_scores(results, unit=PAIRING_UNIT)
    units["column"] = units["task"] + " / " + units["budget"].astype(str)
    order = (
        units.assign(k=units["budget"].map(budget_key)).sort_values(["task", "k"])["column"].drop_duplicates().tolist()
    )
    methods = [m for m in method_order(results) if m in set(units["method"])]
    means, cells = _mean_ci_cells(units, "column", methods, order)
    for column in order:
        task, budget = column.rsplit(" / ", 1)
        significance = _wilcoxon_lookup(wilcoxon, task, budget)
        for method in means[column].dropna().index:
            if method != RANDOM_INIT and significance.get((method, "reference")):
                cells.loc[method, column] += SIGNIFICANT_VS_RANDOM
    return Table(
        cells.rename(index=display_method),
        caption="Mean test Dice per task / label budget [bootstrap 95% CI over (test case, seed) pairs].",
        bold=_best_mask(means).rename(index=display_method),
        index_name="method",
        notes=[
            f"{SIGNIFICANT_VS_RANDOM} significantly different from random init at that budget (paired Wilcoxon "
            "over (test case, seed) pairs, Holm-corrected, p < 0.05; see Statistics)."
        ],
    )


def gap_table(gaps: pd.DataFrame, ranks: pd.DataFrame) -> Table:
    """Method × task: mean few-/many-shot gap over seeds with its rank per task, and the mean rank.

    ``gaps`` and ``ranks`` come from ``medssl.analysis.gap.few_many_gap`` / ``gap_ranks``.
    """
    labels = [
        f"{fmt(g, scientific=False)} ({r:g})" if r == r else f"{fmt(g, scientific=False)} (not ranked)"
        for g, r in zip(ranks["gap"], ranks["rank"], strict=True)
    ]
    cells = ranks.assign(cell=labels)
    display = cells.pivot(index="method", columns="task", values="cell").fillna(MISSING)
    best = cells.pivot(index="method", columns="task", values="rank").eq(1.0)
    mean_rank = ranks.groupby("method")["mean_rank"].first()
    display["mean rank"] = mean_rank.map(lambda r: f"{r:.2f}" if r == r else MISSING)
    best["mean rank"] = mean_rank.eq(mean_rank.min())
    order = list(mean_rank.sort_values(kind="stable", na_position="last").index)
    pairs = gaps.drop_duplicates("task").set_index("task")
    budgets = "; ".join(
        f"{t}: {pairs.loc[t, 'many_budget']} (n={pairs.loc[t, 'many_n_train']}) − "
        f"{pairs.loc[t, 'few_budget']} (n={pairs.loc[t, 'few_n_train']})"
        for t in sorted(pairs.index)
    )
    return Table(
        display.reindex(order).rename(index=display_method),
        caption="Few-/many-shot gap: Dice at the largest budget minus Dice at the smallest (mean over seeds), "
        "with its rank per task (1 = smallest positive gap = most data-efficient).",
        bold=best.reindex(order).fillna(False).rename(index=display_method),
        index_name="method",
        notes=[
            f"Budgets compared — {budgets}.",
            "A gap ≤ 0 (the smallest budget scored at least as well as the largest) is not ranked: where the "
            "task was learned it is noise of short or unconverged runs, not data efficiency, and where it was "
            "not there is nothing to be efficient about. The mean rank is over the tasks where a method was "
            "ranked.",
        ],
    )


def convergence_overview(summary: pd.DataFrame, order: list[str]) -> tuple[Table, str] | None:
    """The convergence table in brief: method × task at each task's largest budget, AUC of the validation
    curve with the steps to 95% of the best in brackets; and which method converged best per task.

    ``summary`` is ``medssl.analysis.convergence.convergence_table(curves, aggregate=True)``; the full
    table (every budget) goes below it, collapsed."""
    if summary.empty:
        return None
    largest = {task: max(group["budget"].astype(str), key=budget_key) for task, group in summary.groupby("task")}
    top = summary[summary["budget"].astype(str) == summary["task"].map(largest)]
    auc = top.pivot_table(index="method", columns="task", values="auc", aggfunc="mean")
    steps = top.pivot_table(index="method", columns="task", values="steps_to_95", aggfunc="mean")
    methods = [m for m in order if m in auc.index] + [m for m in auc.index if m not in order]
    auc, steps = auc.reindex(methods), steps.reindex(index=methods, columns=auc.columns)
    cells = pd.DataFrame(MISSING, index=methods, columns=auc.columns)
    for method in methods:
        for task in auc.columns:
            value, step = auc.loc[method, task], steps.loc[method, task]
            if value == value:
                cells.loc[method, task] = f"{fmt(value)} ({int(round(step))})" if step == step else f"{fmt(value)} (–)"
    labels = {task: f"{task} ({largest[task]})" for task in auc.columns}
    table = Table(
        cells.rename(columns=labels, index=display_method),
        caption="Convergence at each task's largest budget (in brackets after the task): AUC of the validation "
        "Dice curve over steps scaled to [0, 1] (time-averaged Dice: higher = faster and better), and in "
        "brackets the steps until validation Dice first reached 95% of the run's best (mean over seeds; – where "
        "no run got there).",
        bold=_best_mask(auc).rename(columns=labels, index=display_method),
        index_name="method",
    )
    best = [
        f"{task}: {display_method(str(auc[task].idxmax()))} (AUC {fmt(auc[task].max())})"
        for task in auc.columns
        if auc[task].notna().any()
    ]
    return table, "Fastest to a good validation Dice (highest AUC) per task — " + "; ".join(best) + "."


def structure_tables(results: pd.DataFrame) -> dict[str, Table]:
    """Per task: method × structure mean Dice at the largest budget."""
    tables = {}
    top = at_largest_budget(results)
    for task, group in top.groupby("task"):
        values = group.groupby(["method", "structure"])["dice"].mean().unstack("structure")
        values = values.reindex([m for m in method_order(results) if m in values.index])
        budget = largest_budget(results, task)
        tables[task] = Table(
            values.map(fmt).rename(index=display_method),
            caption=f"{task}: mean test Dice per structure (budget {budget}).",
            bold=_best_mask(values).rename(index=display_method),
            index_name="method",
        )
    return tables


def lesion_tables(lesions: pd.DataFrame, results: pd.DataFrame) -> dict[str, Table]:
    """Per lesion task: method × lesion structure, mean lesion-wise recall, precision and F1 over test cases
    at the largest budget (undefined values left out: n counts the cases each mean covers) and the summed
    true positive / false positive / false negative lesions (``lesion_table``, medssl.evaluate.lesions)."""
    tables: dict[str, Table] = {}
    if lesions.empty:
        return tables
    top = at_largest_budget(lesions)
    for task, group in top.groupby("task"):
        cells: dict[str, dict[str, str]] = {}
        for (method, structure), rows in group.groupby(["method", "structure"]):
            cell = {}
            for rate in ("lesion_recall", "lesion_precision", "lesion_f1"):
                defined = rows[rate].dropna()
                short = rate.removeprefix("lesion_")
                cell[f"{structure} {short}"] = f"{fmt(defined.mean())} (n={len(defined)})" if len(defined) else MISSING
            counts = [int(rows[c].sum()) for c in ("lesion_tp", "lesion_fp", "lesion_fn")]
            cell[f"{structure} TP/FP/FN"] = "/".join(str(c) for c in counts)
            cells[method] = {**cells.get(method, {}), **cell}
        frame = pd.DataFrame.from_dict(cells, orient="index")
        order = [m for m in method_order(results) if m in frame.index] + [
            m for m in frame.index if m not in method_order(results)
        ]
        tables[task] = Table(
            frame.reindex(order).fillna(MISSING).rename(index=display_method),
            caption=f"{task}: lesion-wise detection at budget {largest_budget(lesions, task)} (a true lesion is found "
            "when a predicted one overlaps it enough; recall is undefined for a case with no true lesion, "
            "precision for one with no predicted lesion, and such cases are left out of the mean: n cases).",
            index_name="method",
        )
    return tables


def metric_summary(results: pd.DataFrame) -> Table:
    """Method × task: Dice, HD95 (mm) and NSD at the largest budget."""
    top = at_largest_budget(results)
    agg = top.groupby(["method", "task"]).agg(dice=("dice", "mean"), hd95=("hd95", "mean"), nsd=("nsd", "mean"))
    agg = agg.unstack("task")
    agg.columns = [f"{task} {metric.upper() if metric != 'dice' else 'Dice'}" for metric, task in agg.columns]
    agg = agg[
        sorted(agg.columns, key=lambda c: (c.rsplit(" ", 1)[0], ["Dice", "HD95", "NSD"].index(c.rsplit(" ", 1)[1])))
    ]
    agg = agg.reindex([m for m in method_order(results) if m in agg.index])
    bold = pd.DataFrame(False, index=agg.index, columns=agg.columns)
    for col in agg.columns:
        bold[col] = _best_mask(agg[[col]], higher_is_better=not col.endswith("HD95"))[col]
    return Table(
        agg.map(fmt).rename(index=display_method),
        caption="Mean Dice, HD95 (mm, lower is better) and NSD at the largest budget; HD95/NSD skip cases "
        "where the structure is missing in prediction or truth.",
        bold=bold.rename(index=display_method),
        index_name="method",
    )


def _is_missing(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # lists, arrays: present
        return False


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


_DIFFERENCE_COLUMN = re.compile(r"minus|diff|gap|delta")
_COUNT_COLUMN = re.compile(r"(^|_| )(n|n_train|seed|seeds|runs|steps?|cases|budget|best_step)($|_| )")


def _column_formatter(values: pd.Series, name: str, digits: int) -> Callable[[Any], str]:
    """Counts and steps print as integers (even when a missing value made the column float)."""
    present = [v for v in values if not _is_missing(v)]
    integral = bool(present) and all(_is_number(v) and float(v).is_integer() for v in present)
    if integral and (pd.api.types.is_integer_dtype(values) or _COUNT_COLUMN.search(str(name).lower())):
        return lambda v: MISSING if _is_missing(v) else str(int(v))
    scientific = not _DIFFERENCE_COLUMN.search(str(name).lower())
    return lambda v: MISSING if _is_missing(v) else fmt(v, digits, scientific)


def frame_table(frame: pd.DataFrame, caption: str = "", index: str | None = None, digits: int = 3) -> Table:
    """Any DataFrame as a Table: numbers formatted per column (integers stay integers); the ``index``
    column, when named, becomes the row labels."""
    frame = frame.copy()
    if "method" in frame.columns:
        frame["method"] = frame["method"].map(display_method)
    if index is not None:
        frame = frame.set_index(index)
    display = pd.DataFrame(
        {col: frame[col].map(_column_formatter(frame[col], col, digits)) for col in frame.columns}, index=frame.index
    )
    return Table(display, caption=caption, index_name=index, show_index=index is not None)


COST_COLUMNS = [
    "method",
    "family",
    "pretrain_runs",
    "steps",
    "flops_per_step",
    "total_flops",
    "wall_seconds",
    "device_hours",
    "peak_memory_gib",
    "peak_memory_kind",
    "mean_dice",
    "n_task_budgets",
]


def cost_summary(results: pd.DataFrame, pretrain: pd.DataFrame) -> pd.DataFrame:
    """Per method: measured pretraining cost (mean over its pretraining runs) beside its mean test Dice
    over every task × budget it was fine-tuned on (each task × budget weighs the same). Random init
    costs no pretraining (0 FLOPs); an encoder pretrained elsewhere has no measured cost (NaN)."""
    dice = pd.DataFrame(columns=["method", "family", "mean_dice", "n_task_budgets"])
    if not results.empty:
        per_cell = results.groupby(["method", "family", "task", "budget"], dropna=False)["dice"].mean().reset_index()
        dice = (
            per_cell.groupby(["method", "family"], dropna=False)
            .agg(mean_dice=("dice", "mean"), n_task_budgets=("dice", "size"))
            .reset_index()
        )
    cost = pd.DataFrame(columns=["method", "family"])
    if not pretrain.empty:
        cost = (
            pretrain.groupby(["method", "family"], dropna=False)
            .agg(
                pretrain_runs=("run_id", "size"),
                steps=("steps", "mean"),
                flops_per_step=("flops_per_step", "mean"),
                total_flops=("total_flops", "mean"),
                wall_seconds=("wall_seconds", "mean"),
                device_hours=("device_hours", "mean"),
                peak_memory_bytes=("peak_memory_bytes", "max"),
                peak_memory_kind=("peak_memory_kind", "first"),
            )
            .reset_index()
        )
        cost["peak_memory_gib"] = cost.pop("peak_memory_bytes") / 2**30
    frame = dice.merge(cost, on=["method", "family"], how="outer")
    frame = frame.reindex(columns=COST_COLUMNS)
    random_init = frame["method"] == RANDOM_INIT
    for column in ("flops_per_step", "total_flops", "device_hours"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
        frame.loc[random_init & frame[column].isna(), column] = 0.0
    frame["pretrain_runs"] = pd.to_numeric(frame["pretrain_runs"], errors="coerce").fillna(0).astype(int)
    return frame.sort_values("mean_dice", ascending=False, kind="stable", ignore_index=True)
