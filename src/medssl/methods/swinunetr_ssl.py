"""SwinUNETR self-supervised pretraining (Tang et al., CVPR 2022): rotation + contrastive + inpainting.

Reference: Project-MONAI/research-contributions ``SwinUNETR/Pretrain``: ``main.py`` (``train``),
``utils/ops.py`` (``rot_rand``, ``aug_rand``, ``patch_rand_drop``), ``models/ssl_head.py``
(``SSLHead``) and ``losses/loss.py`` (``Contrast``, ``Loss``).

Views, as ``main.py``: one crop ``x`` is taken twice; each copy gets its own random rotation
(``rot_rand``: ``rot90(k, dims=(2, 3))`` of a (C, H, W, D) sample, i.e. the (Y, Z) plane about
spatial axis 0 -- :data:`~medssl.data.views.SWINUNETR_ROTATION_AXIS`; 4 classes) and its own
cut-out (``aug_rand``): boxes covering up to 30% of the voxels filled with noise in [0, 1], then,
when a randomly drawn sample index of the batch is another sample, a second set of boxes filled
with that sample's voxels. The second set needs the batch, so that part of the augmentation runs
in ``forward`` (:func:`fill_from_batch`): ``make_views`` draws the boxes and the index (as a
uniform number, seeded per sample like every view) and ``forward`` copies the donor's voxels.
Like the reference's in-place loop, a donor earlier in the batch gives its already corrupted view,
a later one its clean rotated view; the donor comes from this process's batch.

Heads, as ``SSLHead`` (``upsample="vae"``): rotation ``Linear(-> 4)`` on bottleneck token 0,
contrastive ``Linear(-> 512)`` on token 1, and the convolutional decoder of
:class:`~medssl.models.heads.ReconstructionDecoder` back to voxels. Loss (``Loss``) =
``CE + NT-Xent(tau 0.5) + L1(reconstruction, rotated uncut crop)``, weights 1:1:1; the NT-Xent of
``Contrast`` uses the per-process batch.

3D departures, each a config field: ``head_input: pooled`` feeds the pooled bottleneck to both heads
(crops under 64^3 have a single bottleneck token, so tokens 0 and 1 do not exist);
``decoder_norm: group`` for 1^3 bottlenecks; ``global_negatives: true`` gathers NT-Xent negatives
from every process.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from medssl.config import StrictModel
from medssl.data.views import (
    SWINUNETR_ROTATION_AXIS,
    boxes_mask,
    cutout,
    cutout_boxes,
    rotate90_view,
)
from medssl.errors import ConfigError
from medssl.methods.base import UnmaskedMethod, register
from medssl.methods.distributed import gather_with_grad
from medssl.methods.losses import nt_xent, rotation_ce
from medssl.models.encoder import global_pool
from medssl.models.heads import ReconstructionDecoder

N_ROTATIONS = 4


class SwinUNETRSSLParams(StrictModel):
    max_cutout: float = Field(0.3, ge=0.0, le=1.0, description="largest budget of cut-out voxels per box set")
    max_box_fraction: float = Field(0.25, gt=0.0, le=1.0, description="longest cut-out box side / crop side")
    min_box_fraction: float = Field(0.05, ge=0.0, le=1.0, description="shortest cut-out box side / crop side")
    temperature: float = Field(0.5, gt=0.0, description="NT-Xent temperature")
    contrastive_dim: int = Field(512, ge=1, description="output width of the contrastive Linear head")
    head_input: Literal["tokens", "pooled"] = Field(
        "tokens", description="tokens: bottleneck tokens 0 / 1 feed the rotation / contrastive heads (reference)"
    )
    global_negatives: bool = Field(False, description="gather NT-Xent negatives from every process")
    rotation_weight: float = Field(1.0, ge=0.0, description="weight of the rotation cross-entropy")
    contrastive_weight: float = Field(1.0, ge=0.0, description="weight of the NT-Xent term")
    reconstruction_weight: float = Field(1.0, ge=0.0, description="weight of the L1 reconstruction term")
    decoder_norm: Literal["auto", "instance", "group"] = Field(
        "auto", description="decoder normalisation; auto = group for crops <= 32 (1^3 bottleneck), else instance"
    )


def fill_from_batch(views: Tensor, clean: Tensor, donor_masks: Tensor, donor_draws: Tensor) -> Tensor:
    """The batch half of ``utils/ops.py`` ``aug_rand``: sample ``i`` takes the voxels under its
    ``donor_masks[i]`` from sample ``j = floor(donor_draws[i] * B)`` when ``j != i``.

    Sample by sample in batch order, as the reference's in-place loop: a donor ``j < i`` gives its
    final (corrupted) view, a donor ``j > i`` its ``clean`` rotated crop.
    """
    n = views.shape[0]
    donors = (donor_draws.float() * n).long().clamp(0, n - 1).tolist()
    out = views.clone()
    for i, j in enumerate(donors):
        if j != i:
            donor = out[j] if j < i else clean[j]
            out[i] = torch.where(donor_masks[i], donor, out[i])
    return out


@register
class SwinUNETRSSL(UnmaskedMethod):
    name = "swinunetr_ssl"
    family = "rotation"
    description = "SwinUNETR-SSL: one crop twice, rotation CE + NT-Xent (tau 0.5) + L1 inpainting, 1:1:1."
    Params = SwinUNETRSSLParams
    params: SwinUNETRSSLParams

    @classmethod
    def negatives_per_step(cls, batch_size: int) -> int | None:
        """``Contrast``'s NT-Xent over the 2B views (per process unless ``global_negatives``; counted at the
        global batch)."""
        return 2 * batch_size - 2

    def make_views(self, region: Tensor, rng: np.random.Generator) -> dict[str, Tensor]:
        p = self.params
        crop = region.float()
        boxes = {
            "max_fraction": p.max_cutout,
            "max_box_fraction": p.max_box_fraction,
            "min_box_fraction": p.min_box_fraction,
        }
        depth, height, width = (int(s) for s in crop.shape[1:])
        spatial = (depth, height, width)
        views: dict[str, Tensor] = {}
        for i in (1, 2):
            k = int(rng.integers(N_ROTATIONS))
            rotated = rotate90_view(crop, k, SWINUNETR_ROTATION_AXIS)
            cut, mask = cutout(rotated, rng, fill="noise", **boxes)
            views[f"view{i}"] = cut
            views[f"target{i}"] = rotated
            views[f"rotation{i}"] = torch.tensor(k, dtype=torch.long)
            views[f"cut_fraction{i}"] = mask.float().mean()
            views[f"donor_mask{i}"] = boxes_mask(cutout_boxes(spatial, rng, **boxes), spatial)
            views[f"donor_draw{i}"] = torch.tensor(rng.random(), dtype=torch.float32)
        return views

    def build_heads(self) -> None:
        encoder, params = self.encoder, self.params
        stride = encoder.stage_stride(4)  # voxels per bottleneck token
        crop = self.crop_size
        if params.head_input == "tokens" and np.prod(encoder.stage_grid((crop,) * 3, 4)) < 2:
            raise ConfigError(
                "method.options.head_input",
                f"'tokens' needs two bottleneck tokens, but a {crop}^3 crop has one; use 'pooled' or crops >= 64",
            )
        dim = encoder.out_channels
        self.rotation_head = nn.Linear(dim, N_ROTATIONS)
        self.contrastive_head = nn.Linear(dim, params.contrastive_dim)
        norm = params.decoder_norm
        if norm == "auto":
            norm = "group" if crop <= 32 else "instance"
        self.decoder = ReconstructionDecoder(dim, encoder.config.in_channels, stride, norm)

    def _head_inputs(self, bottleneck: Tensor) -> tuple[Tensor, Tensor]:
        if self.params.head_input == "pooled":
            pooled = global_pool(bottleneck)
            return pooled, pooled
        tokens = bottleneck.flatten(2)  # (B, C, L): token l of the flattened (X, Y, Z) grid, as SSLHead
        return tokens[:, :, 0], tokens[:, :, 1]

    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        p = self.params
        n = batch["view1"].shape[0]
        views = [
            fill_from_batch(batch[f"view{i}"], batch[f"target{i}"], batch[f"donor_mask{i}"], batch[f"donor_draw{i}"])
            for i in (1, 2)
        ]
        bottleneck = self.encoder(torch.cat(views, dim=0))[-1]  # both copies in one encoder pass
        rotation_in, contrastive_in = self._head_inputs(bottleneck)
        rotation_logits = self.rotation_head(rotation_in)
        labels = torch.cat([batch["rotation1"], batch["rotation2"]]).long()
        rot = rotation_ce(rotation_logits, labels)
        c = self.contrastive_head(contrastive_in)
        c1, c2 = (gather_with_grad(c[:n]), gather_with_grad(c[n:])) if p.global_negatives else (c[:n], c[n:])
        contrast = nt_xent(c1, c2, p.temperature)
        reconstruction = self.decoder(bottleneck)
        target = torch.cat([batch["target1"], batch["target2"]], dim=0)
        recon = torch.nn.functional.l1_loss(reconstruction.float(), target.float())
        loss = p.rotation_weight * rot + p.contrastive_weight * contrast + p.reconstruction_weight * recon
        accuracy = (rotation_logits.detach().argmax(dim=1) == labels).float().mean()
        return self.outputs(
            loss,
            embedding=c,
            features=global_pool(bottleneck),
            rotation_ce=rot,
            contrastive=contrast,
            reconstruction_l1=recon,
            rotation_accuracy=accuracy,
        )
