"""MoCo v3 (Chen, Xie & He 2021) in 3D.

Two augmented crops. Query branch: encoder -> projector (3 layers, 4096 hidden, 256 out, BatchNorm
on hidden layers and on the output) -> predictor (2 layers, 4096 -> 256). Key branch: an EMA copy of
encoder + projector, momentum 0.99 -> 1 on a cosine over the global steps. Symmetric InfoNCE
``ctr(q1, k2) + ctr(q2, k1)`` at tau 0.2, each term scaled by ``2 tau``; keys come from every process.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field
from torch import Tensor

from medssl.data.views import enlarged_region_side
from medssl.methods.base import EMATeacher, SSLMethod, embedding_std, register
from medssl.methods.losses import moco_v3_infonce
from medssl.methods.simclr import (
    ProjectedEncoder,
    TwoCropParams,
    augmented_pair,
    freeze_mask_token,
    gather_no_grad,
    rank_and_world,
)
from medssl.models.encoder import SwinEncoder
from medssl.models.heads import MLPHead


class MoCoV3Params(TwoCropParams):
    temperature: float = Field(0.2, gt=0.0, description="InfoNCE temperature")
    proj_hidden_dim: int = Field(4096, ge=1, description="projector hidden width")
    proj_dim: int = Field(256, ge=1, description="projector / predictor output width")
    proj_layers: int = Field(3, ge=1, description="linear layers in the projector")
    pred_hidden_dim: int = Field(4096, ge=1, description="predictor hidden width")
    pred_layers: int = Field(2, ge=1, description="linear layers in the predictor")
    base_momentum: float = Field(0.99, ge=0.0, le=1.0, description="key-encoder EMA momentum at step 0 (-> 1)")


@register
class MoCoV3(SSLMethod):
    name = "mocov3"
    family = "contrastive"
    description = "MoCo v3: query encoder + projector + predictor vs EMA key encoder, symmetric InfoNCE (tau 0.2)."
    Params = MoCoV3Params

    def __init__(self, encoder: SwinEncoder, params: MoCoV3Params, crop_size: int, total_steps: int) -> None:
        super().__init__(encoder, params, crop_size, total_steps)
        freeze_mask_token(encoder)
        self.projector = MLPHead(
            encoder.out_channels,
            params.proj_hidden_dim,
            params.proj_dim,
            n_layers=params.proj_layers,
            last_batch_norm=True,
        )
        self.predictor = MLPHead(params.proj_dim, params.pred_hidden_dim, params.proj_dim, n_layers=params.pred_layers)
        # The key (momentum) encoder + projector; never trained by gradients.
        self.teacher = EMATeacher(self._online(), params.base_momentum, self.total_steps)

    def _online(self) -> ProjectedEncoder:
        # Built on demand so the encoder is registered once (under ``encoder.``) in the state dict.
        return ProjectedEncoder(self.encoder, self.projector)

    def region_size(self, crop_size: int) -> int:
        return enlarged_region_side(crop_size, self.params.region_scale)

    def make_views(self, region: Tensor, rng: np.random.Generator) -> dict[str, Tensor]:
        return augmented_pair(region, self.crop_size, rng, self.params)

    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        views = [batch["view1"], batch["view2"]]
        pooled, (z1, z2) = self._online()(views)
        q1, q2 = self.predictor(z1), self.predictor(z2)
        _, (k1, k2) = self.teacher(views)
        rank, _ = rank_and_world()
        offset = rank * q1.shape[0]
        tau = self.params.temperature
        loss = moco_v3_infonce(q1, gather_no_grad(k2), tau, offset) + moco_v3_infonce(
            q2, gather_no_grad(k1), tau, offset
        )
        return {
            "loss": loss,
            "infonce": loss.detach(),
            "momentum": loss.new_tensor(self.teacher.momentum(step)),
            "embedding_std": embedding_std(pooled),
        }

    def on_after_step(self, step: int) -> None:
        self.teacher.update(self._online(), step)
