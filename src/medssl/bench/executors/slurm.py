"""The SLURM executor: one submitit job per run, chained by ``afterok`` dependencies.

One node: the job's one task claims the run and runs it (under ``torchrun --standalone`` when
``nproc_per_node > 1``). Several nodes (``executor.slurm.nodes > 1``, distributed kinds only): the
job's batch script runs the job function once, on the first node (submitit's ``use_srun=False``);
it claims the run, then starts ``srun torchrun --nnodes <the job's nodes> --nproc_per_node N
--rdzv_backend c10d --rdzv_endpoint <first node>:<port>`` across the nodes. Only that process
claims the run and records its end, and inside torchrun only global rank 0 writes to the run
directory (``medssl.runs.perform_run``), as with the local torchrun executor.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medssl.config import SlurmConfig
from medssl.runs import RunDir

from ..kinds import run_kind
from ..plan import Plan, PlannedRun
from .dispatch import ExecutionSummary, RunFailed, Runner, RunOutcome, execute_run, record_failure
from .schedule import Schedule, print_to_console, report
from .torchrun import TORCHRUN, TorchrunRunner, launch_args


def job_rank() -> int:
    """This process's task rank in its submitit job (SLURM_PROCID on SLURM); 0 outside a job."""
    import submitit

    try:
        return int(submitit.JobEnvironment().global_rank)
    except RuntimeError:  # not inside a submitit job (a direct call)
        return 0


def slurm_job(
    run: PlannedRun, out: str, runner: Runner | None = None, poll_seconds: float = 30.0
) -> dict[str, Any] | None:
    """The function a SLURM job runs: execute the run, waiting while another process holds it.

    Only the job's task 0 claims and records the run: in a job whose every task runs this function
    the others return ``None`` at once, touching nothing. Raises when the run fails so the job fails
    and ``afterok`` dependents are cancelled.
    """
    if job_rank() != 0:
        return None
    while True:
        outcome = execute_run(run, out, runner)
        if outcome is not None:
            break
        time.sleep(poll_seconds)
    if outcome.status == "failed":
        raise RunFailed(outcome.error or "run failed")
    return {"run_id": outcome.run_id, "status": outcome.status, "seconds": outcome.seconds}


@dataclass
class MultiNodeTorchrunRunner(TorchrunRunner):
    """Distributed kinds as one ``srun`` step over every node of the job, each node a torchrun agent
    meeting the others at a c10d rendezvous on the job's first node; other kinds in process."""

    rdzv_port: int = 29500

    def multinode_command(self, run: PlannedRun, run_dir: Path, nodes: int, head_node: str, job_id: str) -> list[str]:
        srun = ["srun", "--nodes", str(nodes), "--ntasks", str(nodes), "--ntasks-per-node", "1", "--kill-on-bad-exit=1"]
        torchrun = [
            *TORCHRUN,
            "--nnodes",
            str(nodes),
            "--nproc_per_node",
            str(self.nproc_per_node),
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            f"{head_node}:{self.rdzv_port}",
            "--rdzv_id",
            job_id,
        ]
        return [*srun, *torchrun, *launch_args(run, run_dir)]

    def command(self, run: PlannedRun, run_dir: Path) -> list[str]:
        """The command for the job this process runs in (its nodes, first node and id from SLURM)."""
        import submitit

        env = submitit.JobEnvironment()
        return self.multinode_command(run, run_dir, env.num_nodes, env.hostnames[0], str(env.job_id))


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
        log: Callable[[str], None] = print_to_console,
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

    def _multinode(self, executor: Any, run: PlannedRun) -> bool:
        """Whether this run spans several nodes: a distributed kind, nodes > 1, a real SLURM cluster."""
        return executor.cluster == "slurm" and self.config.nodes > 1 and run_kind(run.kind).distributed

    def _runner(self, multinode: bool) -> Runner | None:
        if multinode:
            return MultiNodeTorchrunRunner(self.nproc_per_node, rdzv_port=self.config.rdzv_port)
        return TorchrunRunner(self.nproc_per_node) if self.nproc_per_node > 1 else None

    def run(self, plan: Plan, out: str | Path) -> ExecutionSummary:
        out = Path(out)
        schedule = Schedule(plan, out)
        executor = self._executor(out)
        # job states come from squeue on SLURM: ask it rarely
        poll = self.poll_seconds if self.poll_seconds is not None else 10.0 if executor.cluster == "slurm" else 1.0
        # On SLURM every job goes in at once, chained by afterok; elsewhere _wait submits in waves.
        jobs = self._submit_with_dependencies(executor, schedule, out) if executor.cluster == "slurm" else {}
        self._wait(executor, schedule, out, jobs, poll)
        return schedule.summary

    def job_parameters(self, executor: Any, run: PlannedRun, dependency_ids: list[str]) -> dict[str, Any]:
        """submitit parameters of this run's job (on top of the executor's): name, dependencies, nodes."""
        if executor.cluster != "slurm":
            return {"name": run.run_id[:60]}
        multinode = self._multinode(executor, run)
        extra: dict[str, str] = {}
        if dependency_ids:
            extra = {"dependency": "afterok:" + ":".join(dependency_ids), "kill-on-invalid-dep": "yes"}
        return {
            "name": run.run_id[:60],
            "slurm_additional_parameters": extra,
            "nodes": self.config.nodes if multinode else 1,
            # several nodes: the job function runs once, in the batch script, and srun's the nodes itself
            "slurm_use_srun": not multinode,
        }

    def _submit(self, executor: Any, run: PlannedRun, out: Path, dependency_ids: list[str]) -> Any:
        executor.update_parameters(**self.job_parameters(executor, run, dependency_ids))
        runner = self._runner(self._multinode(executor, run))
        job = executor.submit(slurm_job, run, str(out), runner, self.job_poll_seconds)
        self._submitted_at[run.run_id] = time.time()
        self.log(f"submitted {run.describe()} as job {job.job_id}")
        return job

    def _submit_with_dependencies(self, executor: Any, schedule: Schedule, out: Path) -> dict[str, Any]:
        jobs: dict[str, Any] = {}
        for run in schedule.open_runs():  # plan order: dependencies come first
            deps = [jobs[d].job_id for d in run.depends_on if d in jobs]
            jobs[run.run_id] = self._submit(executor, run, out, deps)
        return jobs

    def _wait(self, executor: Any, schedule: Schedule, out: Path, jobs: dict[str, Any], poll: float) -> None:
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
                time.sleep(poll)
                continue
            for run_id, job in pending.items():
                schedule.settle(self.log)
                if run_id in schedule.summary.outcomes:
                    continue  # a dependency failed: SLURM cancels this job (kill-on-invalid-dep)
                if job.done():
                    outcome = self._collect(by_id[run_id], job, out)
                    schedule.record(outcome)
                    report(outcome, by_id[run_id], self.log)
            time.sleep(poll)

    def _collect(self, run: PlannedRun, job: Any, out: Path) -> RunOutcome:
        try:
            result = job.result()
        except Exception as err:  # noqa: BLE001 - submitit raises FailedJobError/UncompletedJobError
            # the run's own record wins; else the job died before it could write one (time limit, node)
            started = self._submitted_at.get(run.run_id, 0.0)
            return record_failure(run, RunDir(run.run_dir(out)), _last_line(err), started)
        return RunOutcome(run.run_id, run.kind, result["status"], seconds=result.get("seconds", 0.0))


def _last_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # submitit's message ends with the job's traceback; its last line is the actual error
    return (lines[-1] if lines else type(err).__name__)[:500]
