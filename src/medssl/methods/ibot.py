"""iBOT (Zhou et al. 2022) in 3D: DINO plus masked-patch self-distillation (an online tokenizer).

Reference: bytedance/ibot ``main_ibot.py`` (``iBOTLoss``, ``train_ibot``), ``loader.py``
(``ImageFolderMask``) and ``models/head.py`` (``iBOTHead``), with the Swin recipe of its README
(``--norm_last_layer false --shared_head true --local_crops_number 10 --global_crops_scale 0.25 1
--local_crops_scale 0.05 0.25 --pred_ratio 0 0.3 --pred_ratio_var 0 0.2 --pred_start_epoch 50``).

Views as DINO (global crops 0.25-1.0, ten local crops 0.05-0.25). Each student global crop is
masked; the teacher sees it unmasked; local crops are never masked. Two terms, 1:1:

* global: DINO's cross-entropy between the teacher's and the student's mean-pooled bottleneck
  tokens over pairs of different views;
* patch: at every masked bottleneck token of a global crop, cross-entropy between the teacher's
  (unmasked) token and the student's (masked) token, with a separate patch centre and a patch
  teacher temperature held at its start value until masking starts, then warmed up
  (``iBOTLoss.teacher_temp2_schedule``).

Masks in whole distilled tokens: for Swin, iBOT masks in units of the final token
(``pred_size = patch_size * 8`` in ``main_ibot.py``, the 32x stride of 2D Swin). The 3D Swin's
bottleneck token is ``encoder.stage_stride(4)`` voxels (32 at patch 2), so the mask is drawn on
the distilled token grid and upsampled to the patch grid: each distilled token is fully masked or fully
visible. Per crop the ratio is one of ``pred_ratio`` (each ``+- pred_ratio_var``) picked
uniformly (``ImageFolderMask.get_pred_ratio``): with ``(0, 0.3)`` about half the global crops are
unmasked. ``pred_shape``: ``block`` (BEiT-style blocks, ``ImageFolderMask.__getitem__``, here in
3D) or ``rand``. Before ``pred_start_epoch`` nothing is masked (``get_pred_ratio`` returns 0); 50 of
``published_epochs`` 300 (the README's Swin-T command, ``--pred_start_epoch 50 --epochs 300``), so
masking starts after the first 1/6 of the run (``epoch_knobs: published_fraction``).

Heads (``iBOTHead``): ``shared_head: true`` scores patch tokens with the whole global head (last
layer included); ``false`` shares the MLP and adds a second last layer (``last_layer2``).
``shared_head_teacher`` does the same for the teacher (released default true: the teacher scores
patches with its global prototypes whatever the student does). K' = K when either is shared.
The exported encoder is the teacher (``evaluation/eval_cls.py``: ``--checkpoint_key`` default ``teacher``).

Crops under 64^3 (``patch_stage``, a declared small-scale departure). A 32^3 crop has one bottleneck
token: no token can be masked while another stays visible, and the patch term would compare a crop with
itself. ``patch_stage: auto`` (the default) distils the patch tokens of the bottleneck when a crop has at
least 8 of them (crops >= 64^3: the release) and otherwise of the deepest encoder output that has 8 (output
3, 2^3 tokens of 16 voxels, at 32^3), masking in whole tokens of that output; an integer picks the output.
Tokens of an earlier output have fewer channels than the global token, so they go through a separate patch
head (SMIT's ``_No_Share`` layout, K' = ``patch_out_dim``, scored by the teacher's own patch head:
``shared_head`` and ``shared_head_teacher`` do not apply); the global term stays on the bottleneck, so every
stage is trained. The run records the stage and its tokens per crop (``pretext`` in its results).

3D departures (config fields): as DINO (grey-level jitter, blur per crop); the 3D block shape.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor

from medssl.methods.base import register, token_count
from medssl.methods.dino import DINO, DINOParams
from medssl.methods.distillation import (
    DistillationHead,
    PatchDistillationParams,
    PatchLayout,
    feature_tokens,
    random_token_mask,
    token_mask_to_patches,
    view_major,
)
from medssl.models.encoder import global_pool

BOTTLENECK = 4  # encoder output index of the bottleneck (after the fourth patch merging)
MIN_PATCH_TOKENS = 8
"""``patch_stage: auto`` distils the deepest encoder output with at least this many tokens per crop."""


def block_token_mask(
    grid: tuple[int, int, int], ratio: float, rng: np.random.Generator, aspect: tuple[float, float] = (0.3, 1 / 0.3)
) -> Tensor:
    """BEiT/iBOT block masking (``ImageFolderMask.__getitem__``, ``pred_shape='block'``) in 3D.

    Boxes of random volume (at least ``(min(grid) // 3)^3`` tokens) and log-uniform aspect ratios
    are added until ``ratio`` of the tokens are masked; a box must be smaller than the grid along
    every axis and must add tokens without exceeding the target; ten failed attempts end it.
    """
    mask = np.zeros(grid, dtype=bool)
    target = ratio * mask.size
    low = (min(grid) // 3) ** 3
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    while mask.sum() < target:
        budget = target - mask.sum()
        added = 0
        for _ in range(10):
            volume = rng.uniform(low, budget) if budget > low else budget
            a, b = math.exp(rng.uniform(*log_aspect)), math.exp(rng.uniform(*log_aspect))
            side = volume ** (1 / 3)
            sides = [int(round(side * f)) for f in (a ** (1 / 3), b ** (1 / 3), (a * b) ** (-1 / 3))]
            if all(0 < s < g for s, g in zip(sides, grid, strict=True)):
                start = [int(rng.integers(0, g - s + 1)) for s, g in zip(sides, grid, strict=True)]
                box = tuple(slice(o, o + s) for o, s in zip(start, sides, strict=True))
                new = int(np.prod(sides)) - int(mask[box].sum())
                if 0 < new <= budget:
                    mask[box] = True
                    added = new
            if added:
                break
        if not added:
            break
    return torch.from_numpy(mask)


class IBOTParams(DINOParams, PatchDistillationParams):
    published_epochs: float = Field(300, gt=0, description="the README's Swin-T run (--epochs 300)")
    n_local_crops: int = Field(10, ge=0)
    global_crop_scale: tuple[float, float] = (0.25, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.25)
    norm_last_layer: bool = Field(False, description="freeze the prototypes' gain (iBOT's Swin recipe: false)")
    pred_ratio: tuple[float, ...] = Field((0.0, 0.3), min_length=1, description="masking ratios, one picked per crop")
    pred_ratio_var: tuple[float, ...] = Field((0.0, 0.2), min_length=1, description="+- range of each ratio")
    pred_shape: Literal["block", "rand"] = "block"
    pred_start_epoch: float = Field(50, ge=0, description="epochs before masking starts (Swin recipe: 50 of 300)")
    patch_stage: Literal["auto", 1, 2, 3, 4] = Field(
        "auto",
        description="encoder output whose tokens the patch term distils and the masks cover; auto: the "
        "bottleneck (4, released) when a crop has >= 8 of its tokens, else the deepest output that has",
    )
    shared_head: bool = Field(True, description="patch tokens through the whole global head")
    shared_head_teacher: bool = Field(True, description="the teacher's patch tokens through its global prototypes")
    patch_out_dim: int = Field(8192, ge=2, description="K' of last_layer2 (when neither head is shared)")
    global_weight: float = Field(1.0, ge=0.0, description="lambda1")
    patch_weight: float = Field(1.0, ge=0.0, description="lambda2")

    def knob_steps(self, total_steps: int, steps_per_epoch: int | None = None) -> dict[str, int]:
        return {
            **super().knob_steps(total_steps, steps_per_epoch),
            "pred_start": self.epochs_to_steps(self.pred_start_epoch, total_steps, steps_per_epoch),
        }

    @model_validator(mode="after")
    def _check_ratio(self) -> IBOTParams:
        if len(self.pred_ratio_var) not in (1, len(self.pred_ratio)):
            raise ValueError("pred_ratio_var needs one entry or one per pred_ratio entry")
        variances = self.pred_ratio_var * len(self.pred_ratio) if len(self.pred_ratio_var) == 1 else self.pred_ratio_var
        for mean, var in zip(self.pred_ratio, variances, strict=True):
            if not 0.0 <= mean - var <= mean + var <= 1.0:
                raise ValueError("each pred_ratio +- pred_ratio_var must lie in [0, 1]")
        return self


@register
class IBOT(DINO):
    name = "ibot"
    family = "self_distillation"
    masks_student: ClassVar[bool] = True  # the student's global crops (never its local crops)
    description = "iBOT: DINO plus masked-patch self-distillation of bottleneck tokens (online tokenizer)."
    Params = IBOTParams
    params: IBOTParams

    def set_up(self) -> None:
        super().set_up()
        self.init_patch_distillation(self.patch_dim(), self.params.pred_start_epoch)
        self.mask_start_step = self.epochs_to_steps(self.params.pred_start_epoch)

    def resolved_patch_stage(self) -> int:
        """The encoder output the patch term distils at this crop size (``patch_stage``)."""
        stage = self.params.patch_stage
        if stage != "auto":
            return int(stage)
        for candidate in range(BOTTLENECK, 0, -1):
            if token_count(self.encoder, self.crop_size, candidate) >= MIN_PATCH_TOKENS:
                return candidate
        return 1

    def patch_dim(self) -> int:
        """K' = K when either head is shared (``main_ibot.py``: ``same_dim``); ``patch_out_dim`` with the
        separate patch head of an earlier output."""
        p = self.params
        if self.patch_stage != BOTTLENECK:
            return p.patch_out_dim
        return p.out_dim if p.shared_head or p.shared_head_teacher else p.patch_out_dim

    def build_heads(self) -> None:
        self.patch_stage = self.resolved_patch_stage()
        if self.patch_stage == BOTTLENECK:
            layout: PatchLayout = "shared" if self.params.shared_head else "shared_mlp"
            self.head = DistillationHead(
                self.encoder.out_channels, self.params, patch=layout, patch_out_dim=self.patch_dim()
            )
        else:
            self.head = DistillationHead(
                self.encoder.out_channels,
                self.params,
                patch="separate",
                patch_out_dim=self.patch_dim(),
                patch_in_dim=self.encoder.stage_channels[self.patch_stage],
            )

    def pretext(self) -> dict[str, Any]:
        stage = self.patch_stage
        return {
            "distill_stage": stage,
            "distill_tokens": token_count(self.encoder, self.crop_size, stage),
            "mask_unit_voxels": self.encoder.stage_stride(stage),
            "mask_start_step": self.mask_start_step,
            "trained_stages": BOTTLENECK,
        }

    # data side -----------------------------------------------------------------------------
    def pred_ratio(self, rng: np.random.Generator) -> float:
        """``ImageFolderMask.get_pred_ratio``: one of the ratios, each drawn in ``mean +- var``."""
        p = self.params
        variances = p.pred_ratio_var * len(p.pred_ratio) if len(p.pred_ratio_var) == 1 else p.pred_ratio_var
        pick = int(rng.integers(len(p.pred_ratio)))
        mean, var = p.pred_ratio[pick], variances[pick]
        return float(rng.uniform(mean - var, mean + var)) if var > 0 else float(mean)

    def make_views(self, region: Tensor, rng: np.random.Generator) -> dict[str, Tensor]:
        views = super().make_views(region, rng)
        spatial = tuple(views["global_crops"].shape[2:])
        grid = self.encoder.stage_grid(spatial, self.patch_stage)
        patch_grid = self.encoder.stage_grid(spatial, 0)
        factor = self.encoder.stage_stride(self.patch_stage) // self.encoder.stage_stride(0)
        tokens = []
        for _ in range(views["global_crops"].shape[0]):
            ratio = self.pred_ratio(rng)
            if self.params.pred_shape == "block":
                tokens.append(block_token_mask(grid, ratio, rng))
            else:
                tokens.append(random_token_mask(grid, int(ratio * int(np.prod(grid))), rng))
        views["global_token_masks"] = torch.stack(tokens)
        views["global_masks"] = torch.stack([token_mask_to_patches(t, factor, patch_grid) for t in tokens])
        return views

    # model side ----------------------------------------------------------------------------
    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        p = self.params
        n_global = batch["global_crops"].shape[1]
        globals_ = view_major(batch["global_crops"])
        masks = view_major(batch["global_masks"])
        token_masks = view_major(batch["global_token_masks"]).flatten(1)
        if step < self.mask_start_step:  # masking starts at pred_start_epoch
            masks, token_masks = torch.zeros_like(masks), torch.zeros_like(token_masks)

        s_global, s_patch, s_pooled = self.logits(self.head, self.encoder(globals_, mask=masks))
        student = list(s_global.chunk(n_global)) + self.student_local_logits(batch)
        with torch.no_grad():
            t_outs = self.teacher_encoder(globals_)
            t_global, t_patch, _ = self.logits(self.teacher_head.module, t_outs, p.shared_head_teacher)

        term = self.global_term(student, t_global, n_global, step)
        # One call over all global crops = the mean of the per-crop terms (equal batch sizes).
        patch_ce = self.patch_term(s_patch, t_patch, token_masks, step)
        loss = p.global_weight * term.ce + p.patch_weight * patch_ce
        return self.distillation_outputs(
            loss,
            term,
            embedding=s_global,
            features=s_pooled,
            token_masks=token_masks,
            global_ce=term.ce,
            patch_ce=patch_ce,
        )

    def logits(
        self, head: DistillationHead, outs: list[Tensor], share_last_layer: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Global logits of the pooled bottleneck, patch logits of the distilled output's tokens, and the
        pooled bottleneck, from one encoder pass's outputs (student, or teacher with ``share_last_layer``)."""
        pooled = global_pool(outs[BOTTLENECK])
        if self.patch_stage == BOTTLENECK:
            global_logits, patch_logits = head(feature_tokens(outs[BOTTLENECK]), share_last_layer=share_last_layer)
            return global_logits, patch_logits, pooled
        return head.global_logits(pooled), head.patch_logits(feature_tokens(outs[self.patch_stage])), pooled
