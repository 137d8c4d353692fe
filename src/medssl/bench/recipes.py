"""The dry run's view of the pretraining recipes: each method's operating point side by side, and the plan as JSON.

``medssl bench CONFIG --dry-run`` prints :func:`print_operating_points` (per pretraining run: learning rate,
batch, weight decay, warm-up, run length in steps and epochs, the epoch-counted knobs in steps, and where
each value comes from, ``medssl.methods.recipe.operating_point``); ``--dry-run --json`` prints
:func:`plan_json` instead, one JSON object whose ``runs`` carry their resolved configs exactly as they would
run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medssl.config import BenchConfig, PretrainConfig
from medssl.data.corpus import Corpus
from medssl.methods.recipe import operating_point

from .plan import REAL_CT_PATH, Plan, corpus_dir, is_ingested_corpus


def planned_corpus_volumes(bench: BenchConfig, out: str | Path) -> int | None:
    """How many volumes the pretraining corpus will hold, when the plan can know: an ingested corpus's own
    count, the synthetic corpus's ``corpus_cases`` (plus the real head CT when asked for and installed);
    None for raw scan folders not yet ingested."""
    where = corpus_dir(bench, out)
    if is_ingested_corpus(where):
        return len(Corpus.open(where))
    if bench.data.corpus == "synth":
        synth = bench.data.synth
        cases = synth.corpus_cases if synth is not None else 12
        return cases + int(bench.data.include_real_ct and REAL_CT_PATH.is_file())
    return None


def operating_points(plan: Plan, corpus_volumes: int | None) -> list[dict[str, Any]]:
    """One row per pretraining run: its method and run id with :func:`operating_point` of its config."""
    rows = []
    for run in plan.stage("pretrain"):
        assert isinstance(run.config, PretrainConfig)
        rows.append(
            {"method": run.labels["method"], "run_id": run.run_id, **operating_point(run.config, corpus_volumes)}
        )
    return rows


def _format(value: Any) -> str:
    if value is None:
        return "?"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def print_operating_points(plan: Plan, corpus_volumes: int | None, console: Any) -> None:
    """The pretraining operating points side by side (a rich table) and, under it, where each value comes from."""
    from rich.table import Table

    rows = operating_points(plan, corpus_volumes)
    if not rows:
        return
    table = Table(title="pretraining operating points (as each run will record them)")
    for column in ("method", "recipe", "lr", "lr rule", "batch", "weight decay", "warm-up", "steps", "epochs"):
        table.add_column(column, justify="left" if column in ("method", "recipe", "lr rule") else "right")
    table.add_column("epoch-counted knobs (steps)", overflow="fold")
    for row in rows:
        decay = _format(row["weight_decay"])
        if row["weight_decay_end"] != row["weight_decay"]:
            decay += f" -> {_format(row['weight_decay_end'])}"
        table.add_row(
            row["method"],
            row["recipe"],
            _format(row["lr"]),
            row["lr_rule"] or "shared",
            _format(row["batch_size"]),
            decay,
            _format(row["warmup_steps"]),
            _format(row["steps"]),
            _format(row["epochs"]),
            ", ".join(f"{k} {v}" for k, v in row["knob_steps"].items()) or "-",
        )
    console.print(table)
    lrs = [row["lr"] for row in rows]
    console.print(
        f"resolved learning rates: {min(lrs):.3g} to {max(lrs):.3g} ({max(lrs) / min(lrs):.3g}x); epochs "
        + (
            f"count one region of each of {corpus_volumes} corpus volumes"
            if corpus_volumes
            else "unknown until the corpus is ingested"
        )
    )
    shared = [row["method"] for row in rows if row["recipe"] != "published" and not row["lr_rule"]]
    if shared:
        console.print(f"  shared schedule (pretrain.schedule, every method alike): {', '.join(shared)}")
    for row in rows:
        if row["recipe"] != "published" and row["lr_rule"]:
            console.print(f"  {row['method']}: lr from {row['sources']['lr']}; the rest of the shared schedule")
    for row in rows:
        if row["recipe"] != "published":
            continue
        sources = row["sources"]
        console.print(
            f"  {row['method']}: lr from {sources['lr']}; weight decay from {sources['weight_decay']}; "
            f"warm-up {sources['warmup']}"
        )


def plan_json(plan: Plan, corpus_volumes: int | None) -> dict[str, Any]:
    """The plan, machine-readable: ``runs`` with ``run_id``, ``kind``, ``method``, (``task``, ``budget``, ``seed``
    for fine-tuning), ``config`` (the resolved config as a plain dict, exactly as it would run) and, for
    pretraining, ``operating_point``."""
    points = {row["run_id"]: row for row in operating_points(plan, corpus_volumes)}
    runs = []
    for run in plan.runs:
        entry: dict[str, Any] = {"run_id": run.run_id, "kind": run.kind, "method": run.labels.get("method")}
        if run.kind == "finetune":
            entry.update({key: run.labels[key] for key in ("task", "budget", "seed")})
        if run.kind == "cka":
            entry.update({key: run.labels[key] for key in ("task", "comparison")})
        entry["depends_on"] = run.depends_on
        entry["config"] = run.config.model_dump(mode="json")
        if run.run_id in points:
            entry["operating_point"] = {k: v for k, v in points[run.run_id].items() if k not in ("method", "run_id")}
        runs.append(entry)
    return {"name": plan.name, "out": str(plan.out), "corpus_volumes": corpus_volumes, "runs": runs}
