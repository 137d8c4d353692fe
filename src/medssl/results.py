"""Finished run directories → tidy tables (results, curves, pretraining) and provenance.

Everything here is read from run directories alone (``run.json``, ``results.json``,
``metrics.jsonl``, ``status.json``); no model is ever loaded and torch is not imported at module
import. Only finished runs count, so copying run directories from several machines into one folder
and reading that folder gives the combined result. A ``runs_root`` may be the ``runs/`` folder of a
benchmark, the benchmark output folder that holds it, or a list of such folders (their union).
"""

from __future__ import annotations

import importlib.metadata
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from medssl.budget import Budget
from medssl.errors import MedsslInputError, UnknownNameError, look_up_option
from medssl.fileio import atomic_path, atomic_write_text
from medssl.runs import RunDir, environment, list_runs
from medssl.version import describe_code_version

RunsRoot = str | Path | Iterable[str | Path]

# Lesion-wise detection of a lesion task (results.json ``lesions``, medssl.evaluate.lesions): in results.csv on
# the rows of the cases whose truth holds that lesion structure, empty elsewhere; lesion_table() has every case.
LESION_COUNTS = ("lesion_tp", "lesion_fp", "lesion_fn")
LESION_RATES = ("lesion_recall", "lesion_precision", "lesion_f1")
LESION_COLUMNS = [*LESION_COUNTS, *LESION_RATES]
# What names a fine-tuning run's cell (``_finetune_keys``): the first columns of every fine-tuning table
FINETUNE_KEY_COLUMNS = ["method", "family", "task", "modality", "budget", "n_train", "seed"]
RESULT_COLUMNS = [*FINETUNE_KEY_COLUMNS, "case", "label", "structure", "dice", "hd95", "nsd", *LESION_COLUMNS, "run_id"]
CURVE_COLUMNS = [*FINETUNE_KEY_COLUMNS, "run_id", "step", "epoch", "val_dice"]
# The health values of a pretraining run (``health/<name>`` in metrics.jsonl, methods/health.py)
HEALTH_COLUMNS = [
    "embedding_rank",
    "embedding_std_scaled",
    "feature_rank",
    "feature_std_scaled",
    "teacher_entropy",
    "teacher_batch_entropy",
    "teacher_entropy_ratio",
    "teacher_batch_entropy_ratio",
]
# What each pretraining run's optimiser got (results.json ``optimiser``, train/pretrain.py)
OPTIMISER_COLUMNS = [
    "recipe",
    "lr",
    "weight_decay",
    "weight_decay_end",
    "grad_clip",
    "warmup_steps",
    "batch_size",
    "negatives_per_step",
    "few_negatives",
    "published_optimizer",
    "lr_rule",
    "lr_from",  # the recipe whose learning-rate point the run used (its own, or another's: SMIT takes iBOT's)
    "epochs",  # steps x batch / corpus volumes
]
COST_FIELDS = (
    "flops_per_step",
    "total_flops",
    "device_hours",
    "devices",
    "device_kind",
    "peak_memory_bytes",
    "peak_memory_kind",
)  # a pretraining run's measured cost (results.json "cost", train/cost.py)
PRETRAIN_COLUMNS = [
    "method",
    "family",
    "preset",
    "crop_size",
    "steps",
    "final_loss",
    "wall_seconds",
    "step_seconds",
    "collapsed",
    "collapse_reason",
    *COST_FIELDS,
    "health_warnings",
    *HEALTH_COLUMNS,
    *OPTIMISER_COLUMNS,
    "run_id",
]
PRETRAIN_CURVE_COLUMNS = [
    "method",
    "family",
    "run_id",
    "step",
    "loss",
    "lr",
    *HEALTH_COLUMNS,
]

# "supervised": the positive control's training run; "probe": frozen-encoder probes (medssl.analysis.transfer)
KINDS = ("pretrain", "finetune", "cka", "probe", "supervised")


@dataclass
class FinishedRun:
    """One finished run: its directory, ``run.json`` and ``results.json``."""

    run: RunDir
    info: dict[str, Any]
    results: dict[str, Any]

    @property
    def run_id(self) -> str:
        return str(self.info.get("run_id") or self.run.id)

    @property
    def kind(self) -> str:
        return str(self.results.get("kind") or self.info.get("kind") or "")

    def get(self, key: str, default: Any = None) -> Any:
        """A field from results.json, else run.json (results are written last, so they win)."""
        value = self.results.get(key)
        if value is None:
            value = self.info.get(key)
        return default if value is None else value


@dataclass
class RunCollection:
    """Every run under one or more roots, split by kind; plus what was left out and why."""

    runs: dict[str, list[FinishedRun]] = field(default_factory=lambda: {k: [] for k in KINDS})
    not_finished: Counter = field(default_factory=Counter)  # status -> count
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (run id, reason)

    @property
    def finetune(self) -> list[FinishedRun]:
        return self.runs["finetune"]

    @property
    def pretrain(self) -> list[FinishedRun]:
        return self.runs["pretrain"]

    @property
    def cka(self) -> list[FinishedRun]:
        return self.runs["cka"]

    def all_runs(self) -> list[FinishedRun]:
        return [r for kind in KINDS for r in self.runs[kind]]


def resolve_roots(runs_root: RunsRoot) -> list[Path]:
    """The folders that hold run directories (``<out>`` is taken to mean ``<out>/runs``)."""
    roots = [runs_root] if isinstance(runs_root, (str, Path)) else list(runs_root)
    resolved = []
    for root in roots:
        path = Path(root)
        if not path.is_dir():
            raise MedsslInputError(path, "runs folder does not exist or is not a directory")
        if (path / "runs").is_dir() and not (path / "run.json").exists():
            path = path / "runs"
        resolved.append(path)
    return resolved


def collect_runs(runs_root: RunsRoot) -> RunCollection:
    """Read every run directory once; keep finished runs with readable results, by kind."""
    collection = RunCollection()
    seen: set[str] = set()
    for root in resolve_roots(runs_root):
        for run in list_runs(root):
            escape = _leaves_root(run, root)
            if escape is not None:  # checked before any file of the run is read
                collection.skipped.append((run.path.name, f"{escape} leads out of {root}: not followed"))
                continue
            if not run.is_finished():
                collection.not_finished[run.status()] += 1
                continue
            info, results = run.info(), run.results()
            if not isinstance(results, dict):
                collection.skipped.append((run.id, "results.json is not a JSON object"))
                continue
            finished = FinishedRun(run, info, results)
            try:
                look_up_option("run kind", finished.kind, KINDS)
            except UnknownNameError as err:
                collection.skipped.append((run.id, err.problem))
                continue
            if finished.kind == "finetune":
                try:
                    Budget.parse(finished.get("budget", "all"))
                except (TypeError, ValueError):
                    budget = finished.get("budget")
                    collection.skipped.append((run.id, f"label budget {budget!r} is neither an integer nor 'all'"))
                    continue
            # The same run id in two copied folders is the same config: count it once.
            if finished.run_id in seen:
                continue
            seen.add(finished.run_id)
            collection.runs[finished.kind].append(finished)
    for run_id, reason in collection.skipped:
        warnings.warn(f"run {run_id} skipped: {reason}", stacklevel=2)
    return collection


def _leaves_root(run: RunDir, root: Path) -> str | None:
    """The run folder, or the first file of it the report reads, when it is a link that resolves
    outside ``root`` (a symlinked run folder or results.json copied in from elsewhere); else None."""
    real_root = root.resolve()
    candidates = [run.path, run.info_path, run.status_path, run.results_path, run.metrics_path, run.config_path]
    for path in candidates:
        if (path == run.path or path.is_symlink()) and not path.resolve().is_relative_to(real_root):
            return "the symlink " + (run.path.name if path == run.path else f"{run.path.name}/{path.name}")
    return None


def _as_collection(runs: RunsRoot | RunCollection) -> RunCollection:
    return runs if isinstance(runs, RunCollection) else collect_runs(runs)


def _float_or_nan(value: Any) -> float:
    try:
        return float(value) if value is not None else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def _typed(frame: pd.DataFrame, columns: list[str], ints: tuple[str, ...] = (), floats: tuple[str, ...] = ()):
    """Fixed columns and dtypes (nullable ints) so an empty table and a full one look alike."""
    frame = frame.reindex(columns=columns)
    for col in ints:
        frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("Int64")
    for col in floats:
        frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("float64")
    return frame


def _finetune_keys(run: FinishedRun) -> dict[str, Any]:
    return {
        "method": str(run.get("method", "unknown")),
        "family": str(run.get("family", "unknown")),
        "task": str(run.get("task", "unknown")),
        "modality": str(run.get("modality", "unknown")).lower(),
        "budget": Budget.parse(run.get("budget", "all")).label,
        "n_train": run.get("n_train"),
        "seed": run.get("seed", 0),
    }


def _lesion_rows(run: FinishedRun) -> dict[tuple[str, Any], dict[str, Any]]:
    """results.json ``lesions`` by (case, label)."""
    rows = run.results.get("lesions")
    found: dict[tuple[str, Any], dict[str, Any]] = {}
    for row in rows if isinstance(rows, list) else []:
        if isinstance(row, dict):
            found[(str(row.get("case")), row.get("label"))] = row
    return found


def results_table(runs_root: RunsRoot | RunCollection) -> pd.DataFrame:
    """One row per finished fine-tune run × test case × structure (columns ``RESULT_COLUMNS``)."""
    rows = []
    for run in _as_collection(runs_root).finetune:
        keys = _finetune_keys(run)
        labels = run.results.get("labels") or {}
        lesions = _lesion_rows(run)
        for case in run.results.get("cases") or []:
            label = case.get("label")
            lesion = lesions.get((str(case.get("case")), label), {})
            rows.append(
                {
                    **keys,
                    "case": str(case.get("case")),
                    "label": label,
                    "structure": str(case.get("structure") or labels.get(str(label), label)),
                    "dice": _float_or_nan(case.get("dice")),
                    "hd95": _float_or_nan(case.get("hd95")),
                    "nsd": _float_or_nan(case.get("nsd")),
                    **{col: _float_or_nan(lesion.get(col)) for col in LESION_COLUMNS},
                    "run_id": run.run_id,
                }
            )
    frame = _typed(
        pd.DataFrame(rows),
        RESULT_COLUMNS,
        ints=("n_train", "seed", "label", *LESION_COUNTS),
        floats=("dice", "hd95", "nsd", *LESION_RATES),
    )
    return frame.sort_values(["task", "method", "budget", "seed", "case", "label"], kind="stable", ignore_index=True)


LESION_TABLE_COLUMNS = [
    *FINETUNE_KEY_COLUMNS,
    *("case", "label", "structure", "n_true_lesions", "n_pred_lesions"),
    *LESION_COLUMNS,
    "run_id",
]


def lesion_table(runs_root: RunsRoot | RunCollection) -> pd.DataFrame:
    """One row per finished fine-tune run of a lesion task × test case × lesion structure, lesion-free cases
    included (their false positives count); recall/precision/F1 NaN where undefined (no true or no predicted
    lesion), to be left out of means."""
    rows = []
    for run in _as_collection(runs_root).finetune:
        keys = _finetune_keys(run)
        for row in _lesion_rows(run).values():
            rows.append(
                {
                    **keys,
                    "case": str(row.get("case")),
                    "label": row.get("label"),
                    "structure": str(row.get("structure")),
                    **{c: _float_or_nan(row.get(c)) for c in ("n_true_lesions", "n_pred_lesions", *LESION_COLUMNS)},
                    "run_id": run.run_id,
                }
            )
    frame = _typed(
        pd.DataFrame(rows),
        LESION_TABLE_COLUMNS,
        ints=("n_train", "seed", "label", "n_true_lesions", "n_pred_lesions", *LESION_COUNTS),
        floats=LESION_RATES,
    )
    return frame.sort_values(["task", "method", "budget", "seed", "case", "label"], kind="stable", ignore_index=True)


def curves_table(runs_root: RunsRoot | RunCollection) -> pd.DataFrame:
    """Validation curves of finished fine-tune runs, one row per validation (``CURVE_COLUMNS``).

    From ``results.json``'s ``val_curve``; a run without one falls back to the validation records of
    its ``metrics.jsonl``.
    """
    rows = []
    for run in _as_collection(runs_root).finetune:
        keys = _finetune_keys(run)
        curve = run.results.get("val_curve")
        if not curve:
            curve = [r for r in run.run.read_metrics() if r.get("val_dice") is not None]
        for point in curve:
            rows.append(
                {
                    **keys,
                    "run_id": run.run_id,
                    "step": point.get("step"),
                    "epoch": _float_or_nan(point.get("epoch")),
                    "val_dice": _float_or_nan(point.get("val_dice")),
                }
            )
    frame = _typed(pd.DataFrame(rows), CURVE_COLUMNS, ints=("n_train", "seed", "step"), floats=("epoch", "val_dice"))
    return frame.sort_values(["task", "method", "budget", "seed", "step"], kind="stable", ignore_index=True)


RECIPE_FIELDS = {  # column -> path in a fine-tuning run's config.yaml
    "steps": ("schedule", "steps"),
    "batch_size": ("schedule", "batch_size"),
    "lr": ("schedule", "lr"),
    "min_lr": ("schedule", "min_lr"),
    "warmup_steps": ("schedule", "warmup_steps"),
    "loss": ("loss",),
    "crop_sampling": ("crop_sampling",),
    "crop_size": ("crop_size",),
    "flip_prob": ("augment", "flip_prob"),
    "rot90_prob": ("augment", "rot90_prob"),
    "val_every": ("val_every",),
    "sw_overlap": ("sw_overlap",),
    "encoder_lr_scale": ("encoder_lr_scale",),
    "layer_decay": ("layer_decay",),
    "freeze_encoder_steps": ("freeze_encoder_steps",),
    "early_stop_patience": ("early_stop_patience",),
}


def _config_value(config: dict[str, Any], path: tuple[str, ...]) -> Any:
    """The value at ``path`` ("off" for a recorded null), or None when the config does not record it."""
    node: Any = config
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return "off" if node is None else node


def finetune_recipes(runs_root: RunsRoot | RunCollection) -> pd.DataFrame:
    """The fine-tuning recipes in use, per task, read from each run's ``config.yaml``: one row per
    distinct (task, recipe) with the number of runs, so a reader sees what every encoder was given."""
    rows = []
    for run in _as_collection(runs_root).finetune:
        try:
            config = yaml.safe_load(run.run.config_path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            config = None
        config = config if isinstance(config, dict) else {}
        row = {"task": str(run.get("task", "unknown"))}
        row.update({column: _config_value(config, path) for column, path in RECIPE_FIELDS.items()})
        rows.append({k: ("not recorded" if v is None else str(v)) for k, v in row.items()})
    columns = ["task", *RECIPE_FIELDS]
    if not rows:
        return pd.DataFrame(columns=[*columns, "runs"])
    frame = pd.DataFrame(rows, columns=columns)
    return frame.groupby(columns, sort=True).size().reset_index(name="runs")


def pretrain_table(runs_root: RunsRoot | RunCollection) -> pd.DataFrame:
    """One row per finished pretraining run (``PRETRAIN_COLUMNS``): the health verdict and final health
    values, and what its optimiser got. Runs written before the health verdict carry their ``collapse``
    block's verdict and no health values."""
    rows = []
    for run in _as_collection(runs_root).pretrain:
        cost = run.results.get("cost") or {}
        health = run.results.get("health") or run.results.get("collapse") or {}
        final = health.get("final") or {}
        optimiser = run.results.get("optimiser") or {}
        rows.append(
            {
                "method": str(run.get("method", "unknown")),
                "family": str(run.get("family", "unknown")),
                "preset": run.info.get("preset"),
                "crop_size": run.info.get("crop_size"),
                "steps": run.get("steps"),
                "final_loss": _float_or_nan(run.results.get("final_loss")),
                "wall_seconds": _float_or_nan(run.results.get("wall_seconds")),
                "step_seconds": _float_or_nan(run.results.get("step_seconds")),
                "collapsed": bool(health.get("collapsed", False)),
                "collapse_reason": health.get("reason"),
                "health_warnings": "; ".join(health.get("warnings") or []) or None,
                **{k: _float_or_nan(final.get(f"health/{k}")) for k in HEALTH_COLUMNS},
                **{k: optimiser.get(k) for k in OPTIMISER_COLUMNS},
                **{k: cost.get(k) for k in COST_FIELDS},
                "run_id": run.run_id,
            }
        )
    frame = _typed(
        pd.DataFrame(rows),
        PRETRAIN_COLUMNS,
        ints=("crop_size", "steps", "devices"),
        floats=(
            "final_loss",
            "wall_seconds",
            "step_seconds",
            *HEALTH_COLUMNS,
            "flops_per_step",
            "total_flops",
            "device_hours",
            "peak_memory_bytes",
        ),
    )
    frame["collapsed"] = frame["collapsed"].astype(bool)
    return frame.sort_values(["method", "run_id"], kind="stable", ignore_index=True)


def pretrain_curves(runs_root: RunsRoot | RunCollection) -> pd.DataFrame:
    """Training-loss and health curves of finished pretraining runs from ``metrics.jsonl``."""
    rows = []
    for run in _as_collection(runs_root).pretrain:
        method, family = str(run.get("method", "unknown")), str(run.get("family", "unknown"))
        for record in run.run.read_metrics():
            if record.get("loss") is None or record.get("step") is None:
                continue
            rows.append(
                {
                    "method": method,
                    "family": family,
                    "run_id": run.run_id,
                    "step": record["step"],
                    "loss": _float_or_nan(record.get("loss")),
                    "lr": _float_or_nan(record.get("lr")),
                    **{k: _float_or_nan(record.get(f"health/{k}")) for k in HEALTH_COLUMNS},
                }
            )
    frame = _typed(
        pd.DataFrame(rows),
        PRETRAIN_CURVE_COLUMNS,
        ints=("step",),
        floats=("loss", "lr", *HEALTH_COLUMNS),
    )
    return frame.sort_values(["method", "run_id", "step"], kind="stable", ignore_index=True)


def cka_runs(runs_root: RunsRoot | RunCollection) -> list[dict[str, Any]]:
    """The results of finished CKA runs (5×5 matrices, reuse scores), each with its ``run_id``."""
    out = []
    for run in _as_collection(runs_root).cka:
        record = {k: v for k, v in run.info.items() if k not in run.results}
        record.update(run.results)
        record["run_id"] = run.run_id
        out.append(record)
    return sorted(out, key=lambda r: (str(r.get("task")), str(r.get("method")), str(r.get("comparison")), r["run_id"]))


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def provenance(runs_root: RunsRoot | RunCollection) -> dict[str, Any]:
    """Versions, hardware, per-run config hashes and code versions, wall time per stage."""
    collection = _as_collection(runs_root)
    runs = {}
    wall: dict[str, float] = {kind: 0.0 for kind in KINDS}
    for run in collection.all_runs():
        runs[run.run_id] = {
            "kind": run.kind,
            "method": run.get("method"),
            "config_hash": run.info.get("config_hash"),
            "code_version": run.info.get("code_version"),
            "created": run.info.get("created"),
            "wall_seconds": run.results.get("wall_seconds"),
        }
        seconds = _float_or_nan(run.results.get("wall_seconds"))
        if seconds == seconds:  # not NaN
            wall[run.kind] += seconds
    return {
        "packages": {name: _package_version(name) for name in ("medssl", "torch", "monai", "numpy")},
        "hardware": environment(),  # the report's host, probed as every run probes its own
        "code_versions": sorted({describe_code_version(r["code_version"]) for r in runs.values() if r["code_version"]}),
        "commits": sorted(
            {
                str(r["code_version"]["commit"])
                for r in runs.values()
                if isinstance(r["code_version"], dict) and r["code_version"].get("commit")
            }
        ),
        # What the runs themselves recorded about their machines, when they did.
        "run_hardware": sorted(
            {str(run.info.get(k)) for run in collection.all_runs() for k in ("hardware", "device") if run.info.get(k)}
        ),
        "runs": runs,
        "finetune_recipes": finetune_recipes(collection).to_dict(orient="records"),
        "n_runs": {kind: len(collection.runs[kind]) for kind in KINDS},
        "wall_seconds": wall,
        "not_finished": dict(collection.not_finished),
        "skipped": [{"run_id": run_id, "reason": reason} for run_id, reason in collection.skipped],
    }


def write_tables(runs_root: RunsRoot | RunCollection, out_dir: str | Path) -> dict[str, Path]:
    """Write ``results.csv``, ``results.parquet``, ``curves.csv`` and ``pretrain.csv`` into ``out_dir``."""
    collection = _as_collection(runs_root)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = results_table(collection)
    paths = {
        "results.csv": out / "results.csv",
        "results.parquet": out / "results.parquet",
        "curves.csv": out / "curves.csv",
        "pretrain.csv": out / "pretrain.csv",
    }
    atomic_write_text(paths["results.csv"], results.to_csv(index=False))
    with atomic_path(paths["results.parquet"]) as tmp:
        results.to_parquet(tmp, index=False)
    atomic_write_text(paths["curves.csv"], curves_table(collection).to_csv(index=False))
    atomic_write_text(paths["pretrain.csv"], pretrain_table(collection).to_csv(index=False))
    return paths
