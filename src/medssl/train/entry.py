"""The entry skeleton of every training kind (pretrain, finetune): resource limits, the process group,
then the run lifecycle (``medssl.runs.perform_run``) with this process's rank."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from medssl.config import FinetuneConfig, PretrainConfig
from medssl.limits import set_limits
from medssl.runs import RunDir, RunWork, perform_run
from medssl.train.distributed import DistInfo, init_distributed


def perform_training_run(
    config: PretrainConfig | FinetuneConfig,
    run_dir: str | Path,
    open_work: Callable[[RunDir, DistInfo], RunWork],
    info: DistInfo | None = None,
    identity: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``config`` in ``run_dir`` through the lifecycle: ``open_work(run, info)`` opens the inputs and
    returns the work; every torchrun rank calls this, rank 0 locks and writes. ``info``: the process
    group (default: joined from torchrun's variables, or a single process)."""
    run = RunDir(run_dir)
    set_limits(config.limits)
    dist = info or init_distributed()
    return perform_run(
        run, config, lambda: open_work(run, dist), identity=identity, is_main=dist.is_main, world_size=dist.world_size
    )
