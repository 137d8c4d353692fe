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
(``cancel_gradients_last_layer(epoch, model_S, 1)``); all of ``published_epochs`` 500 (``max_epochs =
500``), so by default 6 %, 6 + 6 % and 0.2 % of the run (``epoch_knobs``, :mod:`medssl.methods.distillation`).

Teacher, as released (``main``: ``model_T = Trans.Trans_SMIT_pre_train_Teacher_No_Share(config)`` is
built on its own, so it starts from its own random initialisation, and is never put in eval mode, so its
stochastic depth (``models/configs_Trans.py`` ``get_3DTransSmall_config_Unetr``: ``drop_path_rate = 0.3``)
is active in every forward pass): ``teacher_init: independent`` and ``teacher_stochastic_depth: true``
(the teacher's drop path is the run's ``encoder.drop_path_rate``). ``teacher_init: student`` and
``teacher_stochastic_depth: false`` give DINO's teacher instead (a copy of the student, eval mode, no drop
path).

Departures: the EMA momentum 0.996 -> 1 follows the *global* step (the released loop indexes
``momentum_schedule[steps_in_epoch]``); the centres are all-reduced across processes (the release
comments the ``all_reduce`` out, single-GPU); weight decay applies to weights only
(``training_module.param_groups``), where the release's ``torch.optim.AdamW(model_S.parameters(), lr=lr)``
decays every parameter (norms and biases included) by AdamW's default 0.01; stochastic depth is the run's
shared ``encoder.drop_path_rate`` (``configs/paper.yaml``: 0.1 for every method), not the release's 0.3.

Small crops (``distill_stage``, ``decoder_stage``, a declared small-scale departure). At 32^3 the
distilled output 3 has 2^3 tokens and the bottleneck the decoder reads has one, so the reconstruction
rebuilds the crop from one vector. ``distill_stage: 2`` (4^3 tokens of 8 voxels at 32^3; the masks then
cover whole tokens of that output, 8-voxel cubes) and ``decoder_stage: 3`` (2^3 tokens) or ``2`` move both
to earlier encoder outputs; the stages after the deeper of the two are frozen at their initialisation
(they receive no gradient). The run records both and their tokens per crop (``pretext`` in its results).
The exported encoder is the student (``model_S.transformer``).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from medssl.data.multicrop import region_crops
from medssl.data.views import upsample_mask
from medssl.methods.base import EMATeacher, freeze_stages_after, register, token_count
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
from medssl.methods.losses import masked_l1
from medssl.models.encoder import SwinEncoder, global_pool
from medssl.models.heads import PixelShuffleDecoder

DISTILLED = 3  # encoder output index of SMIT's x_feature: stage 3 after its patch merging
BOTTLENECK = 4


def smit_region_size(crop_size: int, factor: float = 128 / 96) -> int:
    """``crop_size * factor`` rounded to a multiple of 16, never below the crop (96 -> 128)."""
    return max(int(round(crop_size * factor / 16)) * 16, crop_size)


class SMITParams(DistillationParams, PatchDistillationParams):
    published_epochs: float = Field(500, gt=0, description="train_self_supervised.py max_epochs = 500")
    teacher_init: Literal["independent", "student"] = Field(
        "independent", description="independent: the teacher's own random initialisation (released); student: a copy"
    )
    teacher_stochastic_depth: bool = Field(
        True, description="the teacher keeps its drop path and trains in training mode (released); false: DINO's"
    )
    distill_stage: int = Field(
        DISTILLED, ge=1, le=BOTTLENECK, description="encoder output whose tokens are distilled (3: x_feature, released)"
    )
    decoder_stage: int = Field(
        BOTTLENECK, ge=1, le=BOTTLENECK, description="encoder output the L1 decoder reads (4: the bottleneck, released)"
    )
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

    def knob_steps(self, total_steps: int, steps_per_epoch: int | None = None) -> dict[str, int]:
        return {
            **super().knob_steps(total_steps, steps_per_epoch),
            "patch_temp_hold": self.epochs_to_steps(self.patch_temp_hold_epochs, total_steps, steps_per_epoch),
        }


@register
class SMIT(DistillationMethod):
    name = "smit"
    family = "mim"
    description = "SMIT: masked-voxel L1 reconstruction plus global and masked-patch self-distillation."
    Params = SMITParams
    params: SMITParams
    masks_student: ClassVar[bool] = True

    def set_up(self) -> None:
        super().set_up()
        self.init_patch_distillation(self.params.out_dim, self.params.patch_temp_hold_epochs)

    def build_heads(self) -> None:
        encoder, p = self.encoder, self.params
        self.head = self._distillation_head()
        self.decoder = PixelShuffleDecoder(
            encoder.stage_channels[p.decoder_stage], encoder.config.in_channels, encoder.stage_stride(p.decoder_stage)
        )
        freeze_stages_after(encoder, max(p.distill_stage, p.decoder_stage))

    def _distillation_head(self) -> DistillationHead:
        return DistillationHead(
            self.encoder.stage_channels[self.params.distill_stage],
            self.params,
            patch="shared" if self.params.shared_head else "separate",
            token_norm=True,
        )

    def make_teacher(self, online: nn.Module) -> EMATeacher:
        """SMIT's released teacher (module docstring): its own random initialisation (a network built anew)
        and its stochastic depth kept, unless ``teacher_init: student`` / ``teacher_stochastic_depth: false``."""
        p = self.params
        if p.teacher_init == "independent":
            online = SwinEncoder(self.encoder.config) if online is self.encoder else self._distillation_head()
        return EMATeacher(online, stochastic_depth=p.teacher_stochastic_depth)

    def pretext(self) -> dict[str, Any]:
        p = self.params
        return {
            "distill_stage": p.distill_stage,
            "distill_tokens": token_count(self.encoder, self.crop_size, p.distill_stage),
            "reconstruct_stage": p.decoder_stage,
            "reconstruct_tokens": token_count(self.encoder, self.crop_size, p.decoder_stage),
            "mask_unit_voxels": self.encoder.stage_stride(p.distill_stage),
            "trained_stages": max(p.distill_stage, p.decoder_stage),
        }

    # data side -----------------------------------------------------------------------------
    def region_size(self, crop_size: int) -> int:
        return smit_region_size(crop_size, self.params.region_factor)

    def make_views(self, region: Tensor, rng: np.random.Generator) -> dict[str, Tensor]:
        p = self.params
        crops = region_crops(
            region, self.crop_size, 2, rng, blur_prob=p.blur_prob, intensity_prob=p.intensity_prob, flip=p.flip
        )
        spatial = tuple(crops.shape[2:])
        grid = self.encoder.stage_grid(spatial, p.distill_stage)
        factor = self.encoder.stage_stride(p.distill_stage) // self.encoder.stage_stride(0)
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
        s_global, s_patch = self.head(feature_tokens(outs[p.distill_stage]))
        reconstruction = self.decoder(outs[p.decoder_stage])
        l1 = masked_l1(reconstruction, crops, upsample_mask(masks, self.encoder.stage_stride(0)))
        with torch.no_grad():
            t_feature = self.teacher_encoder(crops, normalize=False)[p.distill_stage]
            t_global, t_patch = self.teacher_head(feature_tokens(t_feature))

        # Two views: the pairs of different views are exactly (student 1, teacher 2), (student 2, teacher 1).
        term = self.global_term(list(s_global.chunk(2)), t_global, 2, step)
        patch_ce = self.patch_term(s_patch, t_patch, token_masks, step)
        loss = p.patch_weight * patch_ce + p.global_weight * term.ce + p.reconstruction_weight * l1
        return self.distillation_outputs(
            loss,
            term,
            embedding=s_global,
            features=global_pool(outs[max(p.distill_stage, p.decoder_stage)]),
            token_masks=token_masks,
            patch_ce=patch_ce,
            global_ce=term.ce,
            reconstruction_l1=l1,
        )
