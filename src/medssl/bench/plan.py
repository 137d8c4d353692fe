"""Expand a benchmark config into a plan of runs: pretrain -> finetune -> cka.

Every run is a fully resolved config (a pydantic model with absolute paths) of its kind
(``medssl.bench.kinds.RUN_KINDS``) and its run id is ``<kind>-<slug>-<config_hash12>``; the hash is
computed once, where the id is made, and stored on the planned run. A fine-tune config holds the
path of its encoder checkpoint, which lies in the pretrain run's directory, so a change to a
pretraining recipe changes the ids of every run downstream of it and nothing is mistaken for finished.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medssl.config import (
    FINETUNE_PLANNED_FIELDS,
    IDENTITY_TRANSFORMER,
    RANDOM_INIT,
    SUPERVISED,
    BenchConfig,
    Budget,
    CKARunConfig,
    FinetuneConfig,
    MethodConfig,
    PretrainConfig,
    ProbeRunConfig,
    SynthDataConfig,
    config_hash,
    deep_merge,
    validate_config,
)
from medssl.errors import ConfigError, look_up_option
from medssl.runs import BenchDir, RunDir, atomic_write_json

from .kinds import STAGES, RunConfig, run_kind

REAL_CT_PATH = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
"""The real head CT (Debian's invesalius-examples) a benchmark's corpus takes when ``data.include_real_ct``."""

_COMPARISON_SLUGS = {"pretrained_vs_finetuned": "pvf", "fewshot_vs_manyshot": "fvm"}


@dataclass
class PlannedRun:
    kind: str  # a key of medssl.bench.kinds.RUN_KINDS
    run_id: str
    config: RunConfig  # the kind's config model
    config_hash: str  # config_hash(config), the last part of run_id
    depends_on: list[str] = field(default_factory=list)
    labels: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def make(cls, kind: str, slug: str, config: RunConfig, depends_on: list[str], labels: dict[str, Any]) -> PlannedRun:
        """A run of ``kind`` whose id is made from ``slug`` and the config's hash (computed here, once)."""
        run_kind(kind)  # a ValueError for a kind the table does not have
        digest = config_hash(config)
        return cls(kind, make_run_id(kind, slug, digest), config, digest, list(depends_on), dict(labels))

    def run_dir(self, out: str | Path) -> Path:
        return runs_root(out) / self.run_id

    def describe(self) -> str:
        """A short human label: ``finetune simmim ct_organs budget 5 seed 0``."""
        parts = [str(self.labels.get(k)) for k in ("method", "task") if self.labels.get(k) is not None]
        if "budget" in self.labels:
            parts.append(f"budget {self.labels['budget']}")
        if "seed" in self.labels:
            parts.append(f"seed {self.labels['seed']}")
        if "comparison" in self.labels:
            parts.append(self.labels["comparison"])
        return f"{self.kind} " + " ".join(parts)


@dataclass
class Plan:
    name: str
    out: Path
    runs: list[PlannedRun]

    def by_id(self) -> dict[str, PlannedRun]:
        return {r.run_id: r for r in self.runs}

    def stage(self, kind: str) -> list[PlannedRun]:
        return [r for r in self.runs if r.kind == kind]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "name": self.name,
            "out": str(self.out),
            "stages": {kind: len(self.stage(kind)) for kind in STAGES},
            "runs": [
                {
                    "run_id": r.run_id,
                    "kind": r.kind,
                    "config_hash": r.config_hash,
                    "depends_on": r.depends_on,
                    "labels": r.labels,
                    "config": r.config.model_dump(mode="json"),
                }
                for r in self.runs
            ],
        }


@dataclass
class ResolvedTask:
    name: str
    path: Path
    synth_kind: str | None
    finetune: dict[str, Any] = field(default_factory=dict)  # this task's fine-tuning settings
    budgets: list[Budget] | None = None  # this task's budgets (None: the benchmark's)

    def budget_list(self, bench: BenchConfig) -> list[Budget]:
        """The task's budgets, smallest first (``all`` last)."""
        return sorted(self.budgets if self.budgets is not None else bench.budgets)  # all last


# --------------------------------------------------------------------------- layout


def runs_root(out: str | Path) -> Path:
    return BenchDir(out).runs


def synth_data_dir(out: str | Path) -> Path:
    return BenchDir(out).data


def is_ingested_corpus(path: Path) -> bool:
    return (path / "manifest.json").is_file()


def corpus_dir(bench: BenchConfig, out: str | Path) -> Path:
    """Where the pretraining corpus lives: a given ingested corpus, else ``<out>/corpus``."""
    corpus = bench.data.corpus
    if isinstance(corpus, list) and len(corpus) == 1 and is_ingested_corpus(Path(corpus[0])):
        return Path(corpus[0]).resolve()
    return BenchDir(out).corpus


def resolve_tasks(bench: BenchConfig, out: str | Path, source: str | Path | None = None) -> list[ResolvedTask]:
    tasks = []
    for entry in bench.tasks:
        kind = entry.synth_kind
        path = synth_data_dir(out) / kind if kind else Path(entry.path).resolve()
        # an explicit name is a validated slug (config.py); a folder's name is made into one
        name = entry.name or kind or slugify(path.name)
        tasks.append(
            ResolvedTask(name=name, path=path, synth_kind=kind, finetune=entry.finetune, budgets=entry.budgets)
        )
    names = [t.name for t in tasks]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ConfigError(
            source or "<bench config>",
            f"tasks: name '{duplicated[0]}' is used twice; give the tasks distinct 'name' fields",
        )
    return tasks


def resolve_methods(bench: BenchConfig, source: str | Path | None = None) -> list[MethodConfig]:
    """The configured methods, validated against the registry ("all" = every registered one)."""
    from medssl.methods import REGISTRY

    where = source or "<bench config>"
    methods = [MethodConfig(name=name) for name in REGISTRY] if bench.methods == "all" else bench.method_configs()
    seen: set[str] = set()
    for method in methods:
        look_up_option("method", method.name, sorted(REGISTRY), source=f"{where}: methods")
        if method.name in seen:
            raise ConfigError(where, f"methods: '{method.name}' is listed twice")
        seen.add(method.name)
        try:
            REGISTRY[method.name].parse_params(method.options)
        except ConfigError as err:
            raise ConfigError(where, f"methods: {err.one_line()}") from None
    return methods


def check_budgets(task: ResolvedTask, bench: BenchConfig, source: str | Path | None = None) -> int | None:
    """The task's training pool size, after checking every budget fits in it (None: task absent)."""
    where = source or "<bench config>"
    n_test, n_val = bench.finetune.n_test, bench.finetune.n_val
    if task.path.exists():
        from medssl.data.tasks import load_task

        n_cases = len(load_task(task.path).cases)
    elif task.synth_kind is not None:
        n_cases = bench.data.synth.cases if bench.data.synth is not None else _default_synth_cases()
    else:
        return None  # a user task not present yet (e.g. a dry run of a cluster config): checked when it runs
    pool = n_cases - n_test - n_val
    if pool < 1:
        raise ConfigError(
            where,
            f"task '{task.name}' has {n_cases} cases: not enough for n_test={n_test}, "
            f"n_val={n_val} and at least one training case",
        )
    too_large = [b for b in task.budget_list(bench) if b.cases is not None and b.cases > pool]
    if too_large:
        raise ConfigError(
            where,
            f"budget {too_large[0]} exceeds the training pool of task '{task.name}' "
            f"({pool} cases = {n_cases} - {n_test} test - {n_val} validation)",
        )
    return pool


def _default_synth_cases() -> int:
    from medssl.config import SynthDataConfig

    return SynthDataConfig().cases


# --------------------------------------------------------------------------- controls


def control_data_seed(bench: BenchConfig) -> int:
    """The anatomy seed of the supervised control's phantoms: the study's data seed plus the control's
    ``seed_offset`` (>= 1, so never the study's own: no study case is among them)."""
    synth = bench.data.synth or SynthDataConfig()
    return (synth.seed + bench.controls.supervised.seed_offset) % 2**32


def control_task_name(bench: BenchConfig) -> str:
    return f"control_{bench.controls.supervised.task}"


def control_task_dir(bench: BenchConfig, out: str | Path) -> Path:
    """Where the control's labelled phantoms are written (``<out>/data/control/<kind>``)."""
    return synth_data_dir(out) / "control" / bench.controls.supervised.task


def needs_control_data(bench: BenchConfig) -> bool:
    """The supervised control trains on the control phantoms, and an online probe without its own task
    is scored on them."""
    probe = bench.pretrain.probe
    return bench.controls.supervised.enabled or (probe.every is not None and probe.task is None)


@dataclass
class EncoderRow:
    """A row of the study: how its fine-tuning (and probe) runs get their encoder."""

    method: str
    family: str
    checkpoint: Path | None = None
    depends_on: str | None = None  # the run that writes the checkpoint
    finetune: dict[str, Any] = field(default_factory=dict)  # finetune fields of this row only


def _supervised_control(bench: BenchConfig, out: Path, where: str | Path) -> tuple[PlannedRun, EncoderRow]:
    """The supervised control's training run (kind ``supervised``) and its row."""
    control = bench.controls.supervised
    bench_dir = BenchDir(out)
    section = deep_merge(bench.finetune.model_dump(mode="json"), control.finetune)
    planned = sorted(FINETUNE_PLANNED_FIELDS & set(control.finetune))
    if planned:
        raise ConfigError(where, f"controls.supervised.finetune.{planned[0]} is set by the benchmark")
    data = {
        **section,
        "task": str(control_task_dir(bench, out)),
        "cache_dir": str(bench_dir.cache),
        "splits_path": str(bench_dir.splits_file(control_task_name(bench))),
        "encoder_checkpoint": None,
        "encoder": bench.encoder.model_dump(mode="json"),
        "budget": "all",
        "seed": bench.seeds[0],
        "n_test": control.n_test,
        "n_val": control.n_val,
        "preprocess": bench.preprocess.model_dump(mode="json"),
        "limits": bench.limits.model_dump(),
    }
    try:
        config = validate_config(FinetuneConfig, data, where)
    except ConfigError as err:
        raise ConfigError(where, f"controls.supervised: {err.problem}") from None
    labels = {"method": SUPERVISED, "family": SUPERVISED, "task": control_task_name(bench)}
    run = PlannedRun.make("supervised", f"{SUPERVISED}-{control.task}", config, [], labels)
    return run, EncoderRow(SUPERVISED, SUPERVISED, RunDir(run.run_dir(out)).encoder_path, run.run_id)


# --------------------------------------------------------------------------- run ids


def slugify(text: str) -> str:
    """A path-safe name: no separators, no '..', no leading dot, at most 64 characters."""
    text = re.sub(r"\.{2,}", "_", re.sub(r"[^A-Za-z0-9_.-]+", "_", text))
    return text.strip("_-.")[:64].rstrip("_-.") or "run"


def make_run_id(kind: str, slug: str, digest: str) -> str:
    """``<kind>-<slug>-<digest>``; ``digest`` is the run config's ``config_hash``."""
    return f"{kind}-{slugify(slug)}-{digest}"


# --------------------------------------------------------------------------- expansion


def shared_schedule_scaled(bench: BenchConfig, method: str) -> dict[str, Any]:
    """A method's ``lr_scale`` applied to the shared schedule (lr and min_lr), and recorded in its config."""
    scale = bench.method_lr_scale(method)
    if scale == 1.0:
        return {}
    schedule = bench.pretrain.schedule
    return {
        # rounded to 12 digits: 1e-5 x 0.1 is 1e-6 in the config, not 1.0000000000000002e-06
        "schedule": {
            **schedule.model_dump(mode="json"),
            "lr": float(f"{schedule.lr * scale:.12g}"),
            "min_lr": float(f"{schedule.min_lr * scale:.12g}"),
        },
        "shared_lr_scale": scale,
    }


def expand_plan(bench: BenchConfig, out: str | Path, source: str | Path | None = None) -> Plan:
    """Every run of the benchmark, in stage order, with dependencies; writes ``<out>/plan.json``.

    A pretraining run's config holds every option of its method (``resolve_method_config``) and the schedule
    its recipe resolves to (``pretrain.recipe``, or the method's own ``recipe`` in ``methods``)."""
    from medssl.methods import REGISTRY
    from medssl.methods.base import resolve_method_config

    out = Path(out).resolve()
    where = source or "<bench config>"
    methods = resolve_methods(bench, source)
    tasks = resolve_tasks(bench, out, source)
    for task in tasks:
        check_budgets(task, bench, source)
    corpus = corpus_dir(bench, out)
    bench_dir = BenchDir(out)

    runs: list[PlannedRun] = []
    encoders: dict[str, tuple[Path | None, str | None]] = {}  # method -> (encoder.pt, pretrain run id)
    for method in methods:
        family = REGISTRY[method.name].family
        if method.name == RANDOM_INIT:
            encoders[method.name] = (None, None)
            continue
        data = {
            **_with_probe_task(bench.pretrain.model_dump(mode="json"), bench, out),
            **shared_schedule_scaled(bench, method.name),
            "recipe": bench.method_recipe(method.name),
            # every option spelled out: the method as it will run, in the run's config and its hash
            "method": resolve_method_config(method).model_dump(mode="json"),
            "encoder": bench.encoder.model_dump(mode="json"),
            "corpus": str(corpus),
            "preprocess": bench.preprocess.model_dump(mode="json"),
            "limits": bench.limits.model_dump(),
        }
        config = validate_config(PretrainConfig, data, where)
        pretrain = PlannedRun.make("pretrain", method.name, config, [], {"method": method.name, "family": family})
        runs.append(pretrain)
        encoders[method.name] = (RunDir(pretrain.run_dir(out)).encoder_path, pretrain.run_id)

    families = {method.name: REGISTRY[method.name].family for method in methods}
    methods = methods + _external_encoders(bench, out, encoders, families, where)
    # every encoder is probed; only ``finetune_methods`` (default: all) are fine-tuned
    probed = [EncoderRow(m.name, families[m.name], *encoders[m.name]) for m in methods]
    methods = _finetuned(methods, bench.finetune_methods, where)
    rows = [EncoderRow(m.name, families[m.name], *encoders[m.name]) for m in methods]
    if bench.controls.supervised.enabled:
        control_run, control_row = _supervised_control(bench, out, where)
        runs.append(control_run)
        rows.append(control_row)
        probed.append(control_row)
    if bench.controls.identity_transformer:
        # fine-tuned only: it has no encoder to probe
        rows.append(EncoderRow(IDENTITY_TRANSFORMER, "control", finetune={"transformer": "identity"}))

    finetunes: dict[tuple[str, str, str, int], PlannedRun] = {}
    for row in rows:
        for task in tasks:
            for budget in task.budget_list(bench):
                for seed in bench.seeds:
                    finetune = _finetune_config(bench, out, task, budget, seed, row, where)
                    labels: dict[str, Any] = {"method": row.method, "family": row.family, "task": task.name}
                    labels |= {"budget": str(budget), "seed": seed}
                    slug = f"{row.method}-{task.name}-b{budget}-s{seed}"
                    deps = [row.depends_on] if row.depends_on else []
                    run = PlannedRun.make("finetune", slug, finetune, deps, labels)
                    runs.append(run)
                    finetunes[(row.method, task.name, str(budget), seed)] = run

    if bench.probe.enabled:
        runs += _probe_runs(bench, out, probed, tasks, where)

    if bench.cka.enabled:
        runs += _cka_runs(bench, out, methods, tasks, finetunes, encoders, where)

    plan = Plan(name=bench.name, out=out, runs=runs)
    write_plan(plan, bench_dir.plan)
    return plan


def _external_encoders(
    bench: BenchConfig,
    out: Path,
    encoders: dict[str, tuple[Path | None, str | None]],
    families: dict[str, str],
    where: str | Path,
) -> list[MethodConfig]:
    """Encoders pretrained elsewhere, each converted once into ``<out>/external/`` and fine-tuned as
    its own row ``external-<name>`` of its declared family (``external``, or ``supervised``)
    (``medssl.models.foreign``); no pretraining run."""
    from medssl.models.foreign import external_method, import_external_encoder

    added = []
    for external in bench.external_encoders:
        label = external_method(external.name)
        if label in encoders:
            raise ConfigError(where, f"external_encoders: name '{external.name}' is used twice")
        encoders[label] = (
            import_external_encoder(external.path, external.name, out / "external", family=external.family),
            None,
        )
        families[label] = external.family
        added.append(MethodConfig(name=label))
    return added


def _finetuned(methods: list[MethodConfig], names: list[str] | None, where: str | Path) -> list[MethodConfig]:
    """The encoders that are fine-tuned: ``finetune_methods`` (in the order of ``methods``), or all."""
    if names is None:
        return methods
    known = [m.name for m in methods]
    for name in names:
        look_up_option("method", name, known, source=f"{where}: finetune_methods")
    if len(set(names)) != len(names):
        raise ConfigError(where, "finetune_methods: a method is listed twice")
    return [m for m in methods if m.name in names]


def _with_probe_task(pretrain: dict[str, Any], bench: BenchConfig, out: Path) -> dict[str, Any]:
    """The pretraining section with the online probe's task and cache filled in: the control phantoms,
    held out from every study task, unless the benchmark names its own probe task."""
    probe = dict(pretrain.get("probe") or {})
    if probe.get("every") is not None and probe.get("task") is None:
        probe["task"] = str(control_task_dir(bench, out))
    if probe.get("every") is not None and probe.get("cache_dir") is None:
        probe["cache_dir"] = str(BenchDir(out).cache)
    return {**pretrain, "probe": probe}


def _probe_runs(
    bench: BenchConfig,
    out: Path,
    rows: list[EncoderRow],
    tasks: list[ResolvedTask],
    where: str | Path,
) -> list[PlannedRun]:
    """A probe run per encoder row x task x budget x seed, on the split, cache and preprocessing that the
    fine-tuning run of the same row, task, budget and seed has (whether or not that row is fine-tuned)."""
    wanted = bench.probe.budgets
    if wanted is not None:
        known = {b for task in tasks for b in task.budget_list(bench)}
        unknown = [b for b in wanted if b not in known]
        if unknown:
            raise ConfigError(where, f"probe.budgets: {unknown[0]} is not a budget of any task")
    head = bench.probe.model_dump(mode="json", exclude={"enabled", "budgets"})
    runs = []
    for row in rows:
        for task in tasks:
            # a task's own budgets, or those of probe.budgets among them (smallest first, all last)
            budgets = [b for b in task.budget_list(bench) if wanted is None or b in wanted]
            for budget in budgets:
                for seed in bench.seeds:
                    finetune = _finetune_config(bench, out, task, budget, seed, row, where)
                    data = {
                        "task": str(finetune.task),
                        "encoder_checkpoint": str(row.checkpoint) if row.checkpoint else None,
                        "cache_dir": str(finetune.cache_dir),
                        "splits_path": str(finetune.splits_path),
                        "encoder": finetune.encoder.model_dump(mode="json"),
                        "budget": budget,
                        "seed": seed,
                        "crop_size": finetune.crop_size,
                        "preprocess": finetune.preprocess.model_dump(mode="json"),
                        "n_test": finetune.n_test,
                        "n_val": finetune.n_val,
                        "probe": head,
                        "limits": bench.limits.model_dump(),
                    }
                    config = validate_config(ProbeRunConfig, data, where)
                    labels = {
                        "method": row.method,
                        "family": row.family,
                        "task": task.name,
                        "budget": str(budget),
                        "seed": seed,
                    }
                    slug = f"{row.method}-{task.name}-b{budget}-s{seed}"
                    deps = [row.depends_on] if row.depends_on else []
                    runs.append(PlannedRun.make("probe", slug, config, deps, labels))
    return runs


def _task_finetune_config(data: dict[str, Any], task: ResolvedTask, where: str | Path) -> FinetuneConfig:
    planned = sorted(FINETUNE_PLANNED_FIELDS & set(task.finetune))
    if planned:
        raise ConfigError(where, f"tasks: '{task.name}' finetune.{planned[0]} is set by the benchmark, not per task")
    try:
        return validate_config(FinetuneConfig, data, where)
    except ConfigError as err:
        if not task.finetune:
            raise
        raise ConfigError(where, f"tasks: '{task.name}' (with its finetune settings): {err.problem}") from None


def _finetune_config(
    bench: BenchConfig, out: Path, task: ResolvedTask, budget: Budget, seed: int, row: EncoderRow, where: str | Path
) -> FinetuneConfig:
    """The fine-tuning config of one row x task x budget x seed (a probe run takes its split, cache and
    preprocessing from the same config)."""
    bench_dir = BenchDir(out)
    section = deep_merge(bench.finetune.model_dump(mode="json"), task.finetune)
    section["schedule"] = {**section["schedule"], "seed": seed}  # a seed varies init and data order
    data = {
        **section,
        "task": str(task.path),
        "cache_dir": str(bench_dir.cache),
        "splits_path": str(bench_dir.splits_file(task.name)),
        "encoder_checkpoint": str(row.checkpoint) if row.checkpoint else None,
        "encoder": bench.encoder.model_dump(mode="json"),
        "budget": budget,
        "seed": seed,
        "preprocess": bench.preprocess.model_dump(mode="json"),
        "limits": bench.limits.model_dump(),
        **row.finetune,
    }
    return _task_finetune_config(data, task, where)


def _cka_runs(
    bench: BenchConfig,
    out: Path,
    methods: list[MethodConfig],
    tasks: list[ResolvedTask],
    finetunes: dict[tuple[str, str, str, int], PlannedRun],
    encoders: dict[str, tuple[Path | None, str | None]],
    where: str | Path,
) -> list[PlannedRun]:
    """Per method (not random init) x task, first seed: pretrained <-> fine-tuned at the largest
    budget, and fine-tuned at the smallest <-> the largest budget (when they differ). The config
    is the CKA run's own (its hash is the run's ``config_hash``); the volume cache is the
    benchmark's ``<out>/cache``, shared with the fine-tuning runs."""
    for name in bench.cka.tasks or []:
        look_up_option("task", name, [t.name for t in tasks], source=f"{where}: cka.tasks")
    seed = bench.seeds[0]
    runs = []
    for method in methods:
        if method.name == RANDOM_INIT:
            continue
        encoder_path, pretrain_id = encoders[method.name]
        for task in tasks:
            if bench.cka.tasks is not None and task.name not in bench.cka.tasks:
                continue
            budgets = task.budget_list(bench)
            smallest, largest = str(budgets[0]), str(budgets[-1])
            many = finetunes[(method.name, task.name, largest, seed)]
            pairs = [("pretrained_vs_finetuned", encoder_path, [pretrain_id], many)]
            if smallest != largest:
                few = finetunes[(method.name, task.name, smallest, seed)]
                pairs.append(("fewshot_vs_manyshot", _best_model(few, out), [few.run_id], many))
            for comparison, model_a, deps, run_b in pairs:
                config = validate_config(
                    CKARunConfig,
                    {
                        "model_a": str(model_a),
                        "model_b": str(_best_model(run_b, out)),
                        "task": str(task.path),
                        "cache_dir": str(BenchDir(out).cache),
                        "comparison": comparison,
                        "method": method.name,
                        "n_crops": bench.cka.n_crops,
                        "crop_size": bench.cka.crop_size,
                        "batch_size": bench.cka.batch_size,
                        "seed": seed,
                        "limits": bench.limits.model_dump(),
                    },
                    where,
                )
                slug = f"{method.name}-{task.name}-{_COMPARISON_SLUGS[comparison]}"
                runs.append(
                    PlannedRun.make(
                        "cka",
                        slug,
                        config,
                        [d for d in deps if d] + [run_b.run_id],
                        {"method": method.name, "task": task.name, "comparison": comparison},
                    )
                )
    return runs


def _best_model(run: PlannedRun, out: Path) -> Path:
    """The fine-tuned model a finished fine-tune run leaves (its results.json ``model``)."""
    return RunDir(run.run_dir(out)).checkpoint_dir / "best.pt"


def write_plan(plan: Plan, path: str | Path) -> None:
    atomic_write_json(path, plan.to_json())
