"""What every run does around its work: lock, status, timing, and a clean record of failures."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

from medssl.errors import describe_error
from medssl.runs import RunDir
from medssl.train.distributed import DistInfo
from medssl.version import code_version


def hardware() -> dict[str, Any]:
    """Where the run ran, for the report's provenance."""
    import platform

    import torch

    info: dict[str, Any] = {"host": platform.node(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                            "device": "cpu"}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["gpu_count"] = torch.cuda.device_count()
    return info


class AlreadyFinished(Exception):
    """Another process finished the run while this one waited for its lock."""


@contextlib.contextmanager
def run_session(run: RunDir, info: DistInfo, config_yaml: str, run_info: dict[str, Any]) -> Iterator[float]:
    """Hold the run's lock (rank 0), mark it running, and record how it ended.

    Yields the start time. The caller writes results and marks the run finished; an exception
    marks it failed (or pending again when interrupted, so the next start resumes it).
    """
    lock = run.lock() if info.is_main else contextlib.nullcontext()
    with lock:
        started = time.time()
        if run.is_finished():  # checked again under the lock: the holder may have just finished it
            raise AlreadyFinished(run.id)
        if info.is_main:
            run.prepare(config_yaml, {"run_id": run.id, "code_version": code_version(),
                                      "created": run.info().get("created", started),
                                      "hardware": {**hardware(), "world_size": info.world_size}, **run_info})
            run.set_status("running")
            run.log(f"start {run_info.get('kind', 'run')} (pid {os.getpid()}, world size {info.world_size})")
        try:
            yield started
        except KeyboardInterrupt:
            if info.is_main:
                run.set_status("pending", error="interrupted; resumes from the last checkpoint")
                run.log("interrupted")
            raise
        except BaseException as err:
            if info.is_main and not run.is_finished():
                run.set_status("failed", error=describe_error(err))
                run.log(f"failed: {describe_error(err)}")
            raise


def finish(run: RunDir, info: DistInfo, results: dict[str, Any]) -> None:
    if info.is_main:
        run.write_results(results)
        run.set_status("finished")
        run.log("finished")
