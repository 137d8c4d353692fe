"""``build_report(runs_root, out_dir)``: run directories → tables, figures, report.md and index.html.

Built from run directories alone (never a model). Every section checks what it needs and says what
is missing (one method, one budget, no MRI task, no pretraining runs, no CKA runs) instead of
failing; a section that still fails on unexpected data shows the error in its place so the rest of
the report is written.
"""

from __future__ import annotations

import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from medssl.analysis.convergence import convergence_table
from medssl.analysis.gap import budget_key, few_many_gap, gap_ranks, modality_summary, order_budgets
from medssl.analysis.stats import critical_difference_plot, friedman_ranks, paired_wilcoxon
from medssl.fileio import atomic_write_text, file_lock, to_json
from medssl.report import plots
from medssl.report.headline import floor_p_holm, headlines, null_result, untestable
from medssl.report.html import (
    Alert,
    Block,
    Details,
    Heading,
    Headlines,
    Image,
    Missing,
    Paragraph,
    Section,
    render_html,
    render_markdown,
)
from medssl.report.output import LOCK_NAME, ReportFolder
from medssl.report.screen import screen_runs
from medssl.report.tables import (
    PAIRING_UNIT,
    RANDOM_INIT,
    at_largest_budget,
    budget_summary,
    budget_table,
    convergence_overview,
    cost_summary,
    display_method,
    family_summary,
    fmt,
    fmt_p,
    frame_table,
    gap_table,
    latex_table,
    leaderboard,
    lesion_tables,
    method_order,
    metric_summary,
    structure_tables,
)
from medssl.report.transfer import section_controls, section_probe
from medssl.results import (
    RunCollection,
    cka_runs,
    collect_runs,
    curves_table,
    lesion_table,
    pretrain_curves,
    pretrain_table,
    provenance,
    resolve_roots,
    results_table,
    write_tables,
)
from medssl.runs import BenchDir

BUILD_FAILED = "This section could not be built"


@dataclass
class ReportContext:
    """Everything the sections read, loaded once."""

    roots: list[Path]
    out_dir: Path
    folder: ReportFolder
    collection: RunCollection
    results: pd.DataFrame
    curves: pd.DataFrame
    pretrain: pd.DataFrame
    pretrain_curves: pd.DataFrame
    cka: list[dict[str, Any]]
    colors: dict[str, Any]
    excluded: list[tuple[str, str]] = field(default_factory=list)  # (run id, impossible value)
    figures: list[Path] = field(default_factory=list)
    latex: dict[str, str] = field(default_factory=dict)
    _wilcoxon: pd.DataFrame | None = None
    _wilcoxon_done: bool = False
    _provenance: dict[str, Any] | None = None

    @property
    def provenance(self) -> dict[str, Any]:
        # Built on first use, after the statistics: it imports torch (device info), and a process
        # holding torch's many objects makes every garbage collection (statsmodels' Holm runs one per
        # call) several times slower.
        if self._provenance is None:
            self._provenance = provenance(self.collection)
        return self._provenance

    def figure_path(self, name: str) -> Path:
        """Where a section writes the figure ``name``: ``figures/<name>``, recorded as the report's own
        file from the moment it is named (a section that fails after writing it leaves no stray file)."""
        return self.folder.path(f"figures/{name}")

    def figure(self, path: Path | None, caption: str) -> Image | None:
        if path is None:
            return None
        self.figures.append(path)
        return Image(path, caption)

    @property
    def methods(self) -> list[str]:
        return sorted(self.results["method"].unique()) if not self.results.empty else []

    def wilcoxon(self) -> pd.DataFrame | None:
        """Paired Wilcoxon tables (computed once; ``None`` when fewer than two methods)."""
        if not self._wilcoxon_done:
            self._wilcoxon_done = True
            if len(self.methods) >= 2:
                self._wilcoxon = paired_wilcoxon(self.results, reference=RANDOM_INIT, unit=PAIRING_UNIT)
        return self._wilcoxon


def _no_finetune(ctx: ReportContext) -> Missing:
    where = ", ".join(str(r) for r in ctx.roots)
    return Missing(f"No finished fine-tuning runs under {where}: nothing to show here.")


# --------------------------------------------------------------------------- sections

SectionBuilder = Callable[["ReportContext", Section], Section]


@dataclass(frozen=True)
class SectionSpec:
    title: str
    builder: SectionBuilder
    needs_finetune: bool  # without finished fine-tuning runs the section says so instead of being built


SECTION_BUILDERS: dict[str, SectionSpec] = {}
"""Section id -> its spec, in the order the report shows them: the order of registration below."""


def report_section(
    section_id: str, title: str, needs_finetune: bool = False
) -> Callable[[SectionBuilder], SectionBuilder]:
    """Register a section builder: it fills the empty ``Section(section_id, title)`` it is given."""

    def register(builder: SectionBuilder) -> SectionBuilder:
        SECTION_BUILDERS[section_id] = SectionSpec(title, builder, needs_finetune)
        return builder

    return register


@report_section("leaderboard", "Leaderboard", needs_finetune=True)
def section_leaderboard(ctx: ReportContext, section: Section) -> Section:
    table, _ = leaderboard(ctx.results, ctx.wilcoxon())
    ctx.latex["leaderboard"] = latex_table(table, label="tab:leaderboard")
    section.add(table)
    if len(ctx.methods) < 2:
        section.add(Missing(f"Only one method ({display_method(ctx.methods[0])}): nothing to compare."))
    elif RANDOM_INIT not in ctx.methods:
        section.add(Missing("No random-init baseline (method 'none') among the runs: no * marks."))
    verdict = null_result(ctx.wilcoxon())
    if verdict:
        section.add(Paragraph(verdict))
    collapsed = _collapsed_methods(ctx) & set(ctx.methods)
    if collapsed:
        section.add(
            Alert(
                f"The pretraining of {', '.join(sorted(collapsed))} collapsed (see Pretraining): "
                "their scores measure a collapsed encoder.",
                level="danger",
            )
        )
    seeds = ctx.results.groupby(["task", "method", "budget"])["seed"].nunique()
    seed_range = str(seeds.min()) if seeds.min() == seeds.max() else f"{seeds.min()}–{seeds.max()}"
    section.add(
        Paragraph(
            f"{ctx.results['run_id'].nunique()} fine-tuning runs; seeds per method × task × budget: {seed_range}. "
            "The CIs and tests take one Dice (mean over structures) per (test case, seed) pair: each seed has "
            "its own split and its own fine-tuned model."
        )
    )
    return section


@report_section("families", "Pretext families", needs_finetune=True)
def section_families(ctx: ReportContext, section: Section) -> Section:
    section.add(family_summary(ctx.results))
    families = ctx.results["family"].nunique()
    if families < 2:
        section.add(Missing(f"Only one family ({ctx.results['family'].iloc[0]}): no comparison between families."))
    return section


@report_section("budgets", "Label budgets: few-shot vs many-shot", needs_finetune=True)
def section_budgets(ctx: ReportContext, section: Section) -> Section:
    summary = budget_summary(ctx.results)
    section.add(
        ctx.figure(
            plots.budget_plot(summary, ctx.figure_path("budgets.png"), ctx.colors),
            "Mean test Dice vs number of training cases, per task; one line per method.",
        )
    )
    section.add(budget_table(ctx.results, ctx.wilcoxon()))
    budgets_per_task = ctx.results.groupby("task")["budget"].nunique()
    single = sorted(budgets_per_task[budgets_per_task < 2].index)
    if single:
        only = {t: order_budgets(ctx.results.loc[ctx.results["task"] == t, "budget"]) for t in single}
        section.add(
            Missing(
                "Only one label budget for "
                + ", ".join(f"{t} ({only[t][0]})" for t in single)
                + ": no few-/many-shot gap there."
            )
        )
    if len(single) == len(budgets_per_task):
        return section
    gaps = few_many_gap(ctx.results)
    if gaps.empty:
        return section.add(Missing("No method has both the smallest and the largest budget of a task."))
    section.add(Heading("Few-/many-shot gap"))
    section.add(gap_table(gaps, gap_ranks(gaps)))
    return section


# The transfer study's sections (medssl.report.transfer), after the label budgets.
report_section("controls", "Controls and transfer effects", needs_finetune=True)(section_controls)
report_section("probe", "Frozen-encoder probe")(section_probe)


@report_section("convergence", "Convergence")
def section_convergence(ctx: ReportContext, section: Section) -> Section:
    if ctx.curves.empty:
        return section.add(Missing("No validation curves in the finished fine-tuning runs."))
    section.add(
        ctx.figure(
            plots.curves_plot(ctx.curves, ctx.figure_path("convergence.png"), ctx.colors),
            "Validation Dice during fine-tuning at each task's largest budget (mean over seeds).",
        )
    )
    summary = convergence_table(ctx.curves, aggregate=True)
    columns = [
        "method",
        "task",
        "budget",
        "n_runs",
        "n_converged",
        "steps_to_95",
        "epochs_to_95",
        "auc",
        "best_val_dice",
    ]
    if summary["n_runs"].max() > 1:  # spread over seeds only means something with several seeds
        columns[6:6] = ["steps_to_95_std"]
        columns[-1:-1] = ["auc_std"]
    summary = summary.assign(_order=summary["budget"].map(budget_key))
    summary = summary.sort_values(["task", "_order", "auc"], ascending=[True, True, False], kind="stable")
    overview = convergence_overview(summary, method_order(ctx.results))
    if overview is not None:
        section.add(overview[0], Paragraph(overview[1]))
    section.add(
        Details(
            f"Every task × budget × method ({len(summary)} rows)",
            [
                frame_table(
                    summary[columns],
                    "Steps (and epochs) until validation Dice first reaches 95% of the run's best (mean over the "
                    "runs that got there: n_converged of n_runs), and the area under the validation curve with "
                    "steps scaled to [0, 1] (AUC: time-averaged Dice, higher = faster and better).",
                )
            ],
        )
    )
    if ctx.curves.groupby("run_id")["step"].nunique().max() < 2:
        section.add(Missing("Every run has a single validation point: convergence speed is not measurable."))
    return section


@report_section("modality", "CT vs MRI", needs_finetune=True)
def section_modality(ctx: ReportContext, section: Section) -> Section:
    section.add(
        Paragraph(
            "Every encoder is pretrained on the CT corpus; MRI tasks measure CT→MRI transfer. "
            "Random init is the reference. Each task weighs the same in a modality's mean."
        )
    )
    modalities = set(ctx.results["modality"].unique())
    tasks = ctx.results.groupby("modality")["task"].unique()
    section.add(
        Paragraph("; ".join(f"{m.upper()} tasks: {', '.join(sorted(tasks[m]))}" for m in sorted(tasks.index)) + ".")
    )
    if "mri" not in modalities:
        section.add(Missing("No MRI task among the finished runs: CT→MRI transfer cannot be assessed."))
    if "ct" not in modalities:
        section.add(Missing("No CT task among the finished runs: same-modality transfer cannot be assessed."))
    # Each task at its own largest budget (budgets differ between tasks): one label for the lot.
    top = modality_summary(at_largest_budget(ctx.results).assign(budget="all"))
    columns = ["method", "family", "ct", "mri", "mri_minus_ct", "n_ct_tasks", "n_mri_tasks"]
    top = top.set_index("method").reindex([m for m in method_order(ctx.results) if m in set(top["method"])])
    section.add(
        frame_table(
            top.reset_index()[columns],
            "Mean test Dice on CT and on MRI tasks at each task's largest budget, and MRI − CT.",
            index="method",
        )
    )
    section.add(
        ctx.figure(
            plots.modality_plot(top[["ct", "mri"]].dropna(axis=1, how="all"), ctx.figure_path("modality.png")),
            "Mean test Dice on CT vs MRI tasks at each task's largest budget.",
        )
    )
    if ctx.results["budget"].nunique() > 1:
        by_budget = modality_summary(ctx.results)
        section.add(
            frame_table(
                by_budget[["method", "budget", "ct", "mri", "mri_minus_ct", "n_ct_tasks", "n_mri_tasks"]],
                "The same per label budget (a budget counts only the tasks that have it).",
            )
        )
    return section


@report_section("cka", "Feature reuse (CKA)")
def section_cka(ctx: ReportContext, section: Section) -> Section:
    if not ctx.cka:
        return section.add(
            Missing("No CKA runs: feature reuse was not measured (run `medssl cka` or enable CKA in the benchmark).")
        )
    reuse_rows = []
    for i, run in enumerate(ctx.cka):
        caption = (
            f"{display_method(str(run.get('method')))} on {run.get('task')}: {run.get('comparison')} "
            f"(rows: model A, {plots.model_label(run.get('model_a'))}; columns: model B, "
            f"{plots.model_label(run.get('model_b'))})."
        )
        caption += _cka_left_out(run)
        section.add(ctx.figure(plots.cka_heatmap(run, ctx.figure_path(f"cka_{i:02d}.png")), caption))
        reuse = run.get("reuse") or {}
        if reuse:
            reuse_rows.append(
                {"method": run.get("method"), "task": run.get("task"), "comparison": run.get("comparison"), **reuse}
            )
    if reuse_rows:
        section.add(
            frame_table(
                pd.DataFrame(reuse_rows),
                "Feature reuse per stage: linear CKA between the same "
                "stage of the two models (1 = the representation is kept).",
                index="method",
            )
        )
    else:
        section.add(Missing("The CKA runs carry no reuse scores."))
    return section


def _cka_left_out(run: dict[str, Any]) -> str:
    """The caption's note on grey (undefined) cells of a CKA figure, with the run's own reasons."""
    reasons = run.get("minibatch_cka_left_out") or {}
    if isinstance(reasons, dict) and reasons:
        return " Grey minibatch-CKA cells are left out: " + "; ".join(f"{k}: {v}" for k, v in reasons.items()) + "."
    undefined = any(
        v is None or (isinstance(v, float) and v != v)
        for key in ("linear_cka", "minibatch_cka")
        for row in run.get(key) or []
        for v in row
    )
    return " Grey cells: not defined for these crops (the run recorded no reason)." if undefined else ""


@report_section("structures", "Per-structure results", needs_finetune=True)
def section_structures(ctx: ReportContext, section: Section) -> Section:
    for table in structure_tables(ctx.results).values():
        section.add(table)
    section.add(metric_summary(ctx.results))
    for table in lesion_tables(lesion_table(ctx.collection), ctx.results).values():  # lesion tasks only
        section.add(table)
    return section


@report_section("statistics", "Statistics", needs_finetune=True)
def section_statistics(ctx: ReportContext, section: Section) -> Section:
    wilcoxon = ctx.wilcoxon()
    if wilcoxon is None or wilcoxon.empty:
        section.add(Missing("Fewer than two methods: no paired tests."))
    else:
        shown = wilcoxon.copy()
        shown["smallest possible p_holm"] = floor_p_holm(wilcoxon)
        shown["comparison"] = shown["comparison"].map({"reference": "vs random init", "best": "vs best"})
        shown["other"] = shown["other"].map(display_method)
        for col in ("p", "p_holm", "smallest possible p_holm"):
            shown[col] = shown[col].map(fmt_p)
        section.add(Heading("Paired Wilcoxon signed-rank tests"))
        power = untestable(wilcoxon)
        if power:
            section.add(Alert(power))
        section.add(
            frame_table(
                shown,
                "Per task × budget, on the Dice of each (test case, seed) pair (mean over structures): each "
                "method vs random init and vs the best method; Holm correction within each comparison kind of "
                "a task × budget. n = pairs; mean_diff = method − other; smallest possible p_holm = the "
                "Holm-corrected p of n pairs all of one sign (2/2^n × tests in the family): where it is ≥ 0.05 the "
                "test could not have been significant.",
            )
        )
        if RANDOM_INIT not in ctx.methods:
            section.add(Missing("No random-init runs: only the comparisons with the best method are shown."))
    section.add(Heading("Friedman test and mean ranks across tasks"))
    friedman = friedman_ranks(ctx.results)
    for level, result in friedman.items():
        if level != "largest" and result.get("budgets") == friedman.get("largest", {}).get("budgets"):
            continue  # one budget per task: the smallest is the largest, already shown
        name = f"{level} budget per task"
        ranks = result.get("mean_ranks") or {}
        if not ranks:
            section.add(Missing(f"{name}: {result.get('reason') or 'no ranks'}."))
            continue
        budgets = ", ".join(f"{t}: {b}" for t, b in sorted(result.get("budgets", {}).items()))
        p, cd = result.get("p"), result.get("cd")
        head = f"{name} ({budgets}): "
        head += f"Friedman p = {fmt_p(p)}" if p is not None else f"no Friedman test — {result.get('reason')}"
        if cd is not None:
            head += f"; Nemenyi critical difference = {fmt(cd)}"
        if result.get("dropped_tasks"):
            head += f"; left out (a method is missing): {', '.join(result['dropped_tasks'])}"
        rank_frame = pd.DataFrame({"method": list(ranks), "mean rank": list(ranks.values())})
        section.add(frame_table(rank_frame, head + ". Rank 1 = best.", index="method"))
        if p is not None and cd is not None:
            path = ctx.figure_path(f"critical_difference_{_slug(level)}.png")
            labels = {display_method(m): r for m, r in ranks.items()}
            critical_difference_plot(labels, cd, path, title=f"Critical difference — {name}")
            section.add(
                ctx.figure(
                    path,
                    f"Critical-difference diagram ({name}): methods joined by a bar are not significantly "
                    "different (Nemenyi, α = 0.05).",
                )
            )
    return section


@report_section("pretraining", "Pretraining")
def section_pretraining(ctx: ReportContext, section: Section) -> Section:
    if ctx.pretrain.empty:
        return section.add(
            Missing(
                "No finished pretraining runs in this folder (encoders may come from elsewhere): "
                "no loss curves or health checks."
            )
        )
    for alert in _collapse_alerts(ctx.pretrain):
        section.add(alert)
    if not ctx.pretrain["collapsed"].any():
        section.add(
            Paragraph(
                "No pretraining run was flagged by the health verdict: the spread and the effective rank of each "
                "method's embedding and, for teacher-student methods, the entropy of the batch-mean teacher "
                "distribution stayed above their floors, no embedding spread fell more than 10x from its run's "
                "first steps, and no teacher became uniform with its student matching it (calibrated both ways on "
                "random init, healthy runs and collapsing ones; methods/verdict.py)."
            )
        )
    for row in ctx.pretrain[ctx.pretrain["health_warnings"].notna()].itertuples():
        section.add(
            Paragraph(f"Health note for {display_method(row.method)} (run {row.run_id}): {row.health_warnings}.")
        )
    collapsed = set(ctx.pretrain.loc[ctx.pretrain["collapsed"], "run_id"])
    section.add(
        ctx.figure(
            plots.pretrain_loss_plot(ctx.pretrain_curves, collapsed, ctx.figure_path("pretraining.png"), ctx.colors),
            "Pretraining loss per method (collapsed runs dashed red).",
        )
    )
    if ctx.pretrain_curves.empty:
        section.add(Missing("The pretraining runs logged no loss curve (metrics.jsonl)."))
    health_figure = plots.pretrain_health_plot(
        ctx.pretrain_curves, collapsed, ctx.figure_path("pretraining_health.png"), ctx.colors
    )
    if health_figure is not None:
        section.add(
            ctx.figure(
                health_figure,
                "Representation health per step (collapsed runs dashed red): embedding spread (about 1 healthy, 0 "
                "collapsed), RankMe effective rank (bounded by the batch), pooled-feature spread (reported only: "
                "near-identical at random init) and batch-mean teacher entropy over log K (0: one prototype).",
            )
        )
    elif not ctx.pretrain_curves.empty:
        section.add(Missing("The pretraining runs logged no health values (health/... in metrics.jsonl)."))
    columns = [
        "method",
        "family",
        "steps",
        "final_loss",
        "collapsed",
        "embedding_std_scaled",
        "embedding_rank",
        "feature_std_scaled",
        "teacher_batch_entropy_ratio",
        "wall_seconds",
        "step_seconds",
        "run_id",
    ]
    table = ctx.pretrain.merge(loss_trend(ctx.pretrain_curves).drop(columns="method"), on="run_id", how="left")
    columns.insert(columns.index("final_loss"), "loss_first")
    columns.insert(columns.index("final_loss"), "loss_last")
    section.add(
        frame_table(
            table[columns],
            "Pretraining runs: loss over the first and last three logged steps, final health values (mean of the "
            "last logged steps).",
            index="method",
        )
    )
    return section


@report_section("cost", "Cost beside accuracy")
def section_cost(ctx: ReportContext, section: Section) -> Section:
    summary = cost_summary(ctx.results, ctx.pretrain)
    if summary.empty:
        return section.add(Missing("No finished fine-tuning or pretraining runs: no cost to set beside accuracy."))
    section.add(
        frame_table(
            summary,
            "Measured pretraining cost per method (mean over its pretraining runs): FLOPs of one training step "
            "(forward + backward, torch.utils.flop_counter, matrix products and convolutions), total FLOPs = "
            "FLOPs/step × steps, wall time, device-hours (wall time × devices), peak memory (CUDA max allocated, "
            "or the process's peak RSS on CPU); beside the mean test Dice over every task × budget.",
            index="method",
        )
    )
    section.add(
        ctx.figure(
            plots.cost_plot(summary, ctx.figure_path("cost.png"), ctx.colors),
            "Mean test Dice against pretraining compute; dashed: random init (no pretraining).",
        )
    )
    unmeasured = summary[summary["total_flops"].isna()]
    if not unmeasured.empty:
        section.add(
            Missing(
                "No measured pretraining cost for "
                + ", ".join(display_method(m) for m in unmeasured["method"])
                + " (pretrained elsewhere, or by a version of medssl that did not record it)."
            )
        )
    return section


@report_section("provenance", "Provenance")
def section_provenance(ctx: ReportContext, section: Section) -> Section:
    prov = ctx.provenance
    packages = pd.DataFrame(
        {"package": list(prov["packages"]), "version": [v or "not installed" for v in prov["packages"].values()]}
    )
    section.add(frame_table(packages, "Package versions (of the machine that built this report).", index="package"))
    hardware = {**prov["hardware"], "devices": ", ".join(prov["hardware"].get("devices") or []) or "CPU only"}
    section.add(
        frame_table(
            pd.DataFrame({"item": list(hardware), "value": [str(v) for v in hardware.values()]}),
            "Report host.",
            index="item",
        )
    )
    wall = pd.DataFrame(
        {
            "stage": list(prov["wall_seconds"]),
            "runs": [prov["n_runs"][k] for k in prov["wall_seconds"]],
            "wall seconds": list(prov["wall_seconds"].values()),
        }
    )
    wall["wall time"] = wall["wall seconds"].map(_hms)
    section.add(frame_table(wall, "Wall time per stage (sum over finished runs).", index="stage"))
    section.add(*_pretrain_recipe_blocks(ctx.pretrain))
    recipes = pd.DataFrame(prov["finetune_recipes"])
    if not recipes.empty:
        section.add(
            frame_table(
                recipes,
                "Fine-tuning recipe per task, from each run's config.yaml (every encoder "
                "of a task should share one row).",
                index="task",
            )
        )
    section.add(Paragraph("Code versions: " + (", ".join(prov["code_versions"]) or "not recorded") + "."))
    if prov["run_hardware"]:
        section.add(Paragraph("Hardware recorded by the runs: " + "; ".join(prov["run_hardware"]) + "."))
    if prov["not_finished"]:
        section.add(
            Alert(
                "Runs left out because they are not finished: "
                + ", ".join(f"{n} {status}" for status, n in sorted(prov["not_finished"].items()))
                + "."
            )
        )
    for item in prov["skipped"]:
        section.add(Alert(f"Run {item['run_id']} skipped: {item['reason']}."))
    runs = pd.DataFrame(
        [
            {"run": run_id, **{k: v for k, v in info.items() if k != "created"}}
            for run_id, info in sorted(prov["runs"].items())
        ]
    )
    if not runs.empty:
        section.add(frame_table(runs, "Every run in this report with its config hash.", index="run"))
    return section


SECTIONS: tuple[tuple[str, str], ...] = tuple((sid, spec.title) for sid, spec in SECTION_BUILDERS.items())
"""The report's sections in order: (id, title)."""


# --------------------------------------------------------------------------- helpers


def _as_frame(value: Any) -> pd.DataFrame:
    """Analysis results come as DataFrames, Series or dicts; show them all as a table."""
    if isinstance(value, pd.DataFrame):
        frame = value
    elif isinstance(value, pd.Series):
        frame = value.to_frame()
    elif isinstance(value, dict):
        frame = (
            pd.DataFrame(value)
            if all(isinstance(v, (list, dict, pd.Series)) for v in value.values())
            else (pd.DataFrame({"key": list(value), "value": list(value.values())}))
        )
    else:
        frame = pd.DataFrame(value)
    if not isinstance(frame.index, pd.RangeIndex):
        frame = frame.reset_index()
    return frame


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _pretrain_recipe_blocks(pretrain: pd.DataFrame) -> list[Block]:
    """Which optimiser recipe the pretraining used and what each method got; few negatives flagged."""
    if pretrain.empty or pretrain["recipe"].isna().all():
        return []
    frame = pretrain.copy()
    frame["weight decay"] = [
        fmt(a) if a == b or b != b else f"{fmt(a)} → {fmt(b)}"
        for a, b in zip(frame["weight_decay"], frame["weight_decay_end"], strict=True)
    ]
    frame["clip"] = frame["grad_clip"].map(lambda v: "none" if v is None or v != v else fmt(v))
    frame["negatives per step"] = [
        "—" if n is None or n != n else f"{int(n)} (few)" if few else str(int(n))
        for n, few in zip(frame["negatives_per_step"], frame["few_negatives"], strict=True)
    ]
    frame["published optimiser"] = frame["published_optimizer"].fillna("—")
    frame["lr from"] = frame["lr_from"].fillna("shared schedule")
    frame["epochs"] = frame["epochs"].map(lambda v: "?" if v is None or v != v else f"{v:.3g}")
    table = frame[
        [
            "method",
            "recipe",
            "lr",
            "lr_rule",
            "lr from",
            "weight decay",
            "clip",
            "warmup_steps",
            "batch_size",
            "steps",
            "epochs",
            "negatives per step",
            "published optimiser",
        ]
    ]
    recipes = sorted(str(r) for r in frame["recipe"].dropna().unique())
    blocks: list[Block] = [
        frame_table(
            table,
            f"Pretraining optimiser per method (recipe: {', '.join(recipes)}; AdamW, cosine schedule; "
            "'published': each method's recipe from configs/methods/<name>.yaml, its published learning-rate point "
            "('lr from') moved to the run's batch by one linear rule, its warm-up the published fraction of the "
            "run; 'shared': one schedule for every method; epochs: steps x batch / corpus volumes).",
            index="method",
        )
    ]
    few = frame[frame["few_negatives"].fillna(False).astype(bool)]
    if not few.empty:
        names = ", ".join(
            f"{display_method(r.method)} ({int(r.negatives_per_step)} negatives)" for r in few.itertuples()
        )
        blocks.append(
            Alert(
                f"Small global batch for contrastive methods: {names} per step, against thousands "
                "in the published recipes; their scores measure a small-batch variant.",
                level="warning",
            )
        )
    return blocks


def _collapsed_methods(ctx: ReportContext) -> set[str]:
    if ctx.pretrain.empty:
        return set()
    return set(ctx.pretrain.loc[ctx.pretrain["collapsed"], "method"])


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text).strip("_").lower() or "x"


def _collapse_alerts(pretrain: pd.DataFrame) -> list[Alert]:
    alerts = []
    for row in pretrain[pretrain["collapsed"]].itertuples():
        detail = row.collapse_reason or "representation collapsed"
        alerts.append(
            Alert(
                f"COLLAPSE: pretraining of {display_method(row.method)} (run {row.run_id}) collapsed: {detail}. "
                "Its encoder carries no useful features; fine-tuning results from it measure a collapsed "
                "representation.",
                level="danger",
            )
        )
    return alerts


def _guarded(section_id: str, spec: SectionSpec, ctx: ReportContext) -> Section:
    """Build one section; unexpected data must not cost the reader the other sections."""
    title = spec.title
    if spec.needs_finetune and ctx.results.empty:
        return Section(section_id, title).add(_no_finetune(ctx))
    try:
        return spec.builder(ctx, Section(section_id, title))
    except Exception as err:  # noqa: BLE001 - shown in the report and warned, never swallowed silently
        last = traceback.extract_tb(err.__traceback__)[-1]
        message = f"{BUILD_FAILED}: {type(err).__name__}: {err} ({Path(last.filename).name}:{last.lineno})"
        warnings.warn(f"report section {section_id!r}: {message}", stacklevel=2)
        return Section(section_id, title).add(Alert(message, level="danger"))


def _preamble(ctx: ReportContext) -> list[Block]:
    n = ctx.provenance["n_runs"]
    blocks: list[Block] = [
        Paragraph(f"About this study: {about}")
        for about in dict.fromkeys(BenchDir(root.parent).about() for root in ctx.roots if root.name == "runs")
        if about
    ]
    blocks += [
        Paragraph(
            f"Built {time.strftime('%Y-%m-%d %H:%M:%S')} from {', '.join(str(r) for r in ctx.roots)}: "
            f"{n['finetune']} fine-tuning, {n['pretrain']} pretraining and {n['cka']} CKA runs (finished only); "
            f"{len(ctx.methods)} methods, {ctx.results['task'].nunique() if not ctx.results.empty else 0} tasks."
        )
    ]
    lines = headlines(ctx.results, ctx.wilcoxon()) if len(ctx.methods) >= 2 else []
    if lines:
        blocks.append(Headlines(lines))
    power = untestable(ctx.wilcoxon())
    if power:
        blocks.append(Alert(power))
    if ctx.excluded:
        shown = "; ".join(f"{run_id} ({reason})" for run_id, reason in ctx.excluded[:10])
        more = f" and {len(ctx.excluded) - 10} more" if len(ctx.excluded) > 10 else ""
        blocks.append(
            Alert(
                f"{len(ctx.excluded)} fine-tuning runs left out of every table, figure and test because their "
                f"results hold an impossible value: {shown}{more}.",
                level="danger",
            )
        )
    budget = _pretraining_budget(ctx.pretrain, ctx.pretrain_curves)
    if budget:
        blocks.append(Paragraph(budget))
    if not ctx.pretrain.empty and ctx.pretrain["collapsed"].any():
        names = ", ".join(sorted(display_method(m) for m in ctx.pretrain.loc[ctx.pretrain["collapsed"], "method"]))
        blocks.append(Alert(f"COLLAPSED PRETRAINING: {names} — see Pretraining.", level="danger"))
    if ctx.provenance["not_finished"]:
        blocks.append(Alert(f"{sum(ctx.provenance['not_finished'].values())} runs are not finished and are left out."))
    return blocks


def loss_trend(curves: pd.DataFrame, window: int = 3) -> pd.DataFrame:
    """Per pretraining run: the mean loss of its first and last ``window`` logged steps."""
    rows = []
    for (method, run_id), run in curves.dropna(subset=["loss"]).groupby(["method", "run_id"], sort=True):
        losses = run.sort_values("step")["loss"].to_numpy(dtype=float)
        if len(losses) >= 2:
            k = min(window, len(losses) // 2)
            rows.append(
                {"method": method, "run_id": run_id, "loss_first": losses[:k].mean(), "loss_last": losses[-k:].mean()}
            )
    return pd.DataFrame(rows, columns=["method", "run_id", "loss_first", "loss_last"])


def _pretraining_budget(pretrain: pd.DataFrame, curves: pd.DataFrame) -> str | None:
    """One sentence: how long each encoder was pretrained and whether its loss went down."""
    steps = sorted({int(s) for s in pretrain["steps"].dropna()}) if not pretrain.empty else []
    if not steps:
        return None
    shown = f"{steps[0]}" if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"
    text = f"Pretraining budget: {shown} steps per method ({len(pretrain)} pretraining runs)"
    trend = loss_trend(curves)
    if not trend.empty:
        rising = trend[~(trend["loss_last"] < trend["loss_first"])]
        text += f"; the loss went down in {len(trend) - len(rising)} of {len(trend)} runs"
        if not rising.empty:
            text += f" (not for {', '.join(sorted({display_method(m) for m in rising['method']}))}"
            text += "; a self-distillation loss also rises while its teacher's entropy grows from its start)"
    return text + " (see Pretraining)."


# --------------------------------------------------------------------------- entry point


def default_out_dir(runs_root: str | Path) -> Path:
    """Where ``medssl report RUNS_DIR`` writes without ``--out``: ``<out>/report`` beside ``<out>/runs``."""
    root = resolve_roots(runs_root)[0]
    return root.parent / "report" if root.name == "runs" else root / "report"


def build_report(runs_root: str | Path, out_dir: str | Path) -> Path:
    """Write the report of every finished run under ``runs_root`` into ``out_dir``; return index.html.

    Writes ``index.html`` (self-contained), ``report.md``, ``figures/*.png``, ``leaderboard.tex``,
    ``results.csv``, ``results.parquet``, ``curves.csv``, ``pretrain.csv``, ``provenance.json`` and the
    list of them, ``.medssl-report.json``; a rebuild replaces and prunes only those
    (``medssl.report.output``). A folder that is neither new, empty nor a report's is refused (exit 2).
    """
    roots = resolve_roots(runs_root)
    out = Path(out_dir)
    ReportFolder.claim(out)  # refuse a foreign folder before creating anything in it
    out.mkdir(parents=True, exist_ok=True)
    # two bench processes sharing an output folder both end with a report: they take turns, so
    # neither reads (or prunes) a figure while the other writes it
    with file_lock(out / LOCK_NAME):
        return _write_report(roots, ReportFolder.claim(out, record=True))


def _write_report(roots: list[Path], folder: ReportFolder) -> Path:
    out = folder.root
    collection = collect_runs(roots)
    excluded = screen_runs(collection)  # impossible values: out of every table, named in the report
    results = results_table(collection)
    ctx = ReportContext(
        roots=roots,
        out_dir=out,
        folder=folder,
        collection=collection,
        results=results,
        curves=curves_table(collection),
        pretrain=pretrain_table(collection),
        pretrain_curves=pretrain_curves(collection),
        cka=cka_runs(collection),
        colors={},
        excluded=excluded,
    )
    ctx.colors = plots.method_colors(list(results["method"].unique()) + list(ctx.pretrain["method"].unique()))
    folder.directory("figures")
    for path in write_tables(collection, out).values():
        folder.adopt(path)

    sections = [_guarded(sid, spec, ctx) for sid, spec in SECTION_BUILDERS.items()]
    atomic_write_text(folder.path("provenance.json"), to_json(ctx.provenance) + "\n")
    if "leaderboard" not in ctx.latex:
        ctx.latex["leaderboard"] = "% no finished fine-tuning runs: no leaderboard\n"
    atomic_write_text(folder.path("leaderboard.tex"), ctx.latex["leaderboard"])

    title = "medssl benchmark report"
    preamble = _preamble(ctx)
    atomic_write_text(folder.path("report.md"), render_markdown(title, sections, out, preamble))
    index = folder.path("index.html")
    atomic_write_text(index, render_html(title, sections, preamble))
    folder.finish()
    return index
