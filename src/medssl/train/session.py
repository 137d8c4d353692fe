"""What every run does around its work: lock, status, timing, and a clean record of failures."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from typing import Any

from medssl.errors import describe_error
from medssl.runs import IDENTITY_INFO, RunDir
from medssl.train.distributed import DistInfo
from medssl.version import code_version


def hardware() -> dict[str, Any]:
    """Where the run ran, for the report's provenance."""
    import platform

    import torch

    info: dict[str, Any] = {
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "device": "cpu",
    }
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
        # checked again under the lock: another process may have just created or finished it
        run.check_identity(config_yaml, {k: run_info[k] for k in IDENTITY_INFO if k in run_info})
        if run.is_finished():
            raise AlreadyFinished(run.id)
        try:
            if info.is_main:
                sweep_stale_temporaries(run, started)
                run.prepare(
                    config_yaml,
                    {
                        "run_id": run.id,
                        "code_version": code_version(),
                        "created": run.info().get("created", started),
                        "hardware": {**hardware(), "world_size": info.world_size},
                        **run_info,
                    },
                )
                run.set_status("running")
                run.log(f"start {run_info.get('kind', 'run')} (pid {os.getpid()}, world size {info.world_size})")
            yield started
        except KeyboardInterrupt:
            if info.is_main:
                record_end(run, "pending", "interrupted; resumes from the last checkpoint")
            raise
        except BaseException as err:
            if info.is_main and not run.is_finished():
                record_end(run, "failed", describe_error(err))
            raise


def record_end(run: RunDir, status: str, message: str) -> None:
    """Record how the run ended without ever masking the error that ended it.

    On a full disk the atomic status write fails (it needs a second file): then status.json is
    overwritten in place, which needs no new blocks, so the run reads "failed" with the original
    message instead of "running" forever."""
    try:
        run.set_status(status, error=message)
    except OSError:
        payload = json.dumps({"status": status, "error": message, "updated": time.time(), "pid": os.getpid()})
        with contextlib.suppress(OSError), open(run.status_path, "r+" if run.status_path.exists() else "w") as f:
            f.truncate(0)
            f.write(payload + "\n")
    with contextlib.suppress(OSError):
        run.log(f"{'interrupted' if status == 'pending' else 'failed'}: {message}")


def sweep_stale_temporaries(run: RunDir, lock_taken: float) -> int:
    """Delete temporary files (``.name.XXXX.tmp``) of killed processes; returns how many.

    Called holding the run's lock: a checkpoint temporary older than the lock belongs to a process
    that died holding it (a base-preset ``last.pt`` is ~400 MB). In the run folder itself the
    scheduler may be writing status under its own claim, so only files older than a minute go."""
    removed = 0
    for folder, before in ((run.checkpoint_dir, lock_taken), (run.path, lock_taken - 60.0)):
        for tmp in folder.glob(".*.tmp") if folder.is_dir() else []:
            with contextlib.suppress(OSError):
                if tmp.is_file() and tmp.stat().st_mtime < before:
                    tmp.unlink()
                    removed += 1
    return removed


def finish(run: RunDir, info: DistInfo, results: dict[str, Any]) -> None:
    if info.is_main:
        run.write_results(results)
        run.set_status("finished")
        run.log("finished")
