"""Running one planned run: its kind's entry point (``medssl.bench.kinds``), the claim that keeps two
processes off one run, and the record of how it ended.

Claiming a run: before running one, an executor takes a non-blocking OS lock on
``<run_dir>/.bench.lock`` and checks, *under that lock*, whether the run is finished. Two bench
processes on one output folder (or a relaunched SLURM job next to a live one) therefore never
execute a run twice: the loser sees the lock held and polls until the run is finished or the
holder dies (the OS drops a dead process's lock, and the run is then taken and resumed from its
last checkpoint). The training entry points keep their own lock (``RunDir.lock``) for runs
started outside the bench; meeting it (``RunLockedError``) is treated the same way.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medssl.config import dump_yaml
from medssl.errors import describe_error
from medssl.runs import RunDir, RunLockedError, read_json

from ..kinds import run_kind
from ..plan import PlannedRun

Runner = Callable[[PlannedRun, Path], Any]
OutcomeStatus = Literal["finished", "already_finished", "failed", "skipped"]
CLAIM_FILE = ".bench.lock"


@dataclass
class RunOutcome:
    run_id: str
    kind: str
    status: OutcomeStatus
    error: str | None = None
    seconds: float = 0.0

    @property
    def executed(self) -> bool:
        return self.status == "finished"


@dataclass
class ExecutionSummary:
    outcomes: dict[str, RunOutcome] = field(default_factory=dict)

    def with_status(self, status: OutcomeStatus) -> list[RunOutcome]:
        return [o for o in self.outcomes.values() if o.status == status]

    @property
    def failed(self) -> list[RunOutcome]:
        return self.with_status("failed")

    @property
    def skipped(self) -> list[RunOutcome]:
        return self.with_status("skipped")

    @property
    def executed(self) -> list[RunOutcome]:
        return self.with_status("finished")


class RunFailed(RuntimeError):
    """A run ended without finishing; the message is the run's one-line error."""


def run_in_process(run: PlannedRun, run_dir: Path) -> Any:
    """Call the run's entry point (its kind's, ``medssl.bench.kinds.RUN_KINDS``) in this process."""
    return run_kind(run.kind).run(run.config, run_dir)


def status_error(run: RunDir, since: float) -> str | None:
    """The error the run recorded itself, if it failed at or after ``since`` (not an old failure)."""
    data = read_json(run.status_path, {})
    if not isinstance(data, dict) or data.get("status") != "failed" or data.get("updated", 0) < since:
        return None
    error = data.get("error")
    return str(error) if error is not None else None


def claim_run(run: RunDir) -> contextlib.AbstractContextManager[None]:
    """Non-blocking exclusive OS lock on the run for the bench; ``RunLockedError`` when held."""
    return run.lock(CLAIM_FILE)


def execute_run(run: PlannedRun, out: str | Path, runner: Runner | None = None) -> RunOutcome | None:
    """Claim and execute one run; ``None`` when another process holds it (poll again later).

    A run already finished is never touched again. A failure is recorded in the run directory
    (``status: failed`` with the one-line error) and returned, never raised; an interrupt
    (KeyboardInterrupt) propagates so the caller stops.
    """
    rd = RunDir(run.run_dir(out))
    try:
        with claim_run(rd):
            if rd.is_finished():
                return RunOutcome(run.run_id, run.kind, "already_finished")
            # The resolved config and the plan's labels go in first: a run that fails before
            # its entry point writes anything still shows what it was (and torchrun reads it).
            rd.prepare(
                dump_yaml(run.config),
                {"kind": run.kind, "run_id": run.run_id, "config_hash": run.config_hash, **run.labels},
            )
            rd.log(f"bench: started by pid {os.getpid()} on {socket.gethostname()}")
            started = time.time()
            try:
                (runner or run_in_process)(run, rd.path)
            except RunLockedError:
                return None
            except Exception as err:  # noqa: BLE001 - any failure of one run is recorded, others go on
                return record_failure(run, rd, describe_error(err), started)
            if not rd.is_finished():
                return record_failure(run, rd, "run returned without writing results", started)
            seconds = time.time() - started
            rd.log(f"bench: completed by pid {os.getpid()} in {seconds:.1f} s")
            return RunOutcome(run.run_id, run.kind, "finished", seconds=seconds)
    except RunLockedError:
        return None


def record_failure(run: PlannedRun, rd: RunDir, message: str, started: float) -> RunOutcome:
    """Record a failure (unless the run recorded its own since ``started``) and return it."""
    seconds = time.time() - started
    if rd.is_finished():  # e.g. a worker that died just after its run finished: the run stands
        return RunOutcome(run.run_id, run.kind, "finished", seconds=seconds)
    recorded = status_error(rd, since=started)
    if recorded is None:
        rd.set_status("failed", error=message)
    rd.log(f"bench: failed: {recorded or message}")
    return RunOutcome(run.run_id, run.kind, "failed", error=recorded or message, seconds=seconds)
