"""The local executor: runs in this process (``workers == 1``) or in N spawned worker processes that
pull ready runs from a queue; a worker that dies fails only its run."""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medssl.errors import describe_error
from medssl.runs import RunDir

from ..plan import Plan
from .dispatch import ExecutionSummary, Runner, RunOutcome, execute_run, record_failure
from .schedule import Schedule, print_to_console, report


class LocalExecutor:
    """Runs in this process (``workers == 1``) or in N spawned worker processes pulling ready runs."""

    def __init__(
        self,
        workers: int = 1,
        runner: Runner | None = None,
        poll_seconds: float = 1.0,
        log: Callable[[str], None] = print_to_console,
    ) -> None:
        self.workers = max(1, int(workers))
        self.runner = runner
        self.poll_seconds = poll_seconds
        self.log = log

    def run(self, plan: Plan, out: str | Path) -> ExecutionSummary:
        schedule = Schedule(plan, out)
        if self.workers == 1:
            self._run_serial(schedule, Path(out))
        else:
            self._run_workers(schedule, Path(out))
        return schedule.summary

    def _run_serial(self, schedule: Schedule, out: Path) -> None:
        by_id = schedule.by_id
        while True:
            schedule.settle(self.log)
            if schedule.done():
                return
            progressed = False
            for run in schedule.ready():
                outcome = execute_run(run, out, self.runner)
                if outcome is None:
                    continue  # held elsewhere: try the others, come back later
                schedule.record(outcome)
                report(outcome, by_id[run.run_id], self.log)
                progressed = True
                break  # re-read readiness: the plan order prefers earlier stages
            if not progressed:
                time.sleep(self.poll_seconds)

    def _run_workers(self, schedule: Schedule, out: Path) -> None:
        by_id = schedule.by_id
        ctx = multiprocessing.get_context("spawn")
        results: Any = ctx.Queue()
        threads = max(1, _cpu_count() // self.workers)
        workers: list[_Worker] = []

        def start(index: int) -> _Worker:
            tasks = ctx.Queue()
            proc = ctx.Process(
                target=_worker_main,
                args=(index, tasks, results, str(out), self.runner, threads, os.getpid()),
                daemon=False,
                name=f"medssl-bench-worker-{index}",
            )
            proc.start()
            return _Worker(proc, tasks)

        try:
            workers = [start(i) for i in range(self.workers)]
            retry_after: dict[str, float] = {}
            while True:
                schedule.settle(self.log)
                if schedule.done():
                    return
                inflight = {w.run_id for w in workers if w.run_id}
                now = time.time()
                ready = [r for r in schedule.ready(exclude=inflight) if retry_after.get(r.run_id, 0) <= now]
                for worker in workers:
                    if worker.run_id is None and ready:
                        run = ready.pop(0)
                        worker.run_id, worker.since = run.run_id, time.time()
                        worker.tasks.put(run)
                try:
                    index, run_id, outcome = results.get(timeout=self.poll_seconds)
                except queue.Empty:
                    index = None
                if index is not None:
                    workers[index].run_id = None
                    if outcome is None:
                        retry_after[run_id] = time.time() + self.poll_seconds
                    else:
                        schedule.record(outcome)
                        report(outcome, by_id[run_id], self.log)
                for i, worker in enumerate(workers):
                    if not worker.proc.is_alive():
                        if worker.run_id is not None:  # died mid-run (killed, out of memory)
                            run = by_id[worker.run_id]
                            message = f"worker process died (exit code {worker.proc.exitcode})"
                            outcome = record_failure(run, RunDir(run.run_dir(out)), message, worker.since)
                            schedule.record(outcome)
                            report(outcome, run, self.log)
                        workers[i] = start(i)
        finally:
            for worker in workers:
                if worker.proc.is_alive():
                    worker.tasks.put(None)
            for worker in workers:
                worker.proc.join(timeout=5)
                if worker.proc.is_alive():
                    worker.proc.terminate()
                    worker.proc.join(timeout=5)


WORKER_PARENT_CHECK_SECONDS = 2.0


@dataclass
class _Worker:
    proc: Any
    tasks: Any
    run_id: str | None = None  # the run it is executing
    since: float = 0.0  # when that run was handed to it


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _worker_main(
    index: int, tasks: Any, results: Any, out: str, runner: Runner | None, threads: int, parent: int
) -> None:
    import torch

    torch.set_num_threads(threads)  # N workers share the machine's cores instead of each taking all
    while True:
        try:
            run = tasks.get(timeout=WORKER_PARENT_CHECK_SECONDS)
        except queue.Empty:
            if os.getppid() != parent:  # the bench was killed: do not linger as an orphan
                return
            continue
        if run is None:
            return
        try:
            outcome = execute_run(run, out, runner)
        except KeyboardInterrupt:
            return
        except Exception as err:  # noqa: BLE001 - report, never die silently
            outcome = RunOutcome(run.run_id, run.kind, "failed", error=describe_error(err))
        results.put((index, run.run_id, outcome))
