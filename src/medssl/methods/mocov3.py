"""MoCo v3 (Chen, Xie & He 2021) in 3D, after its ViT variant.

Reference: facebookresearch/moco-v3 ``moco/builder.py`` (``MoCo_ViT._build_projector_and_predictor_mlps``,
``MoCo._build_mlp``, ``MoCo.contrastive_loss``) and ``main_moco.py`` (augmentations, momentum).
Two augmented crops; view 1 blurred with p 1.0, view 2 blurred with p 0.1 and solarised with
p 0.2 (``augmentation1`` / ``augmentation2``). Query branch: encoder -> projector (3 layers, 4096
hidden, 256 out) -> predictor (2 layers, 4096 -> 256); as ``_build_mlp(..., last_bn=True)`` builds
both for ViT, each hidden layer has BatchNorm + ReLU and both MLPs end in a BatchNorm without
affine parameters (the ResNet variant's predictor has none: ``pred_last_batch_norm: false``). Key
branch: an EMA copy of encoder + projector, momentum 0.99 -> 1 on a cosine over the global steps.
Symmetric InfoNCE ``ctr(q1, k2) + ctr(q2, k1)`` at tau 0.2, each term scaled by ``2 tau``; keys
come from every process (``concat_all_gather``).
3D departures (config fields): as :class:`~medssl.methods.two_crop.TwoCropParams` (volume-fraction
crops of an enlarged region, grey-level augmentation for colour distortion).
Departure (config field): the README's ViT commands pass ``--stop-grad-conv1`` (``vits.py``
``VisionTransformerMoCo.__init__``: the patch projection stays at its random initialisation, a fix for
ViT instability at large batches and learning rates, MoCo v3 paper section 4.1); medssl trains the Swin's
patch embedding unless ``stop_grad_patch_embed: true``, which freezes ``encoder.patch_embed``.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from medssl.methods.base import register
from medssl.methods.distributed import gather_no_grad, rank_and_world
from medssl.methods.losses import moco_v3_infonce
from medssl.methods.two_crop import MomentumTwoCropMethod, MomentumTwoCropParams


class MoCoV3Params(MomentumTwoCropParams):
    temperature: float = Field(0.2, gt=0.0, description="InfoNCE temperature")
    proj_layers: int = Field(3, ge=1, description="linear layers in the projector")
    pred_last_batch_norm: bool = Field(True, description="predictor ends in BatchNorm (ViT variant; ResNet: false)")
    base_momentum: float = Field(0.99, ge=0.0, le=1.0, description="key-encoder EMA momentum at step 0 (-> 1)")
    stop_grad_patch_embed: bool = Field(
        False, description="freeze the encoder's patch embedding at its initialisation (--stop-grad-conv1)"
    )


@register
class MoCoV3(MomentumTwoCropMethod):
    name = "mocov3"
    family = "contrastive"
    description = "MoCo v3: query encoder + projector + predictor vs EMA key encoder, symmetric InfoNCE (tau 0.2)."
    Params = MoCoV3Params
    loss_name = "infonce"

    params: MoCoV3Params

    @classmethod
    def negatives_per_step(cls, batch_size: int) -> int | None:
        """Each query against the keys of the global batch (``concat_all_gather``) but its own positive."""
        return batch_size - 1

    def build_heads(self) -> None:
        if self.params.stop_grad_patch_embed:
            self.encoder.patch_embed.requires_grad_(False)
        super().build_heads()

    def last_batch_norms(self) -> tuple[bool, bool]:
        """Both MLPs end in BatchNorm (``_build_mlp(..., last_bn=True)``), the predictor unless ResNet-style."""
        return True, self.params.pred_last_batch_norm

    def pair_loss(self, predictions: list[Tensor], targets: list[Tensor]) -> Tensor:
        (q1, q2), (k1, k2) = predictions, targets
        offset = rank_and_world()[0] * q1.shape[0]
        tau = self.params.temperature
        return moco_v3_infonce(q1, gather_no_grad(k2), tau, offset) + moco_v3_infonce(
            q2, gather_no_grad(k1), tau, offset
        )
