"""DINO (Caron et al. 2021) in 3D: self-distillation with no labels, multi-crop, EMA teacher.

Two global crops (0.4-1.0 of the region's volume, resized to ``crop_size``) and ``n_local_crops``
local crops (0.05-0.4, resized to ``local_size``); the student (encoder + DINO head on the
mean-pooled bottleneck) sees every crop, the EMA teacher the global crops only. Loss: cross-entropy
between the centred, sharpened teacher distribution and the student's over every pair of different
views. The teacher temperature warms up linearly, the EMA momentum follows a cosine from 0.996 to 1
by *global* step, and the prototypes' last layer is frozen for the first steps.

``Centering`` (the teacher centre with its momentum update, all-reduced across processes) lives
here and is shared by iBOT and SMIT.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from pydantic import Field, model_validator
from torch import Tensor, nn

from medssl.config import CropSize, StrictModel
from medssl.data.multicrop import local_crop_size, multicrop_views
from medssl.methods.base import (
    EMATeacher,
    SSLMethod,
    embedding_std,
    linear_warmup_then_constant,
    register,
    schedule_at,
)
from medssl.methods.losses import dino_cross_entropy, softmax_entropy, teacher_probs, update_centre
from medssl.models.encoder import SwinEncoder, global_pool
from medssl.models.heads import DINOHead


class Centering(nn.Module):
    """The teacher centre ``c`` (a buffer, so it is checkpointed) and its momentum update.

    ``update`` averages the teacher logits over the *global* batch (summed and counted with one
    ``all_reduce`` when ``torch.distributed`` is initialised), so every process holds the same
    centre and a DDP run matches one process on the same global batch.
    """

    centre: Tensor

    def __init__(self, dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.dim = dim
        self.momentum = momentum
        self.register_buffer("centre", torch.zeros(1, dim))

    @torch.no_grad()
    def update(self, teacher_logits: Tensor) -> None:
        flat = teacher_logits.detach().float().reshape(-1, self.dim)
        packed = torch.cat([flat.sum(dim=0), flat.new_tensor([flat.shape[0]])])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(packed)
        batch_mean = (packed[:-1] / packed[-1]).unsqueeze(0)
        self.centre.copy_(update_centre(self.centre, batch_mean, self.momentum))


def default_steps(value: int | None, total_steps: int, fraction: float) -> int:
    """An explicit step count, or ``fraction`` of the run when unset (recipes count epochs)."""
    return int(value) if value is not None else int(round(fraction * total_steps))


def view_major(x: Tensor) -> Tensor:
    """(B, V, ...) -> (V*B, ...) ordered view by view, so ``chunk(V)`` gives one view per chunk."""
    return x.transpose(0, 1).reshape(-1, *x.shape[2:])


class DistillationParams(StrictModel):
    """Head, temperatures and EMA of self-distillation (DINO, iBOT and SMIT's distillation)."""

    out_dim: int = Field(8192, ge=2, description="K, number of prototypes")
    hidden_dim: int = Field(2048, ge=1)
    bottleneck_dim: int = Field(256, ge=1)
    head_layers: int = Field(3, ge=1)
    norm_last_layer: bool = True
    intensity_prob: float = Field(0.8, ge=0.0, le=1.0)
    student_temp: float = Field(0.1, gt=0)
    teacher_temp_start: float = Field(0.04, gt=0)
    teacher_temp: float = Field(0.07, gt=0)
    teacher_temp_warmup_steps: int | None = Field(None, ge=0, description="None: 30% of the run")
    centre_momentum: float = Field(0.9, ge=0.0, le=1.0)
    teacher_momentum: float = Field(0.996, ge=0.0, le=1.0)
    freeze_last_layer_steps: int | None = Field(None, ge=0, description="None: 1% of the run")


class DINOParams(DistillationParams):
    n_local_crops: int = Field(8, ge=0)
    local_size: CropSize | None = Field(None, description="None: crop_size // 2 rounded down to a multiple of 32")
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    global_blur_prob: tuple[float, float] = (1.0, 0.1)
    local_blur_prob: float = Field(0.5, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _check(self) -> DINOParams:
        for name in ("global_crop_scale", "local_crop_scale"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"{name} must satisfy 0 < low <= high <= 1")
        return self


@register
class DINO(SSLMethod):
    name = "dino"
    family = "self_distillation"
    description = "DINO: multi-crop self-distillation to an EMA teacher with centring and sharpening."
    Params = DINOParams
    params: DINOParams

    def __init__(self, encoder: SwinEncoder, params: DINOParams, crop_size: int, total_steps: int) -> None:
        super().__init__(encoder, params, crop_size, total_steps)
        # DINO never masks: a mask token without gradient would stall DDP's reducer.
        encoder.mask_token.requires_grad_(False)
        self.local_size = params.local_size or local_crop_size(crop_size)
        self.head = self._make_head(encoder.out_channels)
        self.teacher_encoder = EMATeacher(encoder, params.teacher_momentum, total_steps)
        self.teacher_head = EMATeacher(self.head, params.teacher_momentum, total_steps)
        self.centering = Centering(params.out_dim, params.centre_momentum)
        warmup = default_steps(params.teacher_temp_warmup_steps, self.total_steps, 0.3)
        self.teacher_temp_schedule = linear_warmup_then_constant(
            params.teacher_temp_start, params.teacher_temp, warmup, self.total_steps
        )
        self.freeze_last_layer_steps = default_steps(params.freeze_last_layer_steps, self.total_steps, 0.01)

    def _make_head(self, in_dim: int, out_dim: int | None = None) -> DINOHead:
        p = self.params
        return DINOHead(in_dim, out_dim or p.out_dim, p.hidden_dim, p.bottleneck_dim, p.head_layers,
                        p.norm_last_layer)

    # data side -----------------------------------------------------------------------------
    def make_views(self, region: Tensor, rng: np.random.Generator) -> dict[str, Tensor]:
        p = self.params
        return multicrop_views(
            region, rng, crop_size=self.crop_size, n_local=p.n_local_crops, local_size=self.local_size,
            global_scale=p.global_crop_scale, local_scale=p.local_crop_scale,
            global_blur_prob=p.global_blur_prob, local_blur_prob=p.local_blur_prob,
            intensity_prob=p.intensity_prob,
        )

    # model side ----------------------------------------------------------------------------
    def teacher_temperature(self, step: int) -> float:
        return schedule_at(self.teacher_temp_schedule, step)

    def _student_local_logits(self, batch: dict[str, Tensor]) -> list[Tensor]:
        if "local_crops" not in batch or batch["local_crops"].shape[1] == 0:
            return []
        locals_ = batch["local_crops"]
        pooled = global_pool(self.encoder(view_major(locals_))[-1])
        return list(self.head(pooled).chunk(locals_.shape[1]))

    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        p = self.params
        globals_ = view_major(batch["global_crops"])
        n_global = batch["global_crops"].shape[1]
        student_pooled = global_pool(self.encoder(globals_)[-1])
        student = list(self.head(student_pooled).chunk(n_global)) + self._student_local_logits(batch)

        teacher_logits = self.teacher_head(global_pool(self.teacher_encoder(globals_)[-1]))
        temp = self.teacher_temperature(step)
        targets = teacher_probs(teacher_logits, self.centering.centre, temp)
        loss = dino_cross_entropy(student, list(targets.chunk(n_global)), p.student_temp)
        self.centering.update(teacher_logits)
        return {
            "loss": loss,
            "dino_ce": loss.detach(),
            "embedding_std": embedding_std(student_pooled),
            "teacher_entropy": softmax_entropy(targets),
            "teacher_temp": loss.new_tensor(temp).detach(),
        }

    def last_layer_parameters(self) -> list[nn.Parameter]:
        return self.head.last_layer_parameters()

    def cancel_gradients(self, step: int) -> None:
        """Freeze the prototypes for the first steps (DINO: the first epoch) by dropping their grads."""
        if step < self.freeze_last_layer_steps:
            for param in self.last_layer_parameters():
                param.grad = None

    def on_after_step(self, step: int) -> None:
        self.teacher_encoder.update(self.encoder, step)
        self.teacher_head.update(self.head, step)
