"""BYOL (Grill et al. 2020) in 3D.

Two augmented crops. Online branch: encoder -> projector (2 layers, 4096 -> 256, BatchNorm on the
hidden layer) -> predictor (2 layers, 4096 -> 256). Target branch: an EMA copy of encoder +
projector, momentum 0.996 -> 1 on a cosine over the global steps. Loss: the normalised MSE
``2 - 2 cos(p, z')`` of each view's prediction against the other view's target projection, summed
over both directions. No negatives, so nothing is gathered across processes.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field
from torch import Tensor

from medssl.data.views import enlarged_region_side
from medssl.methods.base import EMATeacher, SSLMethod, embedding_std, register
from medssl.methods.losses import byol_loss
from medssl.methods.simclr import ProjectedEncoder, TwoCropParams, augmented_pair, freeze_mask_token
from medssl.models.encoder import SwinEncoder
from medssl.models.heads import MLPHead


class BYOLParams(TwoCropParams):
    proj_hidden_dim: int = Field(4096, ge=1, description="projector hidden width")
    proj_dim: int = Field(256, ge=1, description="projector / predictor output width")
    proj_layers: int = Field(2, ge=1, description="linear layers in the projector")
    pred_hidden_dim: int = Field(4096, ge=1, description="predictor hidden width")
    pred_layers: int = Field(2, ge=1, description="linear layers in the predictor")
    base_momentum: float = Field(0.996, ge=0.0, le=1.0, description="target EMA momentum at step 0 (-> 1)")


@register
class BYOL(SSLMethod):
    name = "byol"
    family = "contrastive"
    description = "BYOL: online encoder + projector + predictor regresses an EMA target, 2 - 2cos symmetric."
    Params = BYOLParams

    def __init__(self, encoder: SwinEncoder, params: BYOLParams, crop_size: int, total_steps: int) -> None:
        super().__init__(encoder, params, crop_size, total_steps)
        freeze_mask_token(encoder)
        self.projector = MLPHead(
            encoder.out_channels, params.proj_hidden_dim, params.proj_dim, n_layers=params.proj_layers
        )
        self.predictor = MLPHead(params.proj_dim, params.pred_hidden_dim, params.proj_dim, n_layers=params.pred_layers)
        # The target encoder + projector; never trained by gradients.
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
        p1, p2 = self.predictor(z1), self.predictor(z2)
        _, (t1, t2) = self.teacher(views)
        loss = byol_loss(p1, t2.detach()) + byol_loss(p2, t1.detach())
        return {
            "loss": loss,
            "byol": loss.detach(),
            "momentum": loss.new_tensor(self.teacher.momentum(step)),
            "embedding_std": embedding_std(pooled),
        }

    def on_after_step(self, step: int) -> None:
        self.teacher.update(self._online(), step)
