"""Executors: run a plan's runs in dependency order, in process, in worker processes, under
torchrun, or as SLURM jobs via submitit. All of them write the same run directories.

``dispatch`` runs one run (claim, entry point, failure record), ``schedule`` orders a plan's runs,
and ``local``, ``torchrun`` and ``slurm`` are the backends; ``make_executor`` picks one by name
(``medssl.config.EXECUTOR_KINDS``).
"""

from __future__ import annotations

from typing_extensions import assert_never  # typing has it from Python 3.11; medssl supports 3.10

from medssl.config import ExecutorKind, SlurmConfig

from .dispatch import (
    CLAIM_FILE,
    ExecutionSummary,
    OutcomeStatus,
    RunFailed,
    Runner,
    RunOutcome,
    claim_run,
    execute_run,
    record_failure,
    run_in_process,
)
from .local import LocalExecutor
from .schedule import Schedule
from .slurm import MultiNodeTorchrunRunner, SlurmExecutor, slurm_job
from .torchrun import TorchrunExecutor, TorchrunRunner

__all__ = [
    "CLAIM_FILE",
    "ExecutionSummary",
    "LocalExecutor",
    "MultiNodeTorchrunRunner",
    "OutcomeStatus",
    "RunFailed",
    "RunOutcome",
    "Runner",
    "Schedule",
    "SlurmExecutor",
    "TorchrunExecutor",
    "TorchrunRunner",
    "claim_run",
    "execute_run",
    "make_executor",
    "record_failure",
    "run_in_process",
    "slurm_job",
]


def make_executor(
    kind: ExecutorKind,
    workers: int = 1,
    nproc_per_node: int = 1,
    slurm: SlurmConfig | None = None,
    cluster: str | None = None,
) -> LocalExecutor | SlurmExecutor:
    """The executor called ``kind`` (mypy checks that every one of ``ExecutorKind`` is handled)."""
    if kind == "local":
        return LocalExecutor(workers=workers)
    if kind == "torchrun":
        return TorchrunExecutor(nproc_per_node=nproc_per_node)
    if kind == "slurm":
        return SlurmExecutor(slurm, nproc_per_node=nproc_per_node, cluster=cluster)
    assert_never(kind)
