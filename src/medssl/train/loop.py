"""The one training loop, for pretraining and fine-tuning alike.

It knows a module whose ``forward(batch, step)`` returns a dict with ``"loss"``, an indexable
dataset whose item ``i`` depends only on ``i`` (so resume and DDP draw the same samples), and a
schedule. Per step: learning rate and weight decay from precomputed arrays, autocast where the
device supports it, backward, the module's gradient hook (``cancel_gradients``), clipping, optimizer
step, the module's ``on_after_step`` (EMA teachers). Every ``checkpoint_every`` steps the full state
goes atomically to ``checkpoints/last.pt``; a restarted run resumes from it and reproduces the
uninterrupted run.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from medssl.config import ScheduleConfig
from medssl.data.datasets import StepSampler
from medssl.methods.base import cosine_schedule, schedule_at
from medssl.models.checkpoint import atomic_torch_save, safe_torch_load
from medssl.runs import RunDir
from medssl.train.distributed import DistInfo, all_reduce_mean, barrier, broadcast_object

Validator = Callable[[nn.Module, int], dict[str, Any]]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf: the run stops with its last good checkpoint kept."""


@dataclass
class LoopResult:
    steps: int
    wall_seconds: float
    step_seconds: float
    last_metrics: dict[str, float] = field(default_factory=dict)
    resumed_from: int = 0
    stopped_at: int | None = None  # the step after which an early stop ended the run


def param_groups(
    module: nn.Module, weight_decay: float, lr_scale: Callable[[str], float] | None = None
) -> list[dict[str, Any]]:
    """No weight decay on biases, norms, tokens and position tables (standard for ViT/Swin).

    ``lr_scale(name)`` gives a parameter's learning-rate multiplier (layer-wise decay, a slower
    encoder); parameters are grouped by (decay, multiplier) and each group carries ``lr_scale``,
    which the loop applies to the scheduled learning rate at every step."""
    groups: dict[tuple[bool, float], dict[str, Any]] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        apply_wd = not (p.ndim <= 1 or name.endswith(".bias") or "token" in name or "position" in name)
        scale = float(lr_scale(name)) if lr_scale is not None else 1.0
        group = groups.setdefault((apply_wd, scale), {
            "params": [], "weight_decay": weight_decay if apply_wd else 0.0, "apply_wd": apply_wd, "lr_scale": scale,
        })
        group["params"].append(p)
    if not groups:  # keep the optimiser constructible for a module without trainable parameters
        return [{"params": [], "weight_decay": weight_decay, "apply_wd": True, "lr_scale": 1.0}]
    return [groups[key] for key in sorted(groups, key=lambda k: (not k[0], -k[1]))]


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off" or device.type != "cuda":
        return None  # CPU autocast slows these models down; fp32 on CPU
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


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


def _progress(description: str, total: int, start: int, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return contextlib.nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"), transient=True,
    )
    return progress


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
    """Train ``module`` for ``schedule.steps`` steps (resuming when ``run`` has a checkpoint)."""
    total = schedule.steps if total_steps is None else total_steps
    device = info.device
    module.to(device)
    raw = module
    if info.distributed:
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        raw = module
        ddp_kwargs: dict[str, Any] = {"find_unused_parameters": getattr(raw, "find_unused_parameters", False)}
        if device.type == "cuda":
            ddp_kwargs["device_ids"] = [device.index]
        module = nn.parallel.DistributedDataParallel(module, **ddp_kwargs)

    groups = raw.param_groups(schedule.weight_decay) if hasattr(raw, "param_groups") else param_groups(
        raw, schedule.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=schedule.lr, weight_decay=schedule.weight_decay,
                                  betas=schedule.betas)
    lr_at = cosine_schedule(schedule.lr, schedule.min_lr, total, schedule.warmup_steps)
    wd_end = schedule.weight_decay if schedule.weight_decay_end is None else schedule.weight_decay_end
    wd_at = cosine_schedule(schedule.weight_decay, wd_end, total)
    amp_dtype = autocast_dtype(schedule.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    start = 0
    stopped_at: int | None = None
    if run.last_checkpoint.exists():
        state = safe_torch_load(run.last_checkpoint)
        raw.load_state_dict(state["model"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start = int(state["step"])
        stopped_at = state.get("stopped_at")
        if info.is_main:
            run.truncate_metrics_after(start)
            run.log(f"resumed from step {start}")
    barrier(info)

    def save_checkpoint(step: int, stopped: bool = False) -> None:
        if info.is_main:
            atomic_torch_save(
                {"model": raw.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict(), "step": step, "stopped_at": step if stopped else None},
                run.last_checkpoint,
            )
        barrier(info)

    if stopped_at is not None:  # an early stop already ended this run; it is not trained further
        return LoopResult(steps=int(stopped_at), wall_seconds=0.0, step_seconds=0.0, resumed_from=start,
                          stopped_at=int(stopped_at))

    loader = DataLoader(
        dataset,
        batch_sampler=StepSampler(schedule.batch_size, total, start, info.rank, info.world_size),
        num_workers=schedule.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    step_fn = module
    if schedule.compile and hasattr(torch, "compile"):
        step_fn = torch.compile(module)

    module.train()
    last: dict[str, float] = {}
    train_time, timed_steps = 0.0, 0
    t_start = time.perf_counter()
    with _progress(description, total, start, info.is_main) as bar:
        task = bar.add_task(description, total=total, completed=start, info="") if bar else None
        step = start
        for step, batch in enumerate(loader, start=start):
            t0 = time.perf_counter()
            # Per-step seed: any randomness inside forward (dropout, drop path) replays after resume.
            torch.manual_seed(int(np.random.SeedSequence([schedule.seed, step, info.rank]).generate_state(1)[0]))
            for group in optimizer.param_groups:
                group["lr"] = schedule_at(lr_at, step) * group.get("lr_scale", 1.0)
                if group.get("apply_wd"):
                    group["weight_decay"] = schedule_at(wd_at, step)
            batch = _to_device(batch, device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                outputs = step_fn(batch, step)
            loss = outputs["loss"]
            if not torch.isfinite(loss.detach()).all():
                raise NonFiniteLossError(f"loss is {float(loss.detach())} at step {step + 1}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if hasattr(raw, "cancel_gradients"):
                raw.cancel_gradients(step)
            grad_norm = None
            if schedule.grad_clip:
                scaler.unscale_(optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(raw.parameters(), schedule.grad_clip))
            scaler.step(optimizer)
            scaler.update()
            if hasattr(raw, "on_after_step"):
                raw.on_after_step(step)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            if step > start:  # the first step pays warm-up costs
                train_time += dt
                timed_steps += 1
            done = step + 1

            if done % schedule.log_every == 0 or done == total:
                metrics = {k: _scalar(v) for k, v in outputs.items()}
                metrics = {k: v for k, v in metrics.items() if v is not None and math.isfinite(v)}
                if grad_norm is not None:
                    metrics["grad_norm"] = grad_norm
                metrics = all_reduce_mean(metrics, info)
                last = metrics
                if info.is_main:
                    run.append_metrics({"step": done, "lr": schedule_at(lr_at, step), **metrics})
            if validate is not None and val_every and (done % val_every == 0 or done == total):
                module.eval()
                val = validate(raw, done) if info.is_main else {}
                module.train()
                stop = bool(val.pop("stop", False)) if info.is_main else False
                if info.is_main and val:
                    run.append_metrics({"step": done, **val})
                if broadcast_object(stop, info) and done < total:
                    stopped_at = done
                    save_checkpoint(done, stopped=True)
                    if info.is_main:
                        run.log(f"early stop after step {done}: validation plateau")
                    break
                barrier(info)
            if done % schedule.checkpoint_every == 0 or done == total:
                save_checkpoint(done)
            if bar is not None:
                bar.update(task, completed=done, info=f"loss {float(loss.detach()):.4f}")
    wall = time.perf_counter() - t_start
    end = total if stopped_at is None else stopped_at
    steps_done = max(end - start, 0)
    step_seconds = train_time / timed_steps if timed_steps else (wall / steps_done if steps_done else 0.0)
    return LoopResult(steps=end, wall_seconds=wall, step_seconds=step_seconds, last_metrics=last,
                      resumed_from=start, stopped_at=stopped_at)
