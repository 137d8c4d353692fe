"""The one training loop, for pretraining and fine-tuning alike.

It knows a module whose ``forward(batch, step)`` returns a dict with ``"loss"``, an indexable
dataset whose item ``i`` depends only on ``i`` (so resume and DDP draw the same samples), and a
schedule. :func:`train` reads as build -> resume -> loop of step / log / validate / checkpoint; the
step itself (schedule, autocast, backward, gradient hooks, clipping, optimiser, EMA) is
:func:`medssl.train.step.train_step`, the one the dry-run estimate and the benchmarks time. Every
``checkpoint_every`` steps the full state goes atomically to ``checkpoints/last.pt``; a restarted
run resumes from it and reproduces the uninterrupted run. A validator may end the run early by
returning ``"stop": True``.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from medssl.config import ScheduleConfig
from medssl.data.datasets import StepSampler
from medssl.fileio import named_disk_full
from medssl.limits import check_batch_size
from medssl.models.checkpoint import atomic_torch_save, safe_torch_load
from medssl.runs import RunDir
from medssl.train.distributed import DistInfo, all_reduce_mean, barrier, broadcast_object
from medssl.train.step import (
    NonFiniteLossError,
    Optimisation,
    StepResult,
    autocast_dtype,
    build_optimisation,
    synchronize,
    train_step,
)

__all__ = ["LoopResult", "NonFiniteLossError", "Validator", "autocast_dtype", "train"]

Validator = Callable[[nn.Module, int], dict[str, Any]]


@dataclass
class LoopResult:
    steps: int
    wall_seconds: float
    step_seconds: float
    last_metrics: dict[str, float] = field(default_factory=dict)
    resumed_from: int = 0
    stopped_at: int | None = None  # the step a validator's "stop" ended the run at
    data_wait_share: float | None = None  # time waiting for batches / (waiting + stepping)


@dataclass
class _Timer:
    """Seconds spent waiting for batches and stepping, overall and since the last log."""

    step: float = 0.0
    wait: float = 0.0
    steps: int = 0
    window_step: float = 0.0
    window_wait: float = 0.0

    def add(self, wait: float, step: float, counted: bool) -> None:
        self.window_wait += wait
        self.window_step += step
        if counted:  # the first step pays warm-up costs (allocation, workers starting)
            self.wait += wait
            self.step += step
            self.steps += 1

    def window_share(self) -> float | None:
        share = _share(self.window_wait, self.window_step)
        self.window_wait = self.window_step = 0.0
        return share

    def share(self) -> float | None:
        return _share(self.wait, self.step)


def _share(wait: float, step: float) -> float | None:
    return wait / (wait + step) if wait + step > 0 else None


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _scalar(v: Any) -> float | None:
    if isinstance(v, torch.Tensor):
        return float(v.detach().float().mean()) if v.numel() else None
    if isinstance(v, int | float):
        return float(v)
    return None


def _progress(description: str, enabled: bool) -> Any:
    if not enabled or not sys.stderr.isatty():
        return contextlib.nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        transient=True,
    )


def _wrap(module: nn.Module, info: DistInfo) -> tuple[nn.Module, nn.Module]:
    """(the module the step's hooks and state dict use, the one whose forward runs)."""
    module.to(info.device)
    if not info.distributed:
        return module, module
    raw = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    ddp_kwargs: dict[str, Any] = {"find_unused_parameters": getattr(raw, "find_unused_parameters", False)}
    if info.device.type == "cuda":
        ddp_kwargs["device_ids"] = [info.device.index]
    return raw, nn.parallel.DistributedDataParallel(raw, **ddp_kwargs)


def _resume(opt: Optimisation, run: RunDir, info: DistInfo) -> tuple[int, int | None]:
    """Load ``last.pt`` when there is one; returns the step to start from and, when an early stop
    already ended the run, the step it stopped at (such a run is not trained further).

    Whatever was logged after the step the run restarts from is dropped (``metrics.jsonl`` and the
    TensorBoard events), so a step is never recorded twice: after the checkpoint's step, or everything
    when a kill came before the first checkpoint (the run starts again from step 0)."""
    start, stopped_at = 0, None
    if run.last_checkpoint.exists():
        state = safe_torch_load(run.last_checkpoint)
        opt.module.load_state_dict(state["model"], strict=True)
        if opt.optimizer is not None:
            opt.optimizer.load_state_dict(state["optimizer"])
        opt.scaler.load_state_dict(state["scaler"])
        start = int(state["step"])
        stopped_at = state.get("stopped_at")
        if info.is_main:
            run.truncate_metrics_after(start)
            run.log(f"resumed from step {start}")
    elif info.is_main and run.metrics_path.exists():
        run.truncate_metrics_after(0)
        run.log("restarted from step 0 (killed before the first checkpoint): earlier records dropped")
    barrier(info)
    return start, stopped_at


def _save_checkpoint(opt: Optimisation, run: RunDir, info: DistInfo, step: int, stopped: bool = False) -> None:
    if info.is_main:
        optimizer_state = opt.optimizer.state_dict() if opt.optimizer is not None else {}
        atomic_torch_save(
            {
                "model": opt.module.state_dict(),
                "optimizer": optimizer_state,
                "scaler": opt.scaler.state_dict(),
                "step": step,
                "stopped_at": step if stopped else None,
            },
            run.last_checkpoint,
        )
    barrier(info)


def _worker_context(num_workers: int) -> str | None:
    """Fork the loader's workers on Linux (PyTorch's own default there) even when the run itself was
    spawned (the bench's local executor spawns runs, and a spawned process spawns its workers): a spawned
    worker would receive the dataset by pickle, and with it the method whose ``make_views`` it calls —
    weight-normalised heads (DINO, iBOT, SMIT) do not pickle. Elsewhere: the platform's default."""
    if num_workers > 0 and sys.platform.startswith("linux"):
        return "fork"
    return None


def _timed_batches(loader: DataLoader, start: int) -> Iterator[tuple[int, Any, float]]:
    """(step, batch, seconds waited for it) from the loader."""
    it = iter(loader)
    step = start
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        yield step, batch, time.perf_counter() - t0
        step += 1


def _log(
    run: RunDir, info: DistInfo, opt: Optimisation, step: int, result: StepResult, data_wait_share: float | None
) -> dict[str, float]:
    scalars = {k: _scalar(v) for k, v in result.outputs.items()}
    metrics = {k: v for k, v in scalars.items() if v is not None and math.isfinite(v)}
    if result.grad_norm is not None:
        metrics["grad_norm"] = result.grad_norm
    if data_wait_share is not None:
        metrics["data_wait_share"] = data_wait_share
    metrics = all_reduce_mean(metrics, info)
    if info.is_main:
        run.append_metrics({"step": step + 1, "lr": opt.lr(step), **metrics})
    return metrics


def _validate(validate: Validator, forward: nn.Module, raw: nn.Module, run: RunDir, info: DistInfo, done: int) -> bool:
    """Run the validator on rank 0 and record it; True when it asks to stop (every rank agrees)."""
    forward.eval()
    val = dict(validate(raw, done)) if info.is_main else {}
    forward.train()
    stop = bool(val.pop("stop", False))
    if info.is_main and val:
        run.append_metrics({"step": done, **val})
    stop = bool(broadcast_object(stop, info))
    barrier(info)
    return stop


def train(
    module: nn.Module,
    dataset: Dataset,
    schedule: ScheduleConfig,
    run: RunDir,
    info: DistInfo,
    *,
    total_steps: int | None = None,
    validate: Validator | None = None,
    val_every: int | None = None,
    description: str = "train",
) -> LoopResult:
    """Train ``module`` for ``schedule.steps`` steps (resuming when ``run`` has a checkpoint).

    A full disk ends it with ``OSError(ENOSPC)`` naming the file or the run folder (the command line
    prints "no space left on <path>"); what was written before stays: every file is replaced atomically.
    """
    check_batch_size(schedule.batch_size, run.config_path)  # this process's limits: the run's own
    try:
        return _train(module, dataset, schedule, run, info, total_steps, validate, val_every, description)
    except OSError as err:
        named = named_disk_full(err, run.path)
        if named is None:
            raise
        raise named from err


def _train(
    module: nn.Module,
    dataset: Dataset,
    schedule: ScheduleConfig,
    run: RunDir,
    info: DistInfo,
    total_steps: int | None,
    validate: Validator | None,
    val_every: int | None,
    description: str,
) -> LoopResult:
    total = schedule.steps if total_steps is None else total_steps
    raw, wrapped = _wrap(module, info)
    opt = build_optimisation(raw, schedule, total, info.device)
    start, stopped_before = _resume(opt, run, info)
    if stopped_before is not None:
        return LoopResult(
            steps=int(stopped_before),
            wall_seconds=0.0,
            step_seconds=0.0,
            resumed_from=start,
            stopped_at=int(stopped_before),
        )
    loader = DataLoader(
        dataset,
        batch_sampler=StepSampler(schedule.batch_size, total, start, info.rank, info.world_size),
        num_workers=schedule.num_workers,
        pin_memory=info.device.type == "cuda",
        persistent_workers=False,
        multiprocessing_context=_worker_context(schedule.num_workers),
    )
    forward = torch.compile(wrapped) if schedule.compile and hasattr(torch, "compile") else wrapped

    wrapped.train()
    last: dict[str, float] = {}
    timer = _Timer()
    stopped_at: int | None = None
    t_start = time.perf_counter()
    with _progress(description, info.is_main) as bar:
        task = bar.add_task(description, total=total, completed=start, info="") if bar else None
        for step, batch, waited in _timed_batches(loader, start):
            t0 = time.perf_counter()
            # Per-step seed: any randomness inside forward (dropout, drop path) replays after resume.
            torch.manual_seed(int(np.random.SeedSequence([schedule.seed, step, info.rank]).generate_state(1)[0]))
            result = train_step(opt, _to_device(batch, info.device), step, forward)
            synchronize(info.device)
            timer.add(waited, time.perf_counter() - t0, counted=step > start)
            done = step + 1
            if done % schedule.log_every == 0 or done == total:
                last = _log(run, info, opt, step, result, timer.window_share())
            if validate is not None and val_every and (done % val_every == 0 or done == total):
                stopped_at = done if _validate(validate, wrapped, raw, run, info, done) and done < total else None
            if done % schedule.checkpoint_every == 0 or done == total or stopped_at is not None:
                _save_checkpoint(opt, run, info, done, stopped=stopped_at is not None and done < total)
            if bar is not None:
                bar.update(task, completed=done, info=f"loss {float(result.loss.detach()):.4f}")
            if stopped_at is not None:
                if info.is_main:
                    run.log(f"early stop after step {done}: validation plateau")
                break
    wall = time.perf_counter() - t_start
    steps_done = max((stopped_at or total) - start, 0)
    step_seconds = timer.step / timer.steps if timer.steps else (wall / steps_done if steps_done else 0.0)
    return LoopResult(
        steps=stopped_at or total,
        wall_seconds=wall,
        step_seconds=step_seconds,
        last_metrics=last,
        resumed_from=start,
        stopped_at=stopped_at,
        data_wait_share=timer.share(),
    )
