"""SMIT (Jiang et al. 2022): self-distilled masked image transformer, the 10k-CT recipe.

Reference: The-Veeraraghavan-Lab/SMIT ``train_self_supervised.py`` (``MIMTransform``,
``MaskGenerator``, ``Cls_Patch_Loss``, ``main``) and ``models/Trans.py``
(``SwinTransformer_Unetr_Mask_In_Seperate.forward``, ``Trans_SMIT_pre_train_Student_No_Share``).

Views: two ``crop_size`` crops at random positions of one region of
``round(crop_size * 128 / 96)`` voxels (``RandSpatialCropSamplesd`` 128^3 then 96^3 x 2), crops
only: no flips, no intensity jitter, no blur (``flip``, ``intensity_prob``, ``blur_prob``, off by
default). The student sees each crop masked, the EMA teacher (no stochastic depth) unmasked.

Distilled tokens (``x_feature``): the output of the third stage after its patch merging
(encoder output 3, ``encoder.stage_grid(crop, 3)`` = 6^3 tokens of 8f channels at 96^3), through a
LayerNorm (eps 1e-6); the global token is their mean (``avgpool``). Heads 8f -> 2048 -> 2048 ->
256 -> K, separate for the global and the patch tokens (``_No_Share``, the ``--ibot_head_share 0``
default; ``shared_head: true`` is ``Trans_SMIT_pre_train_Student``).

Masks (``MaskGenerator(input_size=96, mask_patch_size=16, model_patch_size=2, mask_ratio=0.7)``):
``ceil(0.7 * n)`` of the distilled tokens, drawn uniformly, each token one 16^3-voxel block
(``encoder.stage_stride(3)``), upsampled to the patch grid, so every distilled token is either
fully masked or fully visible.

Loss = 0.1 * patch + 0.1 * global + 1.0 * L1 (``--patch_w``, ``--cls_w``, ``--rec_w``):

* global-token self-distillation across views (student view 1 vs teacher view 2 and back);
* masked-patch self-distillation within a view, at the masked tokens;
* L1 of the masked voxels, reconstructed from the (un-normalised) bottleneck by a 1x1x1 conv and a
  pixel shuffle (``decoder1`` + ``rearrange``).

Schedules: global teacher temperature 0.04 -> 0.07 over 30 epochs; the patch temperature held at
0.04 for ``patch_temp_hold_epochs`` (30: ``mim_start_epoch=pred_start_epoch``) and then warmed over
30 epochs (``Cls_Patch_Loss.teacher_temp2_schedule``); prototypes frozen during the first epoch
(``cancel_gradients_last_layer(epoch, model_S, 1)``); epochs converted as
:mod:`medssl.methods.distillation` describes. Departures: the EMA momentum 0.996 -> 1 follows the
*global* step (the released loop indexes ``momentum_schedule[steps_in_epoch]``); the centres are
all-reduced across processes (the release comments the ``all_reduce`` out, single-GPU).
The exported encoder is the student (``model_S.transformer``).
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from medssl.data.multicrop import region_crops
from medssl.data.views import upsample_mask
from medssl.methods.base import register
from medssl.methods.distillation import (
    DistillationHead,
    DistillationMethod,
    DistillationParams,
    PatchDistillationParams,
    feature_tokens,
    random_token_mask,
    token_mask_to_patches,
    view_major,
)
from medssl.methods.health import health_metrics
from medssl.methods.losses import dino_cross_entropy, masked_l1
from medssl.models.encoder import SwinEncoder, global_pool
from medssl.models.heads import PixelShuffleDecoder

DISTILLED = 3  # encoder output index of SMIT's x_feature: stage 3 after its patch merging
BOTTLENECK = 4


def smit_region_size(crop_size: int, factor: float = 128 / 96) -> int:
    """``crop_size * factor`` rounded to a multiple of 16, never below the crop (96 -> 128)."""
    return max(int(round(crop_size * factor / 16)) * 16, crop_size)


class SMITParams(DistillationParams, PatchDistillationParams):
    region_factor: float = Field(128 / 96, ge=1.0, description="region side / crop side")
    mask_ratio: float = Field(0.7, ge=0.0, le=1.0, description="masked share of the distilled tokens (ceil)")
    shared_head: bool = Field(False, description="one head for global and patch tokens (--ibot_head_share)")
    patch_temp_hold_epochs: float = Field(30, ge=0, description="epochs the patch tau_t is held before warm-up")
    flip: bool = Field(False, description="random flips of each crop (not in SMIT)")
    intensity_prob: float = Field(0.0, ge=0.0, le=1.0, description="intensity scale/shift (not in SMIT)")
    blur_prob: float = Field(0.0, ge=0.0, le=1.0, description="Gaussian blur (not in SMIT)")
    patch_weight: float = Field(0.1, ge=0.0)
    global_weight: float = Field(0.1, ge=0.0)
    reconstruction_weight: float = Field(1.0, ge=0.0)


@register
class SMIT(DistillationMethod):
    name = "smit"
    family = "mim"
    description = "SMIT: masked-voxel L1 reconstruction plus global and masked-patch self-distillation."
    Params = SMITParams
    params: SMITParams
    masks_student: ClassVar[bool] = True

    def __init__(self, encoder: SwinEncoder, params: SMITParams, crop_size: int, total_steps: int) -> None:
        super().__init__(encoder, params, crop_size, total_steps)
        self.decoder = PixelShuffleDecoder(
            encoder.out_channels, encoder.config.in_channels, encoder.stage_stride(BOTTLENECK)
        )
        self.init_patch_distillation(params.out_dim, params.patch_temp_hold_epochs)

    def make_head(self) -> DistillationHead:
        return DistillationHead(
            self.encoder.stage_channels[DISTILLED],
            self.params,
            patch="shared" if self.params.shared_head else "separate",
            token_norm=True,
        )

    # data side -----------------------------------------------------------------------------
    def region_size(self, crop_size: int) -> int:
        return smit_region_size(crop_size, self.params.region_factor)

    def make_views(self, region: Tensor, rng: np.random.Generator) -> dict[str, Tensor]:
        p = self.params
        crops = region_crops(
            region, self.crop_size, 2, rng, blur_prob=p.blur_prob, intensity_prob=p.intensity_prob, flip=p.flip
        )
        spatial = tuple(crops.shape[2:])
        grid = self.encoder.stage_grid(spatial, DISTILLED)
        factor = self.encoder.stage_stride(DISTILLED) // self.encoder.stage_stride(0)
        n_masked = math.ceil(p.mask_ratio * int(np.prod(grid)))
        tokens = [random_token_mask(grid, n_masked, rng) for _ in range(2)]
        patch_grid = self.encoder.stage_grid(spatial, 0)
        masks = [token_mask_to_patches(t, factor, patch_grid) for t in tokens]
        return {"crops": crops, "masks": torch.stack(masks), "token_masks": torch.stack(tokens)}

    # model side ----------------------------------------------------------------------------
    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        p = self.params
        crops = view_major(batch["crops"])  # (2B, C, S, S, S): view 1 then view 2
        masks = view_major(batch["masks"])
        token_masks = view_major(batch["token_masks"]).flatten(1)

        # Raw stage outputs, as SMIT's x_feature and x: the head's LayerNorm normalises the tokens.
        outs = self.encoder(crops, normalize=False, mask=masks)
        s_global, s_patch = self.head(feature_tokens(outs[DISTILLED]))
        reconstruction = self.decoder(outs[BOTTLENECK])
        l1 = masked_l1(reconstruction, crops, upsample_mask(masks, self.encoder.stage_stride(0)))
        with torch.no_grad():
            t_feature = self.teacher_encoder(crops, normalize=False)[DISTILLED]
            t_global, t_patch = self.teacher_head(feature_tokens(t_feature))

        temp = self.teacher_temperature(step)
        global_targets = self.centering.probs(t_global, temp)
        # Two views: the pairs of different views are exactly (student 1, teacher 2), (student 2, teacher 1).
        global_ce = dino_cross_entropy(list(s_global.chunk(2)), list(global_targets.chunk(2)), p.student_temp)
        self.centering.update(t_global)
        patch_ce = self.patch_term(s_patch, t_patch, token_masks, step)
        loss = p.patch_weight * patch_ce + p.global_weight * global_ce + p.reconstruction_weight * l1
        return {
            "loss": loss,
            "patch_ce": patch_ce.detach(),
            "global_ce": global_ce.detach(),
            "reconstruction_l1": l1.detach(),
            "teacher_temp": loss.new_tensor(temp).detach(),
            "mask_fraction": token_masks.float().mean(),
            **health_metrics(
                embedding=s_global,
                features=global_pool(outs[BOTTLENECK]),
                teacher_probs=global_targets,
                history=self.rank_history,
                distillation_ce=global_ce,
            ),
        }
