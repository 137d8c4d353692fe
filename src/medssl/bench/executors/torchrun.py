"""The torchrun executor: one run at a time, each distributed kind (``RunKind.distributed``) as
``torchrun --standalone --nproc_per_node N -m medssl.train.launch`` (DDP); the others in process.

The bench process claims the run and records how it ended; inside torchrun only global rank 0
writes to the run directory (``medssl.runs.perform_run``), the other ranks compute."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medssl.runs import RunDir

from ..kinds import run_kind
from ..plan import PlannedRun
from .dispatch import RunFailed, run_in_process, status_error
from .local import LocalExecutor
from .schedule import print_to_console

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # the torchrun of this interpreter


def launch_args(run: PlannedRun, run_dir: Path) -> list[str]:
    """What every torchrun rank runs: the training worker reading the config the claim wrote."""
    return [
        "-m",
        "medssl.train.launch",
        "--kind",
        run.kind,
        "--config",
        str(RunDir(run_dir).config_path),
        "--run-dir",
        str(run_dir),
    ]


@dataclass
class TorchrunRunner:
    """Distributed kinds under torchrun on this node; the other kinds (CKA: small) in process."""

    nproc_per_node: int

    def command(self, run: PlannedRun, run_dir: Path) -> list[str]:
        return [*TORCHRUN, "--standalone", "--nproc_per_node", str(self.nproc_per_node), *launch_args(run, run_dir)]

    def __call__(self, run: PlannedRun, run_dir: Path) -> None:
        if not run_kind(run.kind).distributed:
            run_in_process(run, run_dir)
            return
        started = time.time()
        proc = subprocess.run(self.command(run, run_dir), check=False)
        if proc.returncode != 0:
            error = status_error(RunDir(run_dir), since=started)
            raise RunFailed(error or f"torchrun exited with code {proc.returncode}")


class TorchrunExecutor(LocalExecutor):
    """One run at a time, each under ``torchrun --nproc_per_node N`` (DDP); CKA runs in process."""

    def __init__(
        self, nproc_per_node: int = 1, poll_seconds: float = 1.0, log: Callable[[str], None] = print_to_console
    ) -> None:
        super().__init__(workers=1, runner=TorchrunRunner(nproc_per_node), poll_seconds=poll_seconds, log=log)
