"""SimCLR (Chen et al. 2020) in 3D.

Reference: google-research/simclr (``tf2/model.py`` ``ProjectionHead``, ``tf2/objective.py``
``add_contrastive_loss``). Two random resized crops of one region, each flipped and
intensity-augmented (:class:`~medssl.methods.two_crop.TwoCropMethod`); the encoder's pooled
bottleneck goes through a 2-layer MLP projector (2048 -> 128, BatchNorm on the hidden layer: the
SimCLR paper's g(h) = W2 relu(W1 h), section 2.1); NT-Xent at temperature 0.1 over the 2N views, where the
negatives of a view are every other view of the global batch (gathered from all processes with
gradients, as SimCLR's cross-replica loss).
3D departures (config fields): crops cover a volume fraction of an enlarged region
(``region_scale``, ``crop_scale``), and grey-level augmentation stands in for colour distortion.
Departures from the released ``tf2/model.py`` (config fields): its ``ProjectionHead`` (SimCLR v2 code,
``--num_proj_layers`` default 3) ends every layer, the last included, in BatchNorm (``LinearLayer(...,
use_bn=True)``; the last without centring, ``center=use_bias=False``); medssl's projector has
``proj_layers: 2`` (the v1 paper's head) and no BatchNorm after its last layer unless
``proj_last_batch_norm: true`` (BatchNorm with a scale and no shift, as the release's last layer).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor

from medssl.methods.base import register
from medssl.methods.distributed import gather_with_grad
from medssl.methods.losses import nt_xent
from medssl.methods.two_crop import TwoCropMethod, TwoCropParams, projection_head
from medssl.models.encoder import global_pool


class SimCLRParams(TwoCropParams):
    temperature: float = Field(0.1, gt=0.0, description="NT-Xent temperature")
    proj_hidden_dim: int = Field(2048, ge=1, description="projector hidden width")
    proj_dim: int = Field(128, ge=1, description="projector output (embedding) width")
    proj_layers: int = Field(2, ge=1, description="linear layers in the projector")
    proj_last_batch_norm: bool = Field(
        False, description="BatchNorm (scale, no shift) after the last layer, as tf2/model.py ProjectionHead"
    )


@register
class SimCLR(TwoCropMethod):
    name = "simclr"
    family = "contrastive"
    description = "SimCLR: two augmented crops, MLP projector, NT-Xent over the global batch (tau 0.1)."
    Params = SimCLRParams
    params: SimCLRParams

    @classmethod
    def negatives_per_step(cls, batch_size: int) -> int | None:
        """NT-Xent over the 2B views of the global batch: every view but itself and its positive."""
        return 2 * batch_size - 2

    def build_heads(self) -> None:
        last_batch_norm: Literal["scale"] | bool = "scale" if self.params.proj_last_batch_norm else False
        self.projector = projection_head(self.encoder.out_channels, self.params, last_batch_norm=last_batch_norm)

    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        n = batch["view1"].shape[0]
        pooled = global_pool(self.encode([batch["view1"], batch["view2"]]))
        # SimCLR runs both views as one batch, so the projector's BatchNorm sees all 2N views.
        z = self.projector(pooled)
        loss = nt_xent(gather_with_grad(z[:n]), gather_with_grad(z[n:]), self.params.temperature)
        return self.outputs(loss, embedding=z, features=pooled, nt_xent=loss)
