"""DINO (Caron et al. 2021) in 3D: self-distillation with no labels, multi-crop, EMA teacher.

Reference: facebookresearch/dino ``main_dino.py`` (``DataAugmentationDINO``, ``DINOLoss``,
``train_one_epoch``) and ``utils.py`` (``clip_gradients``, ``cancel_gradients_last_layer``,
``cosine_scheduler``). Two global crops (0.4-1.0 of the region's volume, resized to ``crop_size``)
and ``n_local_crops`` local crops (0.05-0.4, resized to ``local_size``); the student (encoder + DINO
head on the mean-pooled bottleneck) sees every crop, the EMA teacher (built without stochastic
depth) the global crops only. Loss: cross-entropy between the centred, sharpened teacher
distribution and the student's over every pair of different views (``DINOLoss.forward``). The
teacher temperature warms up linearly from 0.04 to 0.07 over ``teacher_temp_warmup_epochs`` (30 of
``published_epochs`` 300: the README's ViT-S/16 300-epoch command, ``--teacher_temp 0.07
--warmup_teacher_temp_epochs 30 --epochs 300``), i.e. over the first 10 % of the run
(``epoch_knobs: published_fraction``), the EMA momentum follows a cosine from 0.996 to 1 by *global*
step, the prototypes are frozen during the first epoch, and each parameter's gradient norm is clipped
on its own (``utils.clip_gradients``, threshold ``schedule.grad_clip``, 3.0 in the recipe). The
exported encoder is the teacher, as DINO's evaluations load it (``eval_linear.py`` and ``eval_knn.py``:
``--checkpoint_key`` default ``teacher``). Heads,
schedules, centring, freezing and clipping are :mod:`medssl.methods.distillation`.

3D departures (config fields): grey-level jitter (``intensity_prob``) for colour jitter, 3D blur
probabilities per global crop (``global_blur_prob``, DINO's 1.0 / 0.1 asymmetry); no solarisation.
Other departures (config fields): K = ``out_dim`` 8192 prototypes (``main_dino.py --out_dim`` default
65536; 8192 is iBOT's Swin recipe, ``--out_dim 8192``, kept for both for a head of the same size);
``norm_last_layer: true`` (the ``main_dino.py`` default; the 300-epoch README command passes false).
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor

from medssl.config import CropSize
from medssl.data.multicrop import local_crop_size, multicrop_views
from medssl.methods.base import register
from medssl.methods.distillation import DistillationHead, DistillationMethod, DistillationParams, view_major
from medssl.models.encoder import global_pool


class DINOParams(DistillationParams):
    published_epochs: float = Field(300, gt=0, description="the README's 300-epoch run (warm-up 30 epochs)")
    n_local_crops: int = Field(8, ge=0)
    local_size: CropSize | None = Field(None, description="None: crop_size // 2 rounded down to a multiple of 32")
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    global_blur_prob: tuple[float, float] = (1.0, 0.1)
    local_blur_prob: float = Field(0.5, ge=0.0, le=1.0)
    intensity_prob: float = Field(0.8, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _check(self) -> DINOParams:
        for name in ("global_crop_scale", "local_crop_scale"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"{name} must satisfy 0 < low <= high <= 1")
        return self


@register
class DINO(DistillationMethod):
    name = "dino"
    family = "self_distillation"
    description = "DINO: multi-crop self-distillation to an EMA teacher with centring and sharpening."
    Params = DINOParams
    params: DINOParams
    export_network = "teacher"

    def set_up(self) -> None:
        super().set_up()
        self.local_size = self.params.local_size or local_crop_size(self.crop_size)

    def build_heads(self) -> None:
        self.head = DistillationHead(self.encoder.out_channels, self.params)

    # data side -----------------------------------------------------------------------------
    def make_views(self, region: Tensor, rng: np.random.Generator) -> dict[str, Tensor]:
        p = self.params
        return multicrop_views(
            region,
            rng,
            crop_size=self.crop_size,
            n_local=p.n_local_crops,
            local_size=self.local_size,
            global_scale=p.global_crop_scale,
            local_scale=p.local_crop_scale,
            global_blur_prob=p.global_blur_prob,
            local_blur_prob=p.local_blur_prob,
            intensity_prob=p.intensity_prob,
        )

    # model side ----------------------------------------------------------------------------
    def student_local_logits(self, batch: dict[str, Tensor]) -> list[Tensor]:
        """Global logits of the (never masked) local crops, one tensor per local view."""
        if "local_crops" not in batch or batch["local_crops"].shape[1] == 0:
            return []
        locals_ = batch["local_crops"]
        pooled = global_pool(self.encoder(view_major(locals_))[-1])
        return list(self.head.global_logits(pooled).chunk(locals_.shape[1]))

    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        globals_ = view_major(batch["global_crops"])
        n_global = batch["global_crops"].shape[1]
        student_pooled = global_pool(self.encoder(globals_)[-1])
        student_global = self.head.global_logits(student_pooled)
        student = list(student_global.chunk(n_global)) + self.student_local_logits(batch)

        with torch.no_grad():
            teacher_logits = self.teacher_head.module.global_logits(global_pool(self.teacher_encoder(globals_)[-1]))
        term = self.global_term(student, teacher_logits, n_global, step)
        return self.distillation_outputs(
            term.ce, term, embedding=student_global, features=student_pooled, dino_ce=term.ce
        )
