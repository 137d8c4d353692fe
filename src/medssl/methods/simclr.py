"""SimCLR (Chen et al. 2020) in 3D.

Reference: google-research/simclr (``tf2/model.py`` ``ProjectionHead``, ``tf2/objective.py``
``add_contrastive_loss``). Two random resized crops of one region, each flipped and
intensity-augmented (:class:`~medssl.methods.two_crop.TwoCropMethod`); the encoder's pooled
bottleneck goes through a 2-layer MLP projector (2048 -> 128, BatchNorm on the hidden layer);
NT-Xent at temperature 0.1 over the 2N views, where the negatives of a view are every other view of
the global batch (gathered from all processes with gradients, as SimCLR's cross-replica loss).
3D departures (config fields): crops cover a volume fraction of an enlarged region
(``region_scale``, ``crop_scale``), and grey-level augmentation stands in for colour distortion.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from medssl.methods.base import register
from medssl.methods.distributed import gather_with_grad
from medssl.methods.losses import nt_xent
from medssl.methods.two_crop import TwoCropMethod, TwoCropParams
from medssl.models.encoder import SwinEncoder, global_pool
from medssl.models.heads import MLPHead


class SimCLRParams(TwoCropParams):
    temperature: float = Field(0.1, gt=0.0, description="NT-Xent temperature")
    proj_hidden_dim: int = Field(2048, ge=1, description="projector hidden width")
    proj_dim: int = Field(128, ge=1, description="projector output (embedding) width")
    proj_layers: int = Field(2, ge=1, description="linear layers in the projector")


@register
class SimCLR(TwoCropMethod):
    name = "simclr"
    family = "contrastive"
    description = "SimCLR: two augmented crops, MLP projector, NT-Xent over the global batch (tau 0.1)."
    Params = SimCLRParams

    def build_heads(self, encoder: SwinEncoder, params: SimCLRParams) -> None:
        self.projector = MLPHead(
            encoder.out_channels, params.proj_hidden_dim, params.proj_dim, n_layers=params.proj_layers
        )

    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        n = batch["view1"].shape[0]
        pooled = global_pool(self.encode([batch["view1"], batch["view2"]]))
        # SimCLR runs both views as one batch, so the projector's BatchNorm sees all 2N views.
        z = self.projector(pooled)
        loss = nt_xent(gather_with_grad(z[:n]), gather_with_grad(z[n:]), self.params.temperature)
        return self.report(loss, embedding=z, features=pooled, nt_xent=loss)
