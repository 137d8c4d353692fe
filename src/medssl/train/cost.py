"""The measured cost of a pretraining run: FLOPs per step, wall time, device-hours, peak memory.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` over one training step of the method
(forward and backward, the loss included) on the run's first batch, counted once before training.
The count leaves no trace: parameters, buffers (DINO's centre, BatchNorm statistics), gradients and
the random state are restored afterwards, so a run with the count is the run without it.
FlopCounterMode counts matrix multiplications and convolutions (the bulk of a Swin's work), not
element-wise operations, so it is a slight undercount, the same way for every method.
"""

from __future__ import annotations

import copy
import resource
import sys
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate
from torch.utils.flop_counter import FlopCounterMode

from medssl.data.datasets import global_indices
from medssl.train.distributed import DistInfo, all_reduce_mean


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def step_flops(module: nn.Module, dataset: Dataset, global_batch: int, info: DistInfo) -> int:
    """FLOPs of one global training step (forward + backward over the whole batch, all ranks)."""
    module.to(info.device)
    indices = global_indices(0, global_batch, info.rank, info.world_size)
    batch = _to_device(default_collate([dataset[i] for i in indices]), info.device)
    saved = copy.deepcopy(module.state_dict())
    was_training = module.training
    devices = [info.device.index or 0] if info.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        module.train()
        with FlopCounterMode(display=False) as counter:
            module(batch, 0)["loss"].backward()
    module.zero_grad(set_to_none=True)
    module.load_state_dict(saved)
    module.train(was_training)
    local = float(counter.get_total_flops())
    return int(round(all_reduce_mean({"flops": local}, info)["flops"] * info.world_size))


def reset_peak_memory(info: DistInfo) -> None:
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(info.device)


def peak_memory(info: DistInfo) -> tuple[int, str]:
    """Peak memory of this process: CUDA's max allocated bytes, or the peak resident set on CPU."""
    if info.device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(info.device)), "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "cpu_peak_rss"  # Linux reports KiB


def run_cost(flops_per_step: int | None, steps: int, wall_seconds: float, info: DistInfo) -> dict[str, Any]:
    """The ``cost`` entry of a pretraining run's results.json."""
    memory, memory_kind = peak_memory(info)
    return {
        "flops_per_step": flops_per_step,
        "total_flops": flops_per_step * steps if flops_per_step is not None else None,
        "steps": steps,
        "wall_seconds": wall_seconds,
        "devices": info.world_size,
        "device_kind": info.device.type,
        "device_hours": wall_seconds * info.world_size / 3600.0,
        "peak_memory_bytes": memory,
        "peak_memory_kind": memory_kind,
        "flop_counter": "torch.utils.flop_counter.FlopCounterMode, one step (forward+backward) on the first batch",
    }
