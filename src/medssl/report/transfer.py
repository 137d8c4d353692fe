"""The report sections of a transfer study: what the controls show, each encoder's paired effect against
random init with its CI and p, how far fine-tuning moved each encoder, and the frozen-encoder probe.

``section_controls`` and ``section_probe`` take the report context of ``medssl.report.build`` and return
a section; the numbers come from ``medssl.analysis.transfer``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import pandas as pd

from medssl.analysis.gap import budget_key
from medssl.analysis.transfer import (
    drift_table,
    online_probe_curves,
    paired_effects,
    probe_results_table,
)
from medssl.config import IDENTITY_TRANSFORMER, RANDOM_INIT, SUPERVISED
from medssl.report.html import Missing, Paragraph, Section  # noqa: F401
from medssl.report.tables import display_method, fmt, fmt_p, frame_table

if TYPE_CHECKING:
    from pathlib import Path

    from medssl.report.build import ReportContext

EFFECT_MIN = 0.05  # the smallest mean Dice difference the study calls an effect (issue 18's criterion)
ALPHA = 0.05


def is_supervised(method: str) -> bool:
    return SUPERVISED in str(method)


def _controls(methods: list[str]) -> set[str]:
    return {m for m in methods if is_supervised(m) or m in (RANDOM_INIT, IDENTITY_TRANSFORMER)}


def p_text(p: float) -> str:
    """``p < 0.001`` or ``p = 0.012``."""
    shown = fmt_p(p)
    return f"p {shown[0]} {shown[1:]}" if shown.startswith("<") else f"p = {shown}"


def _ci(row: Any) -> str:
    return f"{row['diff']:+.3f} [{row['ci_lo']:+.3f}, {row['ci_hi']:+.3f}]"


def _seen(row: Any) -> bool:
    return bool(row["diff"] >= EFFECT_MIN and row["p"] < ALPHA)


def _effects_frame(effects: pd.DataFrame) -> pd.DataFrame:
    shown = effects.copy()
    shown["method"] = shown["method"].map(display_method)
    shown["difference [95% CI]"] = [_ci(r) for _, r in effects.iterrows()]
    shown["p"] = shown["p"].map(fmt_p)
    return shown[["task", "budget", "method", "n", "mean", "reference_mean", "difference [95% CI]", "p"]].rename(
        columns={"reference_mean": "random init"}
    )


def control_sentences(effects: pd.DataFrame, methods: list[str]) -> list[str]:
    """The generated findings: the positive control's effect, the identity control, each SSL method."""
    sentences: list[str] = []
    if effects.empty:
        return sentences
    smallest = {t: min(g["budget"], key=budget_key) for t, g in effects.groupby("task")}
    supervised = [m for m in methods if is_supervised(m)]
    for method in supervised:
        for task, budget in smallest.items():
            cell = effects[(effects["task"] == task) & (effects["budget"] == budget) & (effects["method"] == method)]
            if cell.empty:
                continue
            row = cell.iloc[0]
            verdict = (
                "the protocol sees an effect of this size"
                if _seen(row)
                else f"short of an effect of {EFFECT_MIN} at p < {ALPHA}: at this budget the protocol cannot "
                "show that any encoder helps"
            )
            sentences.append(
                f"Positive control ({display_method(method)}, an encoder trained with labels of held-out "
                f"phantoms) on {task} at {budget} case(s): {row['mean']:.3f} vs random init "
                f"{row['reference_mean']:.3f}, difference {_ci(row)}, Wilcoxon {p_text(row['p'])} over "
                f"{row['n']} (case, seed) pairs — {verdict}."
            )
    identity = effects[effects["method"] == IDENTITY_TRANSFORMER]
    for task, group in identity.groupby("task", sort=True):
        parts = []
        for _, row in group.sort_values("budget", key=lambda b: b.map(budget_key)).iterrows():
            share = row["mean"] / row["reference_mean"] if row["reference_mean"] > 0 else math.nan
            parts.append(f"{row['mean']:.3f} vs {row['reference_mean']:.3f} ({share:.0%}) at {row['budget']}")
        worse = group[(group["diff"] < 0) & (group["p"] < ALPHA)]
        reading = (
            "the Swin blocks add Dice beyond what the decoder reaches alone"
            if len(worse) == len(group)
            else "the decoder with the patch embedding and mergings alone reaches much of what the whole "
            "segmenter does, so an encoder can only matter through what its Swin blocks bring"
            if worse.empty
            else "the Swin blocks add Dice at some budgets only"
        )
        sentences.append(
            f"Identity control on {task} (Swin blocks replaced by identity, random init) vs random init: "
            f"{'; '.join(parts)}: {reading}."
        )
    ssl = [m for m in methods if m not in _controls(methods)]
    for method in ssl:
        mine = effects[effects["method"] == method]
        cells: dict[str, list[str]] = {"better": [], "worse": []}
        for _, r in mine[mine["p"] < ALPHA].iterrows():
            cells["better" if r["diff"] > 0 else "worse"].append(
                f"{r['task']} at {r['budget']} ({_ci(r)}, {p_text(r['p'])})"
            )
        better, worse = cells["better"], cells["worse"]
        text = f"{display_method(method)} vs random init: "
        text += f"better on {', '.join(better)}" if better else "better nowhere at p < 0.05"
        text += f"; worse on {', '.join(worse)}" if worse else ""
        sentences.append(text + ".")
    return sentences


def section_controls(ctx: ReportContext, section: Section) -> Section:
    """Controls, paired effects against random init, and encoder drift (fine-tuning runs exist)."""
    methods = ctx.methods
    effects = paired_effects(ctx.results)
    if RANDOM_INIT not in methods or effects.empty:
        section.add(Missing("No random-init runs to pair with: no effects against random init."))
    else:
        if not any(is_supervised(m) for m in methods) and IDENTITY_TRANSFORMER not in methods:
            section.add(
                Missing(
                    "No control rows (controls.supervised, controls.identity_transformer in the benchmark "
                    "config): without a positive control a null result cannot tell a useless encoder from a "
                    "protocol that cannot see any encoder's effect."
                )
            )
        for sentence in control_sentences(effects, methods):
            section.add(Paragraph(sentence))
        section.add(
            frame_table(
                _effects_frame(effects),
                "Each encoder against random init per task × budget: mean test Dice of both, the mean paired "
                "difference with its percentile-bootstrap 95% CI and the two-sided Wilcoxon signed-rank p over "
                "(test case, seed) pairs (uncorrected; n = pairs).",
            )
        )
    drift = drift_table(ctx.collection)
    if drift.empty:
        section.add(Missing("No fine-tuning run recorded its encoder drift."))
    else:
        drift["method"] = drift["method"].map(display_method)
        section.add(
            frame_table(
                drift,
                "Encoder drift: ||W_end − W_start|| / ||W_start|| of the tested weights per encoder part, the "
                "mean over each encoder's fine-tuning runs. Near 1, fine-tuning has replaced the part it "
                "started from; a pretrained encoder can only transfer what the recipe leaves of it.",
                index="method",
            )
        )
    return section


def _probe_figure(curves: pd.DataFrame, path: Path, colors: dict[str, Any]) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for (method, _run), run in curves.groupby(["method", "run_id"], sort=True):
        ax.plot(run["step"], run["dice"], marker="o", ms=3, label=display_method(method), color=colors.get(method))
    ax.set_xlabel("pretraining step")
    ax.set_ylabel("probe Dice (held-out cases)")
    ax.set_title("Online frozen-encoder probe")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def section_probe(ctx: ReportContext, section: Section) -> Section:
    """The frozen-encoder probe: probe runs against random init, and the online probe over pretraining."""
    probes = probe_results_table(ctx.collection)
    curves = online_probe_curves(ctx.collection)
    if probes.empty and curves.empty:
        return section.add(
            Missing(
                "No probe runs and no online probe (probe.enabled and pretrain.probe.every in the benchmark "
                "config; `medssl probe ENCODER --task T`)."
            )
        )
    section.add(
        Paragraph(
            "A linear head trained on the frozen encoder's features (every Swin output upsampled to voxels), "
            "on the budget's training cases, scored with Dice on the fine-tuning runs' test cases: what the "
            "encoder holds before fine-tuning changes it."
        )
    )
    if not probes.empty:
        methods = sorted(probes["method"].unique())
        effects = paired_effects(probes)
        for method in [m for m in methods if is_supervised(m)]:
            for _, row in effects[effects["method"] == method].iterrows():
                verdict = "passes" if _seen(row) else "does not pass"
                section.add(
                    Paragraph(
                        f"The probe {verdict} the supervised control on {row['task']} at {row['budget']} "
                        f"case(s): {row['mean']:.3f} vs random init {row['reference_mean']:.3f}, difference "
                        f"{_ci(row)}, {p_text(row['p'])} (n = {row['n']})."
                    )
                )
        if not effects.empty:
            section.add(frame_table(_effects_frame(effects), "Probe Dice against random init (as above)."))
        else:
            means = probes.groupby(["task", "budget", "method"])["dice"].mean().reset_index()
            section.add(frame_table(means, "Mean probe Dice (no random-init probe to pair with)."))
    if not curves.empty:
        path = _probe_figure(curves, ctx.figure_path("online_probe.png"), ctx.colors)
        section.add(
            ctx.figure(path, "Online probe during pretraining: probe Dice on held-out labelled cases per step.")
        )
        last = curves.sort_values("step").groupby("method").tail(1)
        first = curves.sort_values("step").groupby("method").head(1).set_index("method")["dice"]
        text = "; ".join(
            f"{display_method(r['method'])} {fmt(first.get(r['method']))} at step 0 → {fmt(r['dice'])} at "
            f"step {r['step']}"
            for _, r in last.iterrows()
        )
        section.add(Paragraph(f"Online probe: {text}."))
    return section
