"""The benchmark engine: expand a benchmark YAML into a plan of runs and execute it (local
processes, torchrun, or SLURM via submitit), resumably; see ``medssl bench``."""

from medssl.bench.engine import demo_config_path, prepare_data, run_bench
from medssl.bench.executors import (
    ExecutionSummary,
    LocalExecutor,
    RunOutcome,
    SlurmExecutor,
    TorchrunExecutor,
    execute_run,
    make_executor,
)
from medssl.bench.kinds import RUN_KINDS, RunConfig, run_kind
from medssl.bench.plan import Plan, PlannedRun, expand_plan, make_run_id

__all__ = [
    "ExecutionSummary",
    "LocalExecutor",
    "Plan",
    "PlannedRun",
    "RUN_KINDS",
    "RunConfig",
    "RunOutcome",
    "SlurmExecutor",
    "TorchrunExecutor",
    "demo_config_path",
    "execute_run",
    "expand_plan",
    "make_executor",
    "make_run_id",
    "prepare_data",
    "run_bench",
    "run_kind",
]
