"""iBOT (Zhou et al. 2022) in 3D: DINO plus masked-patch self-distillation (an online tokenizer).

Views as DINO; the student's global crops are masked (block masks on the patch-token grid, a ratio
drawn uniformly in 0.1-0.5 per crop), the teacher sees them unmasked. Two terms, 1:1:

* global: DINO's cross-entropy between the teacher's and the student's mean-pooled bottleneck
  tokens over pairs of different views;
* patch: at every masked bottleneck token of a global crop, cross-entropy between the teacher's
  (unmasked) token and the student's (masked) token, with a separate patch centre.

The Swin bottleneck is 16 patch tokens wide, so a bottleneck token is usually partly masked: it
counts with the masked fraction of its input patches as weight (0 = unmasked, ignored; 1 = fully
masked, iBOT's case). The patch head is the global head (``shared_head: true``, iBOT's default) or
a separate DINO head.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from medssl.data.views import block_mask
from medssl.methods.base import EMATeacher, embedding_std, register
from medssl.methods.dino import DINO, Centering, DINOParams, view_major
from medssl.methods.losses import (
    dino_cross_entropy,
    masked_patch_ce,
    softmax_entropy,
    teacher_probs,
)
from medssl.models.encoder import SwinEncoder

BOTTLENECK_STRIDE = 2**4  # patch tokens per bottleneck token along an axis (four 2x merges)


def bottleneck_tokens(feature: Tensor) -> tuple[Tensor, Tensor]:
    """(B, C, d, h, w) bottleneck map -> patch tokens (B, L, C) and their mean, the global token (B, C)."""
    tokens = feature.flatten(2).transpose(1, 2)
    return tokens, tokens.mean(dim=1)


def token_mask_weight(mask: Tensor, stride: int = BOTTLENECK_STRIDE) -> Tensor:
    """Patch-grid mask (B, D', H', W') -> masked fraction of each bottleneck token's input (B, L)."""
    pooled = nn.functional.avg_pool3d(mask.unsqueeze(1).float(), kernel_size=stride, stride=stride)
    return pooled.flatten(1)


class IBOTParams(DINOParams):
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    mask_block: int = Field(16, ge=2, description="side of a masked cube, in voxels")
    shared_head: bool = True
    patch_out_dim: int = Field(8192, ge=2, description="prototypes of a separate patch head")
    global_weight: float = Field(1.0, ge=0.0)
    patch_weight: float = Field(1.0, ge=0.0)
    patch_centre_momentum: float = Field(0.9, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _check_mask(self) -> IBOTParams:
        lo, hi = self.mask_ratio
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError("mask_ratio must satisfy 0 <= low <= high <= 1")
        return self


@register
class IBOT(DINO):
    name = "ibot"
    family = "self_distillation"
    description = "iBOT: DINO plus masked-patch self-distillation of bottleneck tokens (online tokenizer)."
    Params = IBOTParams
    params: IBOTParams

    def __init__(self, encoder: SwinEncoder, params: IBOTParams, crop_size: int, total_steps: int) -> None:
        super().__init__(encoder, params, crop_size, total_steps)
        encoder.mask_token.requires_grad_(True)  # iBOT masks, so the token learns
        self.patch_head = None if params.shared_head else self._make_head(encoder.out_channels, params.patch_out_dim)
        self.teacher_patch_head = (
            None if self.patch_head is None
            else EMATeacher(self.patch_head, params.teacher_momentum, total_steps)
        )
        patch_dim = params.out_dim if params.shared_head else params.patch_out_dim
        self.patch_centering = Centering(patch_dim, params.patch_centre_momentum)

    # data side -----------------------------------------------------------------------------
    def make_views(self, region: Tensor, rng: np.random.Generator) -> dict[str, Tensor]:
        views = super().make_views(region, rng)
        patch = self.encoder.config.patch_size
        block = max(self.params.mask_block // patch, 1)
        masks = []
        for crop in views["global_crops"]:
            grid = tuple(s // patch for s in crop.shape[1:])
            ratio = float(rng.uniform(*self.params.mask_ratio))
            masks.append(block_mask(grid, block, ratio, rng))
        views["global_masks"] = torch.stack(masks)
        return views

    # model side ----------------------------------------------------------------------------
    def _heads(self, tokens: Tensor, pooled: Tensor, teacher: bool) -> tuple[Tensor, Tensor]:
        """Global logits (N, K) and patch logits (N, L, K') of the student or the teacher."""
        head = self.teacher_head if teacher else self.head
        if self.patch_head is None:
            both = head(torch.cat([pooled.unsqueeze(1), tokens], dim=1))
            return both[:, 0], both[:, 1:]
        patch_head = self.teacher_patch_head if teacher else self.patch_head
        return head(pooled), patch_head(tokens)

    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        p = self.params
        n_global = batch["global_crops"].shape[1]
        globals_ = view_major(batch["global_crops"])
        masks = view_major(batch["global_masks"])

        s_tokens, s_pooled = bottleneck_tokens(self.encoder(globals_, mask=masks)[-1])
        s_global, s_patch = self._heads(s_tokens, s_pooled, teacher=False)
        student = list(s_global.chunk(n_global)) + self._student_local_logits(batch)

        with torch.no_grad():
            t_tokens, t_pooled = bottleneck_tokens(self.teacher_encoder(globals_)[-1])
            t_global, t_patch = self._heads(t_tokens, t_pooled, teacher=True)
        temp = self.teacher_temperature(step)
        global_targets = teacher_probs(t_global, self.centering.centre, temp)
        patch_targets = teacher_probs(t_patch, self.patch_centering.centre, temp)

        global_ce = dino_cross_entropy(student, list(global_targets.chunk(n_global)), p.student_temp)
        # One call over all global crops = the mean of the per-crop terms (equal batch sizes).
        patch_ce = masked_patch_ce(s_patch, patch_targets, token_mask_weight(masks), p.student_temp)
        loss = p.global_weight * global_ce + p.patch_weight * patch_ce
        self.centering.update(t_global)
        self.patch_centering.update(t_patch)
        return {
            "loss": loss,
            "global_ce": global_ce.detach(),
            "patch_ce": patch_ce.detach(),
            "embedding_std": embedding_std(s_pooled),
            "teacher_entropy": softmax_entropy(global_targets),
            "teacher_patch_entropy": softmax_entropy(patch_targets),
            "teacher_temp": loss.new_tensor(temp).detach(),
            "mask_fraction": masks.float().mean(),
        }

    def last_layer_parameters(self) -> list[nn.Parameter]:
        params = self.head.last_layer_parameters()
        if self.patch_head is not None:
            params += self.patch_head.last_layer_parameters()
        return params

    def on_after_step(self, step: int) -> None:
        super().on_after_step(step)
        if self.patch_head is not None:
            self.teacher_patch_head.update(self.patch_head, step)
