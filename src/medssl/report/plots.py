"""Report figures (PNG, matplotlib's object API with the Agg canvas: no pyplot state, no display).

Each function takes a tidy DataFrame (or a CKA result), writes one PNG and returns its path, or
returns ``None`` when there is nothing to draw, so the caller can say what is missing instead.
Legends sit outside the axes so they never cover data; every axis is labelled.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from medssl.analysis.gap import budget_key
from medssl.config import RANDOM_INIT
from medssl.fileio import atomic_path
from medssl.report.tables import display_method

DPI = 120


def method_colors(methods: Sequence[str]) -> dict[str, Any]:
    """A fixed colour per method (sorted names → tab10/tab20), the same in every figure."""
    import matplotlib

    names = sorted(set(methods))
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _figure(n_panels: int, panel_size: tuple[float, float] = (4.2, 3.4), max_cols: int = 3):
    cols = max(1, min(n_panels, max_cols))
    rows = max(1, math.ceil(n_panels / cols))
    # Constrained layout keeps titles, labels and colour bars apart without a tight_layout pass.
    fig = Figure(figsize=(panel_size[0] * cols, panel_size[1] * rows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]
    return fig, axes


def _legend_outside(fig: Figure, axes: list, title: str = "method") -> None:
    handles, labels, seen = [], [], set()
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in seen:
                seen.add(label)
                handles.append(handle)
                labels.append(label)
    if handles:
        fig.legend(handles, labels, title=title, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format="png")
    return path


def _per_task_figure(
    frame: pd.DataFrame,
    path: str | Path,
    colors: dict[str, Any] | None,
    title: str,
    draw: Callable[[Any, str, pd.DataFrame, dict[str, Any]], None],
) -> Path | None:
    """One panel per task of ``frame`` (tasks by name), each drawn by ``draw(ax, task, rows, colors)``,
    a legend of the methods beside them; None when ``frame`` is empty."""
    if frame.empty:
        return None
    colors = colors or method_colors(frame["method"])
    tasks = sorted(frame["task"].unique())
    fig, axes = _figure(len(tasks))
    for ax, task in zip(axes, tasks, strict=True):
        draw(ax, task, frame[frame["task"] == task], colors)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    _legend_outside(fig, axes)
    return _save(fig, path)


def budget_plot(summary: pd.DataFrame, path: str | Path, colors: dict[str, Any] | None = None) -> Path | None:
    """Dice vs number of training cases, one panel per task, one line per method.

    ``summary`` has columns task, method, budget, n_train, dice (``tables.budget_summary``).
    """

    def draw(ax: Any, task: str, rows: pd.DataFrame, colors: dict[str, Any]) -> None:
        for method, group in rows.groupby("method"):
            group = group.assign(k=group["budget"].map(budget_key)).sort_values("k")
            ax.plot(group["n_train"], group["dice"], marker="o", color=colors.get(method), label=display_method(method))
        n_train = rows["n_train"].dropna()
        if len(n_train) and n_train.min() > 0 and n_train.max() / n_train.min() >= 4:
            # Budgets grow geometrically (5, 10, 20, all): a log axis spaces them evenly.
            ax.set_xscale("log")
            ticks = sorted(set(n_train.round().astype(int)))
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
        ax.set_title(task)
        ax.set_xlabel("training cases (n_train)")
        ax.set_ylabel("mean test Dice")

    return _per_task_figure(summary, path, colors, "Few-shot vs many-shot: Dice by label budget", draw)


def curves_plot(curves: pd.DataFrame, path: str | Path, colors: dict[str, Any] | None = None) -> Path | None:
    """Validation Dice vs step, one panel per task (largest budget, mean over seeds), a line per method."""

    def draw(ax: Any, task: str, rows: pd.DataFrame, colors: dict[str, Any]) -> None:
        budget = max(rows["budget"].astype(str).unique(), key=budget_key)
        for method, runs in rows[rows["budget"].astype(str) == budget].groupby("method"):
            mean = runs.groupby("step")["val_dice"].mean()
            ax.plot(mean.index, mean.values, marker=".", color=colors.get(method), label=display_method(method))
        ax.set_title(f"{task} (budget {budget})")
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("validation Dice")

    return _per_task_figure(curves, path, colors, "Validation curves", draw)


def modality_plot(per_modality: pd.DataFrame, path: str | Path) -> Path | None:
    """Grouped bars: mean Dice on CT tasks and on MRI tasks per method.

    ``per_modality`` is method × modality (columns among "ct", "mri") of mean Dice.
    """
    columns = [c for c in ("ct", "mri") if c in per_modality.columns]
    if per_modality.empty or not columns:
        return None
    fig, (ax,) = _figure(1, panel_size=(max(5.0, 1.1 * len(per_modality) + 2), 3.6))
    x = np.arange(len(per_modality))
    width = 0.8 / len(columns)
    palette = {"ct": "#4c72b0", "mri": "#dd8452"}
    for i, col in enumerate(columns):
        ax.bar(
            x + (i - (len(columns) - 1) / 2) * width,
            per_modality[col].to_numpy(dtype=float),
            width,
            label=col.upper(),
            color=palette[col],
        )
    ax.set_xticks(x, [display_method(m) for m in per_modality.index], rotation=30, ha="right")
    ax.set_ylabel("mean test Dice")
    ax.set_xlabel("encoder (pretraining method)")
    ax.set_title("CT vs MRI tasks (CT-pretrained encoders)")
    ax.grid(axis="y", alpha=0.3)
    _legend_outside(fig, [ax], title="task modality")
    return _save(fig, path)


def model_label(path: object) -> str:
    """A model in a CKA figure or caption: the run it came from (``<run>/checkpoints/best.pt`` reads
    ``finetune-simmim-ct_organs-ball-s0 (best.pt)``, the id's config hash dropped), else its file name."""
    file = Path(str(path))
    if file.parent.name == "checkpoints" and file.parent.parent.name:
        run = re.sub(r"-[0-9a-f]{12}$", "", file.parent.parent.name)
        return f"{run} ({file.name})"
    return file.name


def cka_heatmap(run: dict[str, Any], path: str | Path) -> Path | None:
    """The layer × layer CKA matrices of one CKA run (linear and, if present, minibatch), annotated.

    A cell the run could not define (null in its results, e.g. a minibatch-CKA layer too coarse for its
    batches) is drawn grey without a number; the caption says why."""
    import matplotlib

    panels = [(key, _matrix(run[key])) for key in ("linear_cka", "minibatch_cka") if run.get(key)]
    panels = [(key, m) for key, m in panels if m.ndim == 2 and m.size]
    if not panels:
        return None
    layers = list(run.get("layers") or [f"layer {i}" for i in range(panels[0][1].shape[0])])
    layers_b = list(run.get("layers_b") or layers)
    fig, axes = _figure(len(panels), panel_size=(4.8, 4.2), max_cols=2)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")
    image = None
    for i, (ax, (key, matrix)) in enumerate(zip(axes, panels, strict=True)):
        image = ax.imshow(np.ma.masked_invalid(matrix), vmin=0.0, vmax=1.0, cmap=cmap, origin="upper")
        ax.set_xticks(range(matrix.shape[1]), layers_b[: matrix.shape[1]], rotation=45, ha="right")
        # Both panels share the rows: label them once, on the left.
        ax.set_yticks(range(matrix.shape[0]), layers[: matrix.shape[0]] if i == 0 else [])
        ax.set_xlabel(f"B: {model_label(run.get('model_b', 'B'))}", fontsize=8)
        if i == 0:
            ax.set_ylabel(f"A: {model_label(run.get('model_a', 'A'))}", fontsize=8)
        ax.set_title(key.replace("_cka", " CKA"))
        for (r, c), value in np.ndenumerate(matrix):
            if np.isfinite(value):
                ax.text(
                    c,
                    r,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if value < 0.6 else "black",
                )
    fig.colorbar(image, ax=axes, label="CKA", shrink=0.85)
    title = f"CKA — {display_method(str(run.get('method', '?')))}, {run.get('task', '?')}, {run.get('comparison', '')}"
    fig.suptitle(title)
    return _save(fig, path)


def _matrix(rows: Any) -> np.ndarray:
    """A JSON matrix (null for an undefined cell) as floats, NaN where undefined."""
    return np.array([[np.nan if v is None else float(v) for v in row] for row in rows], dtype=float)


def pretrain_loss_plot(
    curves: pd.DataFrame, collapsed_runs: set[str], path: str | Path, colors: dict[str, Any] | None = None
) -> Path | None:
    """Pretraining loss vs step, one line per run; collapsed runs dashed and labelled as such.

    Methods' losses have different scales, so each method gets its own panel.
    """
    if curves.empty:
        return None
    methods = sorted(curves["method"].unique())
    colors = colors or method_colors(methods)
    fig, axes = _figure(len(methods), panel_size=(3.8, 3.0), max_cols=4)
    for ax, method in zip(axes, methods, strict=True):
        for run_id, run in curves[curves["method"] == method].groupby("run_id"):
            collapsed = run_id in collapsed_runs
            label = f"{display_method(method)} (COLLAPSED)" if collapsed else display_method(method)
            ax.plot(
                run["step"],
                run["loss"],
                color="red" if collapsed else colors.get(method),
                linestyle="--" if collapsed else "-",
                label=label,
            )
        positive = (curves.loc[curves["method"] == method, "loss"] > 0).all()
        if positive:
            ax.set_yscale("log")
        ax.set_title(display_method(method))
        ax.set_xlabel("pretraining step")
        ax.set_ylabel("training loss" + (" (log)" if positive else ""))
        ax.grid(alpha=0.3)
    fig.suptitle("Pretraining loss")
    _legend_outside(fig, axes, title="run")
    return _save(fig, path)


def cost_plot(summary: pd.DataFrame, path: str | Path, colors: dict[str, Any] | None = None) -> Path | None:
    """Mean test Dice against total pretraining FLOPs (log scale), one point per method; random init
    (no pretraining) as a dashed horizontal reference line."""
    measured = summary[(summary["total_flops"] > 0) & summary["mean_dice"].notna()]
    if measured.empty:
        return None
    colors = colors or method_colors(list(summary["method"]))
    fig, (ax,) = _figure(1, panel_size=(5.6, 4.0))
    for row in measured.itertuples():
        ax.scatter(row.total_flops, row.mean_dice, color=colors.get(row.method), s=40, label=display_method(row.method))
        ax.annotate(
            display_method(row.method),
            (row.total_flops, row.mean_dice),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    baseline = summary[(summary["method"] == RANDOM_INIT) & summary["mean_dice"].notna()]
    if not baseline.empty:
        ax.axhline(float(baseline["mean_dice"].iloc[0]), color="grey", linestyle="--", label="random init")
    ax.set_xscale("log")
    ax.set_xlabel("pretraining compute (total FLOPs = FLOPs/step × steps, log)")
    ax.set_ylabel("mean test Dice (over tasks × budgets)")
    ax.grid(alpha=0.3)
    ax.set_title("Accuracy vs pretraining compute")
    _legend_outside(fig, [ax])
    return _save(fig, path)


HEALTH_PANELS = (
    ("embedding_std_scaled", "embedding spread (std x sqrt(d))"),
    ("embedding_rank", "embedding effective rank"),
    ("feature_std_scaled", "pooled-feature spread (std x sqrt(C))"),
    ("teacher_batch_entropy_ratio", "batch-mean teacher entropy / log K"),
)


def pretrain_health_plot(
    curves: pd.DataFrame, collapsed_runs: set[str], path: str | Path, colors: dict[str, Any] | None = None
) -> Path | None:
    """Representation-health curves vs step (methods/health.py), one panel per signal, one line per run;
    collapsed runs dashed red. Panels no run logged are left out."""
    panels = [(k, t) for k, t in HEALTH_PANELS if k in curves and curves[k].notna().any()]
    if curves.empty or not panels:
        return None
    colors = colors or method_colors(sorted(curves["method"].unique()))
    fig, axes = _figure(len(panels), panel_size=(3.8, 3.0), max_cols=4)
    for ax, (key, title) in zip(axes, panels, strict=True):
        for (method, run_id), run in curves.groupby(["method", "run_id"]):
            run = run[run[key].notna()]
            if run.empty:
                continue
            collapsed = run_id in collapsed_runs
            ax.plot(
                run["step"],
                run[key],
                color="red" if collapsed else colors.get(method),
                linestyle="--" if collapsed else "-",
                label=f"{display_method(method)} (COLLAPSED)" if collapsed else display_method(method),
            )
        ax.set_title(title)
        ax.set_xlabel("pretraining step")
        ax.grid(alpha=0.3)
    fig.suptitle("Representation health")
    _legend_outside(fig, axes, title="run")
    return _save(fig, path)
