"""Executors: run a plan's runs in dependency order, in process, in worker processes, under
torchrun, or as SLURM jobs via submitit. All of them write the same run directories.

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
import multiprocessing
import os
import queue
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medssl.config import SlurmConfig, dump_yaml
from medssl.errors import describe_error
from medssl.runs import BenchDir, RunDir, RunLockedError

from .plan import Plan, PlannedRun

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


# --------------------------------------------------------------------------- running one run


def run_in_process(run: PlannedRun, run_dir: Path) -> Any:
    """Call the run's entry point in this process."""
    if run.kind == "pretrain":
        from medssl.train.pretrain import run_pretrain

        return run_pretrain(run.config, run_dir)  # type: ignore[arg-type]
    if run.kind == "finetune":
        from medssl.train.finetune import run_finetune

        return run_finetune(run.config, run_dir)  # type: ignore[arg-type]
    if run.kind == "cka":
        from medssl.analysis.cka import run_cka

        c = run.config
        cache_dir = BenchDir.of_run(run_dir).cache  # shared with the benchmark's fine-tuning runs
        return run_cka(
            c.model_a,
            c.model_b,
            c.task,
            run_dir,
            n_crops=c.n_crops,  # type: ignore[attr-defined]
            crop_size=c.crop_size,
            batch_size=c.batch_size,
            seed=c.seed,  # type: ignore[attr-defined]
            comparison=c.comparison,
            method=c.method,
            max_tokens=c.max_tokens,  # type: ignore[attr-defined]
            cases=c.cases,
            cache_dir=cache_dir,
        )  # type: ignore[attr-defined]
    raise ValueError(f"unknown run kind {run.kind!r}")


@dataclass
class TorchrunRunner:
    """Pretrain/finetune runs as ``torchrun --standalone --nproc_per_node N -m medssl.train.launch``;
    CKA runs (small, single-process) stay in process."""

    nproc_per_node: int

    def command(self, run: PlannedRun, run_dir: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(self.nproc_per_node),
            "-m",
            "medssl.train.launch",
            "--kind",
            run.kind,
            "--config",
            str(RunDir(run_dir).config_path),
            "--run-dir",
            str(run_dir),
        ]

    def __call__(self, run: PlannedRun, run_dir: Path) -> None:
        if run.kind == "cka":
            run_in_process(run, run_dir)
            return
        started = time.time()
        proc = subprocess.run(self.command(run, run_dir), check=False)
        if proc.returncode != 0:
            error = _status_error(RunDir(run_dir), since=started)
            raise RunFailed(error or f"torchrun exited with code {proc.returncode}")


def _status_error(run: RunDir, since: float) -> str | None:
    """The error the run recorded itself, if it failed at or after ``since`` (not an old failure)."""
    from medssl.runs import read_json

    data = read_json(run.status_path, {})
    if not isinstance(data, dict) or data.get("status") != "failed" or data.get("updated", 0) < since:
        return None
    return data.get("error")


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
                {"kind": run.kind, "run_id": run.run_id, "config_hash": run.run_id.rsplit("-", 1)[-1], **run.labels},
            )
            rd.log(f"bench: started by pid {os.getpid()} on {socket.gethostname()}")
            started = time.time()
            try:
                (runner or run_in_process)(run, rd.path)
            except RunLockedError:
                return None
            except Exception as err:  # noqa: BLE001 - any failure of one run is recorded, others go on
                return _failed(run, rd, describe_error(err), started)
            if not rd.is_finished():
                return _failed(run, rd, "run returned without writing results", started)
            seconds = time.time() - started
            rd.log(f"bench: completed by pid {os.getpid()} in {seconds:.1f} s")
            return RunOutcome(run.run_id, run.kind, "finished", seconds=seconds)
    except RunLockedError:
        return None


def _failed(run: PlannedRun, rd: RunDir, message: str, started: float) -> RunOutcome:
    """Record a failure (unless the run recorded its own since ``started``) and return it."""
    seconds = time.time() - started
    if rd.is_finished():  # e.g. a worker that died just after its run finished: the run stands
        return RunOutcome(run.run_id, run.kind, "finished", seconds=seconds)
    recorded = _status_error(rd, since=started)
    if recorded is None:
        rd.set_status("failed", error=message)
    rd.log(f"bench: failed: {recorded or message}")
    return RunOutcome(run.run_id, run.kind, "failed", error=recorded or message, seconds=seconds)


# --------------------------------------------------------------------------- scheduling


class Schedule:
    """Which runs of a plan are done, failed, blocked by a failure, or ready (deps finished on disk)."""

    def __init__(self, plan: Plan, out: str | Path) -> None:
        self.plan = plan
        self.out = Path(out)
        self.summary = ExecutionSummary()
        self.by_id = plan.by_id()
        for run in plan.runs:
            if RunDir(run.run_dir(out)).is_finished():
                self.record(RunOutcome(run.run_id, run.kind, "already_finished"))

    def record(self, outcome: RunOutcome) -> None:
        self.summary.outcomes[outcome.run_id] = outcome

    def open_runs(self) -> list[PlannedRun]:
        return [r for r in self.plan.runs if r.run_id not in self.summary.outcomes]

    def done(self) -> bool:
        return not self.open_runs()

    def skip_blocked(self) -> list[RunOutcome]:
        """Mark runs whose dependency failed or was skipped (transitively) as skipped."""
        skipped = []
        changed = True
        while changed:
            changed = False
            for run in self.open_runs():
                for dep in run.depends_on:
                    dep_outcome = self.summary.outcomes.get(dep)
                    if dep_outcome is not None and dep_outcome.status in ("failed", "skipped"):
                        outcome = RunOutcome(
                            run.run_id, run.kind, "skipped", error=f"dependency {dep} {dep_outcome.status}"
                        )
                        self.record(outcome)
                        skipped.append(outcome)
                        changed = True
                        break
        return skipped

    def settle(self, log: Callable[[str], None]) -> None:
        """Skip the runs a failure blocks and say so."""
        for outcome in self.skip_blocked():
            _report(outcome, self.by_id[outcome.run_id], log)

    def ready(self, exclude: set[str] | None = None) -> list[PlannedRun]:
        exclude = exclude or set()
        return [
            r
            for r in self.open_runs()
            if r.run_id not in exclude
            and all(RunDir(self.by_id[d].run_dir(self.out)).is_finished() for d in r.depends_on)
        ]


def _report(outcome: RunOutcome, run: PlannedRun, log: Callable[[str], None]) -> None:
    if outcome.status == "finished":
        log(f"[green]finished[/] {run.describe()} ({outcome.seconds:.0f} s) {run.run_id}")
    elif outcome.status == "failed":
        log(f"[red]failed[/] {run.describe()} {run.run_id}: {outcome.error}")
    elif outcome.status == "skipped":
        log(f"[yellow]skipped[/] {run.describe()} {run.run_id}: {outcome.error}")


def _print(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False).print(message)


# --------------------------------------------------------------------------- local


class LocalExecutor:
    """Runs in this process (``workers == 1``) or in N spawned worker processes pulling ready runs."""

    def __init__(
        self,
        workers: int = 1,
        runner: Runner | None = None,
        poll_seconds: float = 1.0,
        log: Callable[[str], None] = _print,
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
                _report(outcome, by_id[run.run_id], self.log)
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
                        _report(outcome, by_id[run_id], self.log)
                for i, worker in enumerate(workers):
                    if not worker.proc.is_alive():
                        if worker.run_id is not None:  # died mid-run (killed, out of memory)
                            run = by_id[worker.run_id]
                            message = f"worker process died (exit code {worker.proc.exitcode})"
                            outcome = _failed(run, RunDir(run.run_dir(out)), message, worker.since)
                            schedule.record(outcome)
                            _report(outcome, run, self.log)
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


class TorchrunExecutor(LocalExecutor):
    """One run at a time, each under ``torchrun --nproc_per_node N`` (DDP); CKA runs in process."""

    def __init__(self, nproc_per_node: int = 1, poll_seconds: float = 1.0, log: Callable[[str], None] = _print) -> None:
        super().__init__(workers=1, runner=TorchrunRunner(nproc_per_node), poll_seconds=poll_seconds, log=log)


# --------------------------------------------------------------------------- SLURM


def slurm_job(run: PlannedRun, out: str, runner: Runner | None = None, poll_seconds: float = 30.0) -> dict[str, Any]:
    """The function a SLURM job runs: execute the run, waiting while another process holds it.

    Raises when the run fails so the job fails and ``afterok`` dependents are cancelled.
    """
    while True:
        outcome = execute_run(run, out, runner)
        if outcome is not None:
            break
        time.sleep(poll_seconds)
    if outcome.status == "failed":
        raise RunFailed(outcome.error or "run failed")
    return {"run_id": outcome.run_id, "status": outcome.status, "seconds": outcome.seconds}


class SlurmExecutor:
    """One submitit job per run. On a SLURM cluster every job is submitted at once with
    ``--dependency=afterok:<ids>``; submitit's local cluster has no dependencies, so there the
    executor submits the ready runs, waits for them, and repeats (stage by stage)."""

    def __init__(
        self,
        config: SlurmConfig | None = None,
        nproc_per_node: int = 1,
        cluster: str | None = None,
        poll_seconds: float | None = None,
        job_poll_seconds: float = 30.0,
        log: Callable[[str], None] = _print,
    ) -> None:
        self.config = config or SlurmConfig()
        self.nproc_per_node = nproc_per_node
        self.cluster = cluster
        self.poll_seconds = poll_seconds
        self.job_poll_seconds = job_poll_seconds
        self.log = log
        self._submitted_at: dict[str, float] = {}

    def _executor(self, out: Path) -> Any:
        import submitit

        folder = self.config.folder or out / "slurm"
        executor = submitit.AutoExecutor(folder=folder, cluster=self.cluster)
        c = self.config
        params: dict[str, Any] = {
            "timeout_min": c.timeout_min,
            "gpus_per_node": c.gpus_per_node,
            "cpus_per_task": c.cpus_per_task,
            "mem_gb": c.mem_gb,
            "tasks_per_node": 1,
            "nodes": 1,
        }
        if executor.cluster == "slurm":
            params.update(slurm_partition=c.partition, slurm_account=c.account, slurm_qos=c.qos)
        executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
        return executor

    def _runner(self) -> Runner | None:
        return TorchrunRunner(self.nproc_per_node) if self.nproc_per_node > 1 else None

    def run(self, plan: Plan, out: str | Path) -> ExecutionSummary:
        out = Path(out)
        schedule = Schedule(plan, out)
        executor = self._executor(out)
        if self.poll_seconds is None:  # job states come from squeue on SLURM: ask it rarely
            self.poll_seconds = 10.0 if executor.cluster == "slurm" else 1.0
        # On SLURM every job goes in at once, chained by afterok; elsewhere _wait submits in waves.
        jobs = self._submit_with_dependencies(executor, schedule, out) if executor.cluster == "slurm" else {}
        self._wait(executor, schedule, out, jobs)
        return schedule.summary

    def _submit(self, executor: Any, run: PlannedRun, out: Path, dependency_ids: list[str]) -> Any:
        extra = (
            {"dependency": "afterok:" + ":".join(dependency_ids), "kill-on-invalid-dep": "yes"}
            if dependency_ids
            else {}
        )
        if executor.cluster == "slurm":
            executor.update_parameters(name=run.run_id[:60], slurm_additional_parameters=extra)
        else:
            executor.update_parameters(name=run.run_id[:60])
        job = executor.submit(slurm_job, run, str(out), self._runner(), self.job_poll_seconds)
        self._submitted_at[run.run_id] = time.time()
        self.log(f"submitted {run.describe()} as job {job.job_id}")
        return job

    def _submit_with_dependencies(self, executor: Any, schedule: Schedule, out: Path) -> dict[str, Any]:
        jobs: dict[str, Any] = {}
        for run in schedule.open_runs():  # plan order: dependencies come first
            deps = [jobs[d].job_id for d in run.depends_on if d in jobs]
            jobs[run.run_id] = self._submit(executor, run, out, deps)
        return jobs

    def _wait(self, executor: Any, schedule: Schedule, out: Path, jobs: dict[str, Any]) -> None:
        by_id = schedule.by_id
        submit_when_ready = not jobs  # the local cluster: submit what is ready, wait, repeat
        while True:
            schedule.settle(self.log)
            if schedule.done():
                return
            if submit_when_ready:
                for run in schedule.ready(exclude=set(jobs)):
                    jobs[run.run_id] = self._submit(executor, run, out, [])
            pending = {rid: job for rid, job in jobs.items() if rid not in schedule.summary.outcomes}
            if not pending:
                time.sleep(self.poll_seconds)
                continue
            for run_id, job in pending.items():
                schedule.settle(self.log)
                if run_id in schedule.summary.outcomes:
                    continue  # a dependency failed: SLURM cancels this job (kill-on-invalid-dep)
                if job.done():
                    outcome = self._collect(by_id[run_id], job, out)
                    schedule.record(outcome)
                    _report(outcome, by_id[run_id], self.log)
            time.sleep(self.poll_seconds)

    def _collect(self, run: PlannedRun, job: Any, out: Path) -> RunOutcome:
        try:
            result = job.result()
        except Exception as err:  # noqa: BLE001 - submitit raises FailedJobError/UncompletedJobError
            # the run's own record wins; else the job died before it could write one (time limit, node)
            return _failed(run, RunDir(run.run_dir(out)), _last_line(err), self._submitted_at.get(run.run_id, 0.0))
        return RunOutcome(run.run_id, run.kind, result["status"], seconds=result.get("seconds", 0.0))


def _last_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # submitit's message ends with the job's traceback; its last line is the actual error
    return (lines[-1] if lines else type(err).__name__)[:500]


def make_executor(
    kind: str, workers: int = 1, nproc_per_node: int = 1, slurm: SlurmConfig | None = None, cluster: str | None = None
) -> LocalExecutor | SlurmExecutor:
    if kind == "local":
        return LocalExecutor(workers=workers)
    if kind == "torchrun":
        return TorchrunExecutor(nproc_per_node=nproc_per_node)
    if kind == "slurm":
        return SlurmExecutor(slurm, nproc_per_node=nproc_per_node, cluster=cluster)
    raise ValueError(f"unknown executor {kind!r} (local, torchrun, slurm)")
