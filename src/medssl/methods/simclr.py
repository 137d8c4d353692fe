"""SimCLR (Chen et al. 2020) in 3D, and the pieces the other two-crop methods share.

Two random resized crops of one region, each flipped and intensity-augmented; the encoder's
pooled bottleneck goes through a 2-layer MLP projector (2048 -> 128, BatchNorm on the hidden
layer); NT-Xent at temperature 0.1 over the 2N views, where the negatives of a view are every other
view of the global batch (gathered from all processes, with gradients, as SimCLR does with its
large global batches).

Shared here (imported by MoCo v3, BYOL and SwinUNETR-SSL): the two-crop view options and
pipeline, the encoder + projector branch an EMA teacher copies, and the cross-process gathers.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from pydantic import Field, field_validator
from torch import Tensor, nn

from medssl.config import StrictModel
from medssl.data.views import enlarged_region_side, intensity_augment, random_flip, two_crops
from medssl.methods.base import SSLMethod, embedding_std, register
from medssl.methods.losses import nt_xent
from medssl.models.encoder import SwinEncoder, global_pool
from medssl.models.heads import MLPHead

# --------------------------------------------------------------------------- options and views


class IntensityAugmentParams(StrictModel):
    """Grey-level augmentation of each view (the 3D stand-in for colour jitter and blur)."""

    scale_prob: float = Field(0.8, ge=0.0, le=1.0, description="probability of an intensity scaling")
    scale_factor: float = Field(0.1, ge=0.0, description="scaling by 1 + U(-f, f)")
    shift_prob: float = Field(0.8, ge=0.0, le=1.0, description="probability of an intensity shift")
    shift_offset: float = Field(0.1, ge=0.0, description="shift by U(-o, o) (intensities ~[0, 1])")
    noise_prob: float = Field(0.2, ge=0.0, le=1.0, description="probability of Gaussian noise")
    noise_std: float = Field(0.05, ge=0.0, description="largest noise standard deviation")
    blur_prob: float = Field(0.2, ge=0.0, le=1.0, description="probability of Gaussian blur")
    blur_sigma: tuple[float, float] = Field((0.5, 1.0), description="blur sigma range, voxels")


class TwoCropParams(StrictModel):
    """Options of the two-crop views shared by SimCLR, MoCo v3 and BYOL."""

    region_scale: float = Field(1.25, ge=1.0, description="region side / crop side (rounded up to 16)")
    crop_scale: tuple[float, float] = Field((0.3, 1.0), description="fraction of the region's volume a crop covers")
    flip_prob: float = Field(0.5, ge=0.0, le=1.0, description="flip probability per spatial axis")
    augment: IntensityAugmentParams = Field(default_factory=IntensityAugmentParams)

    @field_validator("crop_scale")
    @classmethod
    def _valid_scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < v[0] <= v[1] <= 1.0:
            raise ValueError("crop_scale must satisfy 0 < lo <= hi <= 1")
        return v


def augmented_pair(
    region: Tensor, crop_size: int, rng: np.random.Generator, params: TwoCropParams
) -> dict[str, Tensor]:
    """The positive pair: two random resized crops, each flipped and intensity-augmented."""
    first, second = two_crops(region, crop_size, rng, params.crop_scale)
    augment = params.augment.model_dump()
    views = {}
    for key, crop in (("view1", first), ("view2", second)):
        views[key] = intensity_augment(random_flip(crop, rng, params.flip_prob), rng, **augment)
    return views


def freeze_mask_token(encoder: SwinEncoder) -> None:
    """Methods that never mask leave the mask token unused: freeze it so DDP sees no unused parameter."""
    encoder.mask_token.requires_grad_(False)


# --------------------------------------------------------------------------- branches


class ProjectedEncoder(nn.Module):
    """Encoder -> pooled bottleneck -> projector: the branch that MoCo v3 and BYOL copy as EMA teacher.

    ``forward(views)`` runs the encoder once on the concatenated views (the Swin has no batch
    statistics) and the projector on each view separately, so its BatchNorm normalises per view as
    in the MoCo v3 and BYOL code. Returns the pooled features (all views) and one projection per view.
    """

    def __init__(self, encoder: SwinEncoder, projector: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector

    def forward(self, views: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        sizes = [v.shape[0] for v in views]
        pooled = global_pool(self.encoder(torch.cat(views, dim=0))[-1])
        return pooled, [self.projector(chunk) for chunk in torch.split(pooled, sizes, dim=0)]


# --------------------------------------------------------------------------- distributed


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every process's gradient of its own rows."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        rank, world = rank_and_world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        # Every process computed the loss on the full gathered batch: the gradient of its rows is
        # the sum over processes (DDP then averages parameter gradients, giving the true gradient).
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: Tensor) -> Tensor:
    """Rows of ``x`` from every process (equal batch sizes), differentiable; ``x`` when not distributed."""
    if rank_and_world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """Rows of ``x`` from every process, without gradient (MoCo's keys); ``x`` when not distributed."""
    world = rank_and_world()[1]
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


# --------------------------------------------------------------------------- SimCLR


class SimCLRParams(TwoCropParams):
    temperature: float = Field(0.1, gt=0.0, description="NT-Xent temperature")
    proj_hidden_dim: int = Field(2048, ge=1, description="projector hidden width")
    proj_dim: int = Field(128, ge=1, description="projector output (embedding) width")
    proj_layers: int = Field(2, ge=1, description="linear layers in the projector")


@register
class SimCLR(SSLMethod):
    name = "simclr"
    family = "contrastive"
    description = "SimCLR: two augmented crops, MLP projector, NT-Xent over the global batch (tau 0.1)."
    Params = SimCLRParams

    def __init__(self, encoder: SwinEncoder, params: SimCLRParams, crop_size: int, total_steps: int) -> None:
        super().__init__(encoder, params, crop_size, total_steps)
        freeze_mask_token(encoder)
        self.projector = MLPHead(
            encoder.out_channels, params.proj_hidden_dim, params.proj_dim, n_layers=params.proj_layers
        )

    def region_size(self, crop_size: int) -> int:
        return enlarged_region_side(crop_size, self.params.region_scale)

    def make_views(self, region: Tensor, rng: np.random.Generator) -> dict[str, Tensor]:
        return augmented_pair(region, self.crop_size, rng, self.params)

    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        n = batch["view1"].shape[0]
        pooled = global_pool(self.encoder(torch.cat([batch["view1"], batch["view2"]], dim=0))[-1])
        # SimCLR runs both views as one batch, so the projector's BatchNorm sees all 2N views.
        z = self.projector(pooled)
        loss = nt_xent(gather_with_grad(z[:n]), gather_with_grad(z[n:]), self.params.temperature)
        return {"loss": loss, "nt_xent": loss.detach(), "embedding_std": embedding_std(pooled)}
