"""``medssl bench``: load the benchmark, prepare its data, expand the plan, run what is not
finished, write the report. Re-running skips finished runs and resumes interrupted ones."""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, cast

from medssl.config import (
    EXECUTOR_KINDS,
    BenchConfig,
    ExecutorKind,
    SynthDataConfig,
    apply_overrides,
    resolve_bench_paths,
    validate_config,
)
from medssl.errors import ConfigError, look_up_option
from medssl.limits import check_batch_size, set_limits
from medssl.runs import RunDir

from .estimate import RunEstimate, device_description, estimate_plan, short_source, stage_rows
from .executors import ExecutionSummary, make_executor
from .identity import bind_out_folder
from .plan import (
    RANDOM_INIT,
    REAL_CT_PATH,
    STAGES,
    Plan,
    control_data_seed,
    control_task_dir,
    corpus_dir,
    expand_plan,
    is_ingested_corpus,
    needs_control_data,
    resolve_methods,
    resolve_tasks,
    runs_root,
    synth_data_dir,
)
from .recipes import plan_json, planned_corpus_volumes, print_operating_points


def demo_config_path() -> Path:
    """The packaged ``configs/demo.yaml``."""
    return Path(str(resources.files("medssl") / "configs" / "demo.yaml"))


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


# --------------------------------------------------------------------------- data


def prepare_data(bench: BenchConfig, out: Path, source: str | Path | None = None) -> None:
    """Synthesise what the benchmark asks for into ``<out>/data`` and ingest the corpus into
    ``<out>/corpus`` (both skip work already done), at the paths the plan expects."""
    out = Path(out).resolve()
    where = source or "<bench config>"
    tasks = resolve_tasks(bench, out, source)
    pretraining = any(m.name != RANDOM_INIT for m in resolve_methods(bench, source))
    synth_corpus = pretraining and bench.data.corpus == "synth"
    made: dict[str, Path] = {}
    kinds = sorted({t.synth_kind for t in tasks if t.synth_kind})
    if synth_corpus or kinds:
        from medssl.data.synth import synth_corpus as write_corpus
        from medssl.data.synth import synth_task

        s = bench.data.synth or SynthDataConfig()
        _console(stderr=True).print(
            f"synthetic data: {s.cases} cases per task ({', '.join(kinds) or 'none'}), "
            f"{s.corpus_cases if synth_corpus else 0} corpus scans of {tuple(s.shape)} ({s.variation} variation) "
            f"in {synth_data_dir(out)}"
        )
        common: dict[str, Any] = {
            "seed": s.seed,
            "shape": tuple(s.shape),
            "spacing": tuple(s.spacing),
            "variation": s.variation,
        }
        # only what the plan uses: the corpus when it pretrains on it, the tasks it lists
        if synth_corpus:
            made["corpus"] = synth_data_dir(out) / "corpus"
            write_corpus(made["corpus"], s.corpus_cases, **common)
        for kind in kinds:
            lesions = {"lesion_radius_mm": s.lesion_radius_mm} if kind == "ct_lesions" else {}
            made[kind] = synth_task(synth_data_dir(out) / kind, kind, s.cases, **common, **lesions)  # type: ignore[arg-type]
        for task in tasks:
            if task.synth_kind and Path(made[task.synth_kind]).resolve() != task.path:
                raise RuntimeError(
                    f"synthetic task {task.synth_kind} written to {made[task.synth_kind]}, the plan expects {task.path}"
                )
    if needs_control_data(bench):
        prepare_control_data(bench, out)
    if not pretraining:
        return
    target = corpus_dir(bench, out)
    if target != out / "corpus":
        return  # an ingested corpus given as is
    sources = [Path(made["corpus"])] if synth_corpus else [Path(p) for p in bench.data.corpus]
    for path in sources:
        if is_ingested_corpus(path):
            raise ConfigError(
                where, f"data.corpus: {path} is an ingested corpus; give it alone, not mixed with raw scan folders"
            )
    if bench.data.include_real_ct and REAL_CT_PATH.is_file():
        sources.append(REAL_CT_PATH)
    from medssl.data.corpus import ingest_corpus

    corpus = ingest_corpus(sources, target, bench.preprocess, image_format=bench.cache.format)
    _console(stderr=True).print(f"corpus: {len(corpus)} volumes in {target}")


def prepare_control_data(bench: BenchConfig, out: Path) -> Path:
    """The control phantoms: the supervised control's labelled cases (and the online probe's), rendered
    like the study's tasks but from anatomy seed ``control_data_seed`` (never the study's own)."""
    from medssl.data.synth import synth_task

    s, control = bench.data.synth or SynthDataConfig(), bench.controls.supervised
    seed = control_data_seed(bench)
    _console(stderr=True).print(
        f"control data: {control.cases} {control.task} cases from anatomy seed {seed} (study: {s.seed}) "
        f"in {control_task_dir(bench, out)}"
    )
    return synth_task(
        control_task_dir(bench, out),
        control.task,
        control.cases,
        seed=seed,
        shape=tuple(s.shape),
        spacing=tuple(s.spacing),
        variation=s.variation,
    )


# --------------------------------------------------------------------------- printing


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def print_plan(
    plan: Plan,
    out: Path,
    estimates: list[RunEstimate],
    parallel: int = 1,
    max_rows: int = 80,
    measure_steps: int = 1,
) -> None:
    """The dry run: per stage, how many runs, how many finished, estimated cost; then each run."""
    from rich.table import Table

    console = _console()
    by_id = {e.run_id: e for e in estimates}
    status = {r.run_id: RunDir(r.run_dir(out)).status() for r in plan.runs}
    table = Table(title=f"benchmark '{plan.name}' -> {out}")
    for column in ("stage", "runs", "finished", "to run", "estimated", "step time from"):
        table.add_column(column, justify="right" if column in ("runs", "finished", "to run", "estimated") else "left")
    total, unknown = 0.0, 0
    for kind in STAGES:
        runs = plan.stage(kind)
        if not runs:
            continue
        finished = sum(status[r.run_id] == "finished" for r in runs)
        seconds = [by_id[r.run_id].seconds for r in runs]
        known = [s for s in seconds if s is not None]
        unknown += len(seconds) - len(known)
        total += sum(known)
        sources = sorted({short_source(by_id[r.run_id].source) for r in runs if by_id[r.run_id].source != "finished"})
        table.add_row(
            kind,
            str(len(runs)),
            str(finished),
            str(len(runs) - finished),
            format_seconds(sum(known)) if known else "?",
            "; ".join(sources) or "-",
        )
    console.print(table)
    unfinished = sum(e.source != "finished" for e in estimates)
    if unfinished and unknown == unfinished:
        console.print("estimated cost of the unfinished runs: unknown")
    else:
        note = f", ~{format_seconds(total / parallel)} wall with {parallel} workers" if parallel > 1 else ""
        console.print(
            f"estimated cost of the unfinished runs: {format_seconds(total)}{note} (training steps x "
            "step time; validation, testing and data preparation not included"
            + (f"; {unknown} runs not estimated)" if unknown else ")")
        )
    print_device_hours(estimates, measure_steps)
    if len(plan.runs) > max_rows:
        console.print(f"{len(plan.runs)} runs: see {out / 'plan.json'} for each one")
        return
    runs_table = Table(title="runs")
    runs_table.add_column("what")
    runs_table.add_column("status")
    runs_table.add_column("estimated", justify="right")
    runs_table.add_column("run id (after: dependencies)", overflow="fold")
    for run in plan.runs:
        est = by_id[run.run_id]
        deps = f" (after: {len(run.depends_on)})" if run.depends_on else ""
        runs_table.add_row(
            run.describe(),
            status[run.run_id],
            "-" if est.source == "finished" else format_seconds(est.seconds),
            run.run_id + deps,
        )
    console.print(runs_table)


def print_device_hours(estimates: list[RunEstimate], measure_steps: int = 1) -> None:
    """Device-hours of the unfinished runs: pretraining per method, fine-tuning per task x budget
    (summed over seeds and encoders), CKA per comparison; each stage's total and the whole; and how
    the step times were obtained."""
    from rich.table import Table

    console = _console()
    table = Table(title="estimated device-hours of the unfinished runs (steps x step time)")
    for column in ("stage", "runs", "steps", "step time", "device-hours", "step time from"):
        table.add_column(column, justify="left" if column in ("stage", "step time from") else "right")
    rows = stage_rows(estimates, STAGES)
    grand, grand_unknown = 0.0, 0
    for kind in STAGES:
        of_stage = [r for r in rows if r.stage == kind]
        if not of_stage:
            continue
        for row in of_stage:
            step = ", ".join(f"{s:.3g} s" for s in row.step_seconds) or "-"
            hours = f"{row.device_hours:.3g}" + (f" + {row.unknown} runs ?" if row.unknown else "")
            table.add_row(
                f"{kind} {row.label}",
                str(row.runs),
                str(row.steps),
                step,
                hours,
                "; ".join(sorted({short_source(s) for s in row.sources})) or "-",
            )
        seconds, unknown = sum(r.seconds for r in of_stage), sum(r.unknown for r in of_stage)
        grand, grand_unknown = grand + seconds, grand_unknown + unknown
        total = f"{seconds / 3600:.3g}" + (f" + {unknown} runs ?" if unknown else "")
        table.add_row(f"{kind} total", str(sum(r.runs for r in of_stage)), "", "", total, "", style="bold")
    grand_text = f"{grand / 3600:.3g}" + (f" + {grand_unknown} runs ?" if grand_unknown else "")
    table.add_row("total", str(len(estimates)), "", "", grand_text, "", style="bold")
    console.print(table)
    reasons: dict[str, list[str]] = {}
    for row in rows:
        for source in row.sources:
            if source.startswith("not estimated: "):
                reasons.setdefault(source.removeprefix("not estimated: "), []).append(f"{row.stage} {row.label}")
    for reason, labels in reasons.items():
        shown = ", ".join(labels[:4]) + (f" and {len(labels) - 4} more" if len(labels) > 4 else "")
        console.print(f"not estimated: {shown}: {reason}")
    if any(e.source.startswith("measured now") for e in estimates):
        console.print(
            f"step times measured now on {device_description()}: per configuration, random input of the run's "
            f"batch and crop size, 1 warm-up step (excluded) then the mean of {max(measure_steps, 1)} timed "
            "step(s) of the training loop's train_step (CKA: no-gradient encoder forwards); data loading, "
            "validation and testing not included"
        )
    if any("proxy" in e.source for e in estimates):
        console.print(
            "proxy: a configuration too large to time on this CPU is timed at batch 2 and a smaller crop and "
            "scaled by batch x voxels (the factor after the last 'x'); on the target machine a dry run times "
            "the real sizes, and finished runs there replace every estimate of their kind"
        )


def print_summary(summary: ExecutionSummary, plan: Plan) -> None:
    console = _console(stderr=True)
    counts = {s: len(summary.with_status(s)) for s in ("finished", "already_finished", "failed", "skipped")}
    console.print(
        f"benchmark '{plan.name}': {counts['finished']} runs executed, {counts['already_finished']} "
        f"already finished, {counts['failed']} failed, {counts['skipped']} skipped"
    )
    by_id = plan.by_id()
    for outcome in summary.failed + summary.skipped:
        console.print(f"  {outcome.status}: {by_id[outcome.run_id].describe()} ({outcome.run_id}): {outcome.error}")


# --------------------------------------------------------------------------- the command


def load_bench(
    config_path: str | Path | None, overrides: Sequence[str] = (), bench: BenchConfig | None = None
) -> BenchConfig:
    """The benchmark from a YAML (or a given model) with ``a.b=c`` overrides applied."""
    from medssl.config import load_bench_config

    if bench is None:
        if config_path is None:
            raise ConfigError("<command line>", "no benchmark config given")
        return load_bench_config(config_path, list(overrides))
    if overrides:
        data = apply_overrides(bench.model_dump(mode="json"), list(overrides))
        bench = validate_config(BenchConfig, data, config_path or "<command line>")
    return resolve_bench_paths(bench.model_copy(deep=True), Path.cwd())


def _check_batch_sizes(bench: BenchConfig, source: str | Path) -> None:
    """Every batch size the benchmark sets (pretraining, fine-tuning, a task's own) within
    ``limits.batch_size``; the training loop checks it again in each run's own process."""
    sizes = [("pretrain", bench.pretrain.schedule.batch_size), ("finetune", bench.finetune.schedule.batch_size)]
    for task in bench.tasks:
        schedule = task.finetune.get("schedule") if isinstance(task.finetune, dict) else None
        if isinstance(schedule, dict) and isinstance(schedule.get("batch_size"), int):
            sizes.append((f"tasks '{task.name or task.path}' finetune", schedule["batch_size"]))
    for where, size in sizes:
        check_batch_size(size, f"{source}: {where}")


def executor_kind(name: str) -> ExecutorKind:
    """``name`` as an executor kind; a ``ConfigError`` (exit 2) naming the known ones otherwise."""
    return cast(ExecutorKind, look_up_option("executor", name, EXECUTOR_KINDS, source="--executor"))


def run_bench(
    config_path: str | Path | None,
    out: str | Path,
    executor: str | None = None,
    overrides: Sequence[str] = (),
    dry_run: bool = False,
    bench: BenchConfig | None = None,
    cluster: str | None = None,
    as_json: bool = False,
) -> int:
    """Run a benchmark into ``out``; returns the number of failed runs (0 = all finished), plus
    one when the report could not be written (what finished is reported even when runs failed).

    ``cluster`` is submitit's cluster for the SLURM executor (None: detect; "local" for tests).
    ``as_json`` (with ``dry_run`` only): the plan as one JSON object on stdout (``bench/recipes.py``
    ``plan_json``), nothing else, no step time measured.
    """
    out = Path(out).resolve()
    source = config_path or "<bench config>"
    if as_json and not dry_run:
        raise ConfigError("--json", "prints the plan of a dry run: give --dry-run with it")
    bench = load_bench(config_path, overrides, bench)
    set_limits(bench.limits)  # this process prepares the data; each run gets them in its own config
    _check_batch_sizes(bench, source)  # at the door, before the out folder is bound or data is made
    kind = executor_kind(executor) if executor is not None else bench.executor.kind

    bind_out_folder(bench, out, record=not dry_run)  # exit 2 when out holds another benchmark
    if dry_run:
        plan = expand_plan(bench, out, source)
        volumes = planned_corpus_volumes(bench, out)
        if as_json:
            print(json.dumps(plan_json(plan, volumes)))
            return 0
        parallel = bench.executor.workers if kind == "local" else 1
        print_plan(plan, out, estimate_plan(plan, out), parallel=parallel)
        print_operating_points(plan, volumes, _console())
        return 0

    prepare_data(bench, out, source)
    plan = expand_plan(bench, out, source)
    finished = sum(RunDir(r.run_dir(out)).is_finished() for r in plan.runs)
    _console(stderr=True).print(
        f"benchmark '{plan.name}': {len(plan.runs)} runs ("
        + ", ".join(f"{len(plan.stage(k))} {k}" for k in STAGES)
        + f"), {finished} already finished; "
        f"executor {kind}"
    )
    runner = make_executor(
        kind,
        workers=bench.executor.workers,
        nproc_per_node=bench.executor.nproc_per_node,
        slurm=bench.executor.slurm,
        cluster=cluster,
    )
    summary = runner.run(plan, out)
    print_summary(summary, plan)

    failures = len(summary.failed)
    try:
        from medssl.report import build_report

        build_report(runs_root(out), out / "report")
    except Exception as err:  # noqa: BLE001 - runs are done and kept; say why the report is missing
        _console(stderr=True).print(f"[red]report failed[/]: {type(err).__name__}: {err}")
        failures += 1
    return failures
