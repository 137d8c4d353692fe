"""The run directory (layout, atomic writes, status, a lock) and the one lifecycle every run kind goes through.

Layout of ``<out>/runs/<run-id>/``::

    config.yaml        resolved config of the run (written once, when the work starts)
    run.json           kind (pretrain/finetune/cka/probe), id, config hash, method/task/budget/seed, timings
    status.json        {"status": pending|running|finished|failed, "error": ..., "updated": ...}
    log.txt            human-readable log
    metrics.jsonl      one JSON object per logged step (train losses, validation Dice, ...)
    tensorboard/       the same scalars as TensorBoard event files (``tensorboard --logdir <out>/runs``)
    results.json       final results (finetune: per-case test metrics; pretrain: encoder path, ...)
    checkpoints/       last.pt (resume state), best.pt, encoder.pt

A finished run is never rewritten. Every file is written via a temporary file and ``os.replace``
so a crash leaves either the old or the new content, never half of one.

The lifecycle (:func:`perform_run`). A kind's entry point builds its config and calls
``perform_run(run, config, open_work, identity=..., is_main=..., world_size=...)``; ``open_work()``
opens and checks the run's inputs and returns a :class:`RunWork` (``kind``, the ``info`` run.json
records, and ``body(started) -> results``); training kinds call it through
``medssl.train.entry.perform_training_run``, which sets the limits and joins the process group first.
``perform_run`` then, in this order:

1. refuses (``ConfigError``, exit 2) a run directory that holds a run of another config or encoder;
2. returns the stored results of a finished run;
3. calls ``open_work()``: a refused input fails here, before anything is written, so a refused start
   never binds the run directory to its config;
4. takes the run's lock (rank 0) and checks 1-2 again under it;
5. sweeps temporaries of killed processes, writes ``config.yaml`` and ``run.json``, marks it running;
6. calls ``body(started)`` (every rank), then writes ``results.json`` and marks it finished (rank 0);
7. on an exception marks the run failed with one line (or pending when interrupted, so the next start
   resumes it), falling back to an in-place status write when the disk is full. A bad input met in the
   work (``MedsslInputError``) before any checkpoint, metric or result of a directory this start bound
   is a refused start too: config.yaml and run.json are removed again, the refusal stays in status.json.
A kind therefore only says what its inputs are and what its work is; it cannot skip a step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from medssl.config import NOT_HASHED, config_hash, dump_yaml
from medssl.errors import ConfigError, MedsslInputError, describe_error
from medssl.fileio import LockHeldError, atomic_write_json, atomic_write_text, file_lock, json_default
from medssl.version import code_version

__all__ = [
    "AlreadyFinished",
    "BenchDir",
    "RunDir",
    "RunLockedError",
    "RunWork",
    "atomic_write_json",
    "atomic_write_text",
    "environment",
    "finish_run",
    "list_runs",
    "perform_run",
    "read_json",
    "record_end",
    "run_session",
    "sweep_stale_temporaries",
]

STATUSES = ("pending", "running", "finished", "failed")


def read_json(path: str | Path, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return default


def config_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two config dicts differ (``schedule.lr``, ``encoder_checkpoint``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        found: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            found += config_differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return found
    return [] if old == new else [prefix.rstrip(".") or "<config>"]


# run.json fields that are part of a run's identity besides its config (e.g. the encoder file's hash)
IDENTITY_INFO = ("encoder_sha256",)


class RunLockedError(LockHeldError):
    """Another process holds this run."""


class RunDir:
    """One run's directory. Cheap to construct; touches the disk only when asked."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._tensorboard: Any = None  # SummaryWriter, created on the first metrics record
        self._purge_step: int | None = None
        self._last_train: tuple[int, float] | None = None  # (step, time) of the last loss record

    def __getstate__(self) -> dict[str, Any]:  # a writer holds a thread and a file: never pickled
        return {**self.__dict__, "_tensorboard": None}

    # paths ---------------------------------------------------------------------------------
    @property
    def id(self) -> str:
        return self.path.name

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def info_path(self) -> Path:
        return self.path / "run.json"

    @property
    def status_path(self) -> Path:
        return self.path / "status.json"

    @property
    def log_path(self) -> Path:
        return self.path / "log.txt"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def results_path(self) -> Path:
        return self.path / "results.json"

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tensorboard"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoint_dir / "last.pt"

    @property
    def encoder_path(self) -> Path:
        return self.checkpoint_dir / "encoder.pt"

    # status --------------------------------------------------------------------------------
    def status(self) -> str:
        data = read_json(self.status_path, {})
        return data.get("status", "pending") if isinstance(data, dict) else "pending"

    def is_finished(self) -> bool:
        return self.status() == "finished" and self.results_path.exists()

    def set_status(self, status: str, error: str | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(status)
        if self.is_finished() and status != "finished":
            raise RuntimeError(f"run {self.id} is finished and is never rewritten")
        if status != "running":
            self.close_tensorboard()
        payload = {"status": status, "updated": time.time(), "pid": os.getpid()}
        if error:
            payload["error"] = error
        atomic_write_json(self.status_path, payload)

    def info(self) -> dict[str, Any]:
        data = read_json(self.info_path, {})
        return data if isinstance(data, dict) else {}

    def results(self) -> dict[str, Any] | None:
        return read_json(self.results_path)

    # identity ------------------------------------------------------------------------------
    def check_identity(self, config_yaml: str, identity: dict[str, Any] | None = None) -> None:
        """Refuse (``ConfigError``, exit 2) a request whose config differs from the one this run
        directory was created with: resuming or returning stored results then would report one
        config's results under another's name. Settings that do not affect results are ignored."""
        if not self.config_path.is_file():
            return  # a new run (or one killed before it wrote its config)
        try:
            stored = yaml.safe_load(self.config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise ConfigError(
                self.config_path, f"unreadable run config ({type(err).__name__}); use a new --out folder"
            ) from None
        new = yaml.safe_load(config_yaml)
        if not isinstance(stored, dict) or not isinstance(new, dict):
            raise ConfigError(self.config_path, "run config is not a mapping; use a new --out folder")
        differ = config_differences(
            {k: v for k, v in stored.items() if k not in NOT_HASHED},
            {k: v for k, v in new.items() if k not in NOT_HASHED},
        )
        recorded = self.info()
        for key, value in (identity or {}).items():
            if key in recorded and recorded[key] != value:
                differ.append(f"{key} (the file's contents changed)" if key.endswith("sha256") else key)
        if differ:
            shown = ", ".join(differ[:8]) + (f" and {len(differ) - 8} more" if len(differ) > 8 else "")
            raise ConfigError(
                self.path,
                f"this run directory holds a run with another config (differs in: "
                f"{shown}); use a new --out folder, or the same settings to resume it",
            )

    # writing -------------------------------------------------------------------------------
    def prepare(self, config_yaml: str, info: dict[str, Any]) -> None:
        """Create the directory and write config and info (once; a finished run is left alone)."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoint_dir.mkdir(exist_ok=True)
        if self.is_finished():
            return
        if not self.config_path.exists():
            atomic_write_text(self.config_path, config_yaml)
        merged = {**self.info(), **info}
        atomic_write_json(self.info_path, merged)

    def update_info(self, **fields: Any) -> None:
        atomic_write_json(self.info_path, {**self.info(), **fields})

    def write_results(self, results: dict[str, Any]) -> None:
        atomic_write_json(self.results_path, results)

    def log(self, message: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(f"[{stamp}] {message}\n")

    def append_metrics(self, record: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=json_default) + "\n")
        self._write_tensorboard(record)

    def _write_tensorboard(self, record: dict[str, Any]) -> None:
        """Mirror a metrics record as TensorBoard scalars (nested dicts as ``a/b`` tags, non-finite
        values left out) plus ``throughput/steps_per_second`` between training records."""
        step = record.get("step")
        if not isinstance(step, int):
            return
        scalars = dict(flatten_scalars({k: v for k, v in record.items() if k != "step"}))
        now = time.perf_counter()
        if "loss" in record:
            if self._last_train is not None and step > self._last_train[0] and now > self._last_train[1]:
                scalars["throughput/steps_per_second"] = (step - self._last_train[0]) / (now - self._last_train[1])
            self._last_train = (step, now)
        if not scalars:
            return
        if self._tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # the JSON lines stay the record; TensorBoard is a view of them
                warnings.warn(f"no TensorBoard events for run {self.id}: {err}", stacklevel=3)
                self._tensorboard = False
                return
            self._tensorboard = SummaryWriter(str(self.tensorboard_dir), purge_step=self._purge_step)
        if self._tensorboard is False:
            return
        for tag, value in scalars.items():
            self._tensorboard.add_scalar(tag, value, global_step=step)
        self._tensorboard.flush()

    def close_tensorboard(self) -> None:
        if self._tensorboard:
            self._tensorboard.close()
        self._tensorboard = None

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        records = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash: the step is re-logged after resume
        return records

    def truncate_metrics_after(self, step: int) -> None:
        """On resume, drop records logged after the checkpoint so the curve is not duplicated."""
        kept = [r for r in self.read_metrics() if r.get("step", -1) <= step]
        self.close_tensorboard()
        self._purge_step = step + 1  # TensorBoard drops its events after the checkpoint as well
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    # locking -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, name: str = ".lock") -> Iterator[None]:
        """Exclusive, non-blocking lock on the run (an OS lock: released if the process dies).

        ``name`` selects the lock file, so a scheduler can hold its own claim on a run while the
        run's entry point takes the run lock inside it."""
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(file_lock(self.path / name, blocking=False))
            except LockHeldError:
                raise RunLockedError(f"run {self.id} is held by another process") from None
            yield


def flatten_scalars(record: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """``(tag, value)`` for every finite number in a nested record; booleans and text are skipped."""
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from flatten_scalars(value, f"{tag}/")
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            yield tag, float(value)


# --------------------------------------------------------------------------- the lifecycle


def environment() -> dict[str, Any]:
    """Where this process runs: host, platform, Python, CPUs, torch and its devices.

    The one probe of the machine: every run records it in run.json (``hardware``) and the report
    describes its own host with it. torch is imported here, not at module import, so that reading
    run directories never pays for it."""
    info: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import torch
    except ImportError:  # the report may be built where torch is not installed
        return {**info, "torch": None, "device": "cpu", "devices": []}
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        **info,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": devices[0] if devices else "cpu",
        "gpu_count": len(devices),
        "devices": devices,
    }


def encoder_run_info(config: Any, task: Any, meta: dict[str, Any], n_train: int) -> dict[str, Any]:
    """The ``run.json`` fields every run of an encoder on a task shares (fine-tuning and probe runs): the
    encoder's row (``method``, ``family``, its file) and the task, budget, training cases and seed."""
    return {
        "method": meta["method"],
        "family": meta["family"],
        "encoder_checkpoint": str(config.encoder_checkpoint or ""),
        "task": task.name,
        "task_path": str(task.root),
        "modality": task.modality,
        "budget": config.budget.label,
        "n_train": n_train,
        "seed": config.seed,
    }


@dataclass(frozen=True)
class RunWork:
    """What a kind hands to :func:`perform_run` once its inputs are open and checked.

    ``info``: the run.json fields of this kind (method, task, ...; ``kind``, ``run_id``,
    ``config_hash``, ``code_version`` and ``hardware`` are added by the lifecycle). ``body(started)``
    does the work on every rank (``started``: the time the lock was taken) and returns the results
    that rank 0 writes to results.json."""

    kind: str
    info: Mapping[str, Any]
    body: Callable[[float], dict[str, Any]]


class AlreadyFinished(Exception):
    """Another process finished the run while this one waited for its lock."""


def perform_run(
    run: RunDir,
    config: BaseModel,
    open_work: Callable[[], RunWork],
    *,
    identity: Mapping[str, Any] | None = None,
    is_main: bool = True,
    world_size: int = 1,
) -> dict[str, Any]:
    """Run one run of any kind from start to finish (the steps are the module docstring's).

    ``identity``: run.json fields that bind the run besides its config (``IDENTITY_INFO``, e.g. the
    encoder file's hash). ``is_main``/``world_size``: this process's rank is 0 / how many processes
    run it (torchrun); only rank 0 locks and writes. Returns the results, stored or new."""
    identity = dict(identity or {})
    config_yaml = dump_yaml(config)
    run.check_identity(config_yaml, identity)  # exit 2 rather than resume or report another run
    if run.is_finished():
        return run.results() or {}
    work = open_work()  # a refusal here writes nothing
    run_info = {"kind": work.kind, "config_hash": config_hash(config), **work.info, **identity}
    try:
        with run_session(run, config_yaml, run_info, is_main=is_main, world_size=world_size) as started:
            results = work.body(started)
            finish_run(run, results, is_main=is_main)
    except AlreadyFinished:
        return run.results() or {}
    return results


@contextlib.contextmanager
def run_session(
    run: RunDir, config_yaml: str, run_info: dict[str, Any], *, is_main: bool = True, world_size: int = 1
) -> Iterator[float]:
    """Steps 4-5 and 7 of the lifecycle around a block: hold the run's lock (rank 0), mark it running,
    and record how it ended. Yields the start time; the block does the work and calls
    :func:`finish_run`. :func:`perform_run` is the entry; this is the part other ranks and tests reach.
    """
    lock = run.lock() if is_main else contextlib.nullcontext()
    with lock:
        started = time.time()
        # checked again under the lock: another process may have just created or finished it
        run.check_identity(config_yaml, {k: run_info[k] for k in IDENTITY_INFO if k in run_info})
        if run.is_finished():
            raise AlreadyFinished(run.id)
        binds = is_main and not run.config_path.exists()  # this start binds the directory to its config
        try:
            if is_main:
                sweep_stale_temporaries(run, started)
                run.prepare(
                    config_yaml,
                    {
                        "run_id": run.id,
                        "code_version": code_version(),
                        "created": run.info().get("created", started),
                        "hardware": {**environment(), "world_size": world_size},
                        **run_info,
                    },
                )
                run.set_status("running")
                run.log(f"start {run_info.get('kind', 'run')} (pid {os.getpid()}, world size {world_size})")
            yield started
        except KeyboardInterrupt:
            if is_main:
                record_end(run, "pending", "interrupted; the next start resumes it")
            raise
        except BaseException as err:
            if is_main and not run.is_finished():
                record_end(run, "failed", describe_error(err))
                if binds and isinstance(err, MedsslInputError) and not made_progress(run):
                    unbind_refused_start(run)  # a refusal of its inputs, met in the work: still binds nothing
            raise


def unbind_refused_start(run: RunDir) -> None:
    """Undo the binding of a start whose inputs were refused inside its work before it made any progress:
    config.yaml and run.json go, status.json and log.txt keep the refusal. The corrected command may then
    use the same run directory, as after a refusal in ``open_work``."""
    for path in (run.config_path, run.info_path):
        with contextlib.suppress(OSError):
            path.unlink()


def made_progress(run: RunDir) -> bool:
    """Whether the run left anything a later start would resume or report: a checkpoint, a metrics
    record or results."""
    checkpoints = run.checkpoint_dir.is_dir() and any(p.is_file() for p in run.checkpoint_dir.iterdir())
    return checkpoints or run.metrics_path.exists() or run.results_path.exists()


def finish_run(run: RunDir, results: dict[str, Any], *, is_main: bool = True) -> None:
    """Write the results and mark the run finished (rank 0; the other ranks' results are the same)."""
    if is_main:
        run.write_results(results)
        run.set_status("finished")
        run.log("finished")


def record_end(run: RunDir, status: str, message: str) -> None:
    """Record how the run ended without ever masking the error that ended it.

    On a full disk the atomic status write fails (it needs a second file): then status.json is
    overwritten in place, which needs no new blocks, so the run reads "failed" with the original
    message instead of "running" forever."""
    try:
        run.set_status(status, error=message)
    except OSError:
        payload = json.dumps({"status": status, "error": message, "updated": time.time(), "pid": os.getpid()})
        with contextlib.suppress(OSError), open(run.status_path, "r+" if run.status_path.exists() else "w") as f:
            f.truncate(0)
            f.write(payload + "\n")
    with contextlib.suppress(OSError):
        run.log(f"{'interrupted' if status == 'pending' else 'failed'}: {message}")


def sweep_stale_temporaries(run: RunDir, lock_taken: float) -> int:
    """Delete temporary files (``.name.XXXX.tmp``) of killed processes; returns how many.

    Called holding the run's lock: a checkpoint temporary older than the lock belongs to a process
    that died holding it (a base-preset ``last.pt`` is ~400 MB). In the run folder itself the
    scheduler may be writing status under its own claim, so only files older than a minute go."""
    removed = 0
    for folder, before in ((run.checkpoint_dir, lock_taken), (run.path, lock_taken - 60.0)):
        for tmp in folder.glob(".*.tmp") if folder.is_dir() else []:
            with contextlib.suppress(OSError):
                if tmp.is_file() and tmp.stat().st_mtime < before:
                    tmp.unlink()
                    removed += 1
    return removed


class BenchDir:
    """A benchmark's output folder ``<out>``: the one place that knows its layout."""

    def __init__(self, out: str | Path) -> None:
        self.path = Path(out).resolve()

    @property
    def runs(self) -> Path:
        return self.path / "runs"

    @property
    def cache(self) -> Path:  # preprocessed volumes, shared by fine-tuning and CKA runs
        return self.path / "cache"

    @property
    def splits(self) -> Path:
        return self.path / "splits"

    def splits_file(self, task: str) -> Path:
        return self.splits / f"{task}.json"

    @property
    def data(self) -> Path:  # synthetic tasks
        return self.path / "data"

    @property
    def corpus(self) -> Path:
        return self.path / "corpus"

    @property
    def report(self) -> Path:
        return self.path / "report"

    @property
    def plan(self) -> Path:
        return self.path / "plan.json"

    @property
    def identity_file(self) -> Path:  # the benchmark config the folder belongs to (bench/identity.py)
        return self.path / "bench.yaml"

    def about(self) -> str | None:
        """The recorded benchmark's ``about`` text (what the study can show); None when absent or unreadable."""
        try:
            stored = yaml.safe_load(self.identity_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return None
        about = stored.get("about") if isinstance(stored, dict) else None
        return about.strip() if isinstance(about, str) and about.strip() else None


def list_runs(runs_root: str | Path) -> list[RunDir]:
    root = Path(runs_root)
    if not root.is_dir():
        return []
    return [RunDir(p) for p in sorted(root.iterdir()) if p.is_dir() and (p / "run.json").exists()]
