"""SMIT (Jiang et al. 2022): self-distilled masked image transformer, the 10k-CT recipe.

Two ``crop_size`` crops from one region of ``round(crop_size * 128 / 96)`` voxels (128 for 96);
each crop masked with 16^3-voxel blocks at ratio 0.7 for the student, unmasked for the EMA
teacher. Three terms:

* global-token self-distillation ACROSS views: the student's (masked) view 1 against the teacher's
  view 2 and vice versa, on the mean-pooled bottleneck through a global DINO head;
* masked-patch-token self-distillation WITHIN a view: the student's masked bottleneck tokens
  against the teacher's tokens at the same positions, through a patch DINO head (weighted by the
  masked fraction of each token's input, as in :mod:`medssl.methods.ibot`);
* L1 reconstruction of the masked voxels from the student's bottleneck with SimMIM's light
  decoder (1x1x1 conv + pixel shuffle, :class:`~medssl.methods.simmim.PixelShuffleDecoder`).

Loss = 0.1 * patch + 0.1 * global + 1.0 * L1. Heads are MLP in -> 2048 -> 2048 -> 256 -> 8192; the
teacher temperature warms up 0.04 -> 0.07 and the EMA momentum goes 0.996 -> 1 by *global* step
(the released code indexes it by the step within an epoch; medssl does not).
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from medssl.data.multicrop import region_crops
from medssl.data.views import block_mask, upsample_mask
from medssl.methods.base import (
    EMATeacher,
    SSLMethod,
    embedding_std,
    linear_warmup_then_constant,
    register,
    schedule_at,
)
from medssl.methods.dino import Centering, DistillationParams, default_steps, view_major
from medssl.methods.ibot import bottleneck_tokens, token_mask_weight
from medssl.methods.losses import (
    dino_cross_entropy,
    masked_l1,
    masked_patch_ce,
    softmax_entropy,
    teacher_probs,
)
from medssl.methods.simmim import PixelShuffleDecoder
from medssl.models.encoder import SwinEncoder
from medssl.models.heads import DINOHead


def smit_region_size(crop_size: int, factor: float = 128 / 96) -> int:
    """``crop_size * factor`` rounded to a multiple of 16, never below the crop (96 -> 128)."""
    return max(int(round(crop_size * factor / 16)) * 16, crop_size)


class SMITParams(DistillationParams):
    region_factor: float = Field(128 / 96, ge=1.0, description="region side / crop side")
    mask_ratio: float = Field(0.7, ge=0.0, le=1.0)
    mask_block: int = Field(16, ge=2, description="side of a masked cube, in voxels")
    blur_prob: float = Field(0.0, ge=0.0, le=1.0)
    patch_weight: float = Field(0.1, ge=0.0)
    global_weight: float = Field(0.1, ge=0.0)
    reconstruction_weight: float = Field(1.0, ge=0.0)


@register
class SMIT(SSLMethod):
    name = "smit"
    family = "mim"
    description = "SMIT: masked-voxel L1 reconstruction plus global and masked-patch self-distillation."
    Params = SMITParams
    params: SMITParams

    def __init__(self, encoder: SwinEncoder, params: SMITParams, crop_size: int, total_steps: int) -> None:
        super().__init__(encoder, params, crop_size, total_steps)
        self.patch = encoder.config.patch_size
        dim = encoder.out_channels
        self.global_head = self._make_head(dim)
        self.patch_head = self._make_head(dim)
        self.decoder = PixelShuffleDecoder(dim, encoder.config.in_channels, self.patch * 2**4)
        self.teacher_encoder = EMATeacher(encoder, params.teacher_momentum, total_steps)
        self.teacher_global_head = EMATeacher(self.global_head, params.teacher_momentum, total_steps)
        self.teacher_patch_head = EMATeacher(self.patch_head, params.teacher_momentum, total_steps)
        self.global_centering = Centering(params.out_dim, params.centre_momentum)
        self.patch_centering = Centering(params.out_dim, params.centre_momentum)
        warmup = default_steps(params.teacher_temp_warmup_steps, self.total_steps, 0.3)
        self.teacher_temp_schedule = linear_warmup_then_constant(
            params.teacher_temp_start, params.teacher_temp, warmup, self.total_steps
        )
        self.freeze_last_layer_steps = default_steps(params.freeze_last_layer_steps, self.total_steps, 0.01)

    def _make_head(self, in_dim: int) -> DINOHead:
        p = self.params
        return DINOHead(in_dim, p.out_dim, p.hidden_dim, p.bottleneck_dim, p.head_layers, p.norm_last_layer)

    # data side -----------------------------------------------------------------------------
    def region_size(self, crop_size: int) -> int:
        return smit_region_size(crop_size, self.params.region_factor)

    def make_views(self, region: Tensor, rng: np.random.Generator) -> dict[str, Tensor]:
        p = self.params
        crops = region_crops(region, self.crop_size, 2, rng, blur_prob=p.blur_prob,
                             intensity_prob=p.intensity_prob)
        grid = tuple(s // self.patch for s in crops.shape[2:])
        block = max(p.mask_block // self.patch, 1)
        masks = torch.stack([block_mask(grid, block, p.mask_ratio, rng) for _ in range(2)])
        return {"crops": crops, "masks": masks}

    # model side ----------------------------------------------------------------------------
    def teacher_temperature(self, step: int) -> float:
        return schedule_at(self.teacher_temp_schedule, step)

    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        p = self.params
        crops = view_major(batch["crops"])  # (2B, C, S, S, S): view 1 then view 2
        masks = view_major(batch["masks"])

        bottleneck = self.encoder(crops, mask=masks)[-1]
        s_tokens, s_pooled = bottleneck_tokens(bottleneck)
        s_global = self.global_head(s_pooled)
        s_patch = self.patch_head(s_tokens)
        reconstruction = self.decoder(bottleneck)
        l1 = masked_l1(reconstruction, crops, upsample_mask(masks, self.patch))

        with torch.no_grad():
            t_tokens, t_pooled = bottleneck_tokens(self.teacher_encoder(crops)[-1])
            t_global = self.teacher_global_head(t_pooled)
            t_patch = self.teacher_patch_head(t_tokens)
        temp = self.teacher_temperature(step)
        global_targets = teacher_probs(t_global, self.global_centering.centre, temp)
        patch_targets = teacher_probs(t_patch, self.patch_centering.centre, temp)

        # Two views: the pairs of different views are exactly (student 1, teacher 2), (student 2, teacher 1).
        global_ce = dino_cross_entropy(list(s_global.chunk(2)), list(global_targets.chunk(2)), p.student_temp)
        patch_ce = masked_patch_ce(s_patch, patch_targets, token_mask_weight(masks), p.student_temp)
        loss = p.patch_weight * patch_ce + p.global_weight * global_ce + p.reconstruction_weight * l1
        self.global_centering.update(t_global)
        self.patch_centering.update(t_patch)
        return {
            "loss": loss,
            "patch_ce": patch_ce.detach(),
            "global_ce": global_ce.detach(),
            "reconstruction_l1": l1.detach(),
            "embedding_std": embedding_std(s_pooled),
            "teacher_entropy": softmax_entropy(global_targets),
            "teacher_patch_entropy": softmax_entropy(patch_targets),
            "teacher_temp": loss.new_tensor(temp).detach(),
            "mask_fraction": masks.float().mean(),
        }

    def last_layer_parameters(self) -> list[nn.Parameter]:
        return self.global_head.last_layer_parameters() + self.patch_head.last_layer_parameters()

    def cancel_gradients(self, step: int) -> None:
        """Freeze both heads' prototypes for the first steps (as DINO)."""
        if step < self.freeze_last_layer_steps:
            for param in self.last_layer_parameters():
                param.grad = None

    def on_after_step(self, step: int) -> None:
        self.teacher_encoder.update(self.encoder, step)
        self.teacher_global_head.update(self.global_head, step)
        self.teacher_patch_head.update(self.patch_head, step)
