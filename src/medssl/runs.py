"""The run directory: layout, atomic writes, status and a lock so two processes never share a run.

Layout of ``<out>/runs/<run-id>/``::

    config.yaml        resolved config of the run (written once, before it starts)
    run.json           kind (pretrain/finetune/cka), id, config hash, method/task/budget/seed, timings
    status.json        {"status": pending|running|finished|failed, "error": ..., "updated": ...}
    log.txt            human-readable log
    metrics.jsonl      one JSON object per logged step (train losses, validation Dice, ...)
    results.json       final results (finetune: per-case test metrics; pretrain: encoder path, ...)
    checkpoints/       last.pt (resume state), best.pt, encoder.pt

A finished run is never rewritten. Every file is written via a temporary file and ``os.replace``
so a crash leaves either the old or the new content, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medssl.fileio import _json_default, atomic_write_json, atomic_write_text

__all__ = ["BenchDir", "RunDir", "RunLockedError", "atomic_write_json", "atomic_write_text", "list_runs", "read_json"]

STATUSES = ("pending", "running", "finished", "failed")


def read_json(path: str | Path, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return default


class RunLockedError(RuntimeError):
    """Another process holds this run."""


class RunDir:
    """One run's directory. Cheap to construct; touches the disk only when asked."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

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
        payload = {"status": status, "updated": time.time(), "pid": os.getpid()}
        if error:
            payload["error"] = error
        atomic_write_json(self.status_path, payload)

    def info(self) -> dict[str, Any]:
        data = read_json(self.info_path, {})
        return data if isinstance(data, dict) else {}

    def results(self) -> dict[str, Any] | None:
        return read_json(self.results_path)

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
            f.write(json.dumps(record, default=_json_default) + "\n")

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
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    # locking -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, name: str = ".lock") -> Iterator[None]:
        """Exclusive, non-blocking lock on the run (an OS lock: released if the process dies).

        ``name`` selects the lock file, so a scheduler can hold its own claim on a run while the
        run's entry point takes the run lock inside it."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise RunLockedError(f"run {self.id} is held by another process") from None
                raise
            yield
        finally:
            os.close(fd)


class BenchDir:
    """A benchmark's output folder ``<out>``: the one place that knows its layout."""

    def __init__(self, out: str | Path) -> None:
        self.path = Path(out).resolve()

    @classmethod
    def of_run(cls, run_dir: str | Path) -> BenchDir:
        """The benchmark folder holding ``<out>/runs/<run-id>``."""
        return cls(Path(run_dir).resolve().parent.parent)

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


def list_runs(runs_root: str | Path) -> list[RunDir]:
    root = Path(runs_root)
    if not root.is_dir():
        return []
    return [RunDir(p) for p in sorted(root.iterdir()) if p.is_dir() and (p / "run.json").exists()]
