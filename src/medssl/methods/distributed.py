"""Cross-process gathers of the contrastive losses (negatives and keys from every process).

``methods/`` may not import ``train/``: these use ``torch.distributed`` directly and are the
identity when no process group is initialised (one process).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every process's gradient of its own rows."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        rank, world = rank_and_world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # Every process computed the loss on the full gathered batch: the gradient of its rows is
        # the sum over processes (DDP then averages parameter gradients, giving the true gradient).
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: Tensor) -> Tensor:
    """Rows of ``x`` from every process (equal batch sizes), differentiable; ``x`` when not distributed.

    SimCLR's negatives over the global batch (``tf.tpu.cross_replica_sum`` in its ``objective.py``).
    """
    if rank_and_world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """Rows of ``x`` from every process, without gradient (MoCo v3's ``concat_all_gather`` of the keys)."""
    world = rank_and_world()[1]
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
