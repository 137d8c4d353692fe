"""SwinUNETR self-supervised pretraining (Tang et al., CVPR 2022): rotation + contrastive + inpainting.

Two random crops of one region; each is rotated by k * 90 degrees about the last spatial axis (4
classes) and then corrupted by cutout: random boxes whose union covers at most 30% of the crop,
filled first with noise and then (with probability ``donor_prob``) with the same boxes' voxels of
the other view, as the published code fills them from another image. Heads on the encoder
bottleneck: rotation ``Linear(-> 4)`` and contrastive ``Linear(-> 512)`` on the pooled
bottleneck, and a convolutional decoder (five conv / norm / LeakyReLU / 2x trilinear upsampling
stages) back to voxels. Loss = ``w_rot * CE + w_con * NT-Xent(tau 0.5) + w_rec * L1``, where L1
compares the reconstruction of the cut-out view with its uncut (rotated) crop; weights 1:1:1.

The published head reads tokens 0 and 1 of the flattened bottleneck for the rotation and
contrastive heads; the pooled bottleneck is used here, since at 32^3 or 64^3 crops the bottleneck
has one or eight tokens and the two heads would otherwise see the same or an arbitrary corner token.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from medssl.config import StrictModel
from medssl.data.views import cutout, enlarged_region_side, random_rotation_label, rotate90_view, two_crops
from medssl.methods.base import SSLMethod, embedding_std, register
from medssl.methods.losses import nt_xent, rotation_ce
from medssl.methods.simclr import freeze_mask_token, gather_with_grad
from medssl.models.encoder import SwinEncoder, global_pool


class SwinUNETRSSLParams(StrictModel):
    region_scale: float = Field(1.25, ge=1.0, description="region side / crop side (rounded up to 16)")
    crop_scale: tuple[float, float] = Field((0.3, 1.0), description="fraction of the region's volume a crop covers")
    max_cutout: float = Field(0.3, ge=0.0, le=1.0, description="largest fraction of a crop's voxels cut out")
    donor_prob: float = Field(
        0.5, ge=0.0, le=1.0, description="probability of a second cutout filled from the other view"
    )
    temperature: float = Field(0.5, gt=0.0, description="NT-Xent temperature")
    contrastive_dim: int = Field(512, ge=1, description="output width of the contrastive Linear head")
    rotation_weight: float = Field(1.0, ge=0.0, description="weight of the rotation cross-entropy")
    contrastive_weight: float = Field(1.0, ge=0.0, description="weight of the NT-Xent term")
    reconstruction_weight: float = Field(1.0, ge=0.0, description="weight of the L1 reconstruction term")
    decoder_norm: Literal["auto", "instance", "group"] = Field(
        "auto", description="decoder normalisation; auto = group for crops <= 32 (1^3 bottleneck), else instance"
    )

    @field_validator("crop_scale")
    @classmethod
    def _valid_scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < v[0] <= v[1] <= 1.0:
            raise ValueError("crop_scale must satisfy 0 < lo <= hi <= 1")
        return v


class ReconstructionDecoder(nn.Module):
    """Bottleneck -> voxels: per stage conv3 -> norm -> LeakyReLU -> 2x trilinear upsampling.

    Channels halve at each stage down to ``dim / 16`` (the published "vae" upsampler), and a final
    1x1x1 conv maps to the image channels. ``n_stages = log2(stride)`` (5 for patch 2).
    """

    def __init__(self, in_dim: int, out_channels: int, stride: int, norm: Literal["instance", "group"]) -> None:
        super().__init__()
        n_stages = int(round(math.log2(stride)))
        if 2**n_stages != stride:
            raise ValueError(f"decoder stride {stride} is not a power of 2")
        layers: list[nn.Module] = []
        dim = in_dim
        for i in range(n_stages):
            out = max(in_dim // 2 ** min(i + 1, 4), 1)
            norm_layer: nn.Module = (
                nn.InstanceNorm3d(out, affine=True) if norm == "instance" else nn.GroupNorm(math.gcd(out, 8), out)
            )
            layers += [
                nn.Conv3d(dim, out, kernel_size=3, padding=1),
                norm_layer,
                nn.LeakyReLU(inplace=True),
                nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
            ]
            dim = out
        layers.append(nn.Conv3d(dim, out_channels, kernel_size=1))
        self.net = nn.Sequential(*layers)

    def forward(self, bottleneck: Tensor) -> Tensor:
        return self.net(bottleneck)


@register
class SwinUNETRSSL(SSLMethod):
    name = "swinunetr_ssl"
    family = "rotation"
    description = "SwinUNETR-SSL: rotation CE + NT-Xent (tau 0.5) + L1 inpainting of cut-out crops, 1:1:1."
    Params = SwinUNETRSSLParams

    def __init__(self, encoder: SwinEncoder, params: SwinUNETRSSLParams, crop_size: int, total_steps: int) -> None:
        super().__init__(encoder, params, crop_size, total_steps)
        freeze_mask_token(encoder)
        dim = encoder.out_channels
        self.rotation_head = nn.Linear(dim, 4)
        self.contrastive_head = nn.Linear(dim, params.contrastive_dim)
        norm = params.decoder_norm
        if norm == "auto":
            norm = "group" if crop_size <= 32 else "instance"
        stride = encoder.config.patch_size * 2**4  # patch embedding, then four 2x merges
        self.decoder = ReconstructionDecoder(dim, encoder.config.in_channels, stride, norm)

    def region_size(self, crop_size: int) -> int:
        return enlarged_region_side(crop_size, self.params.region_scale)

    def make_views(self, region: Tensor, rng: np.random.Generator) -> dict[str, Tensor]:
        p = self.params
        crops = two_crops(region, self.crop_size, rng, p.crop_scale)
        rotated, labels = [], []
        for crop in crops:
            label, k, axis = random_rotation_label(rng, n_axes=1)
            rotated.append(rotate90_view(crop, k, axis))
            labels.append(label)
        views: dict[str, Tensor] = {}
        for i, (image, other) in enumerate(((rotated[0], rotated[1]), (rotated[1], rotated[0])), start=1):
            cut, mask = cutout(image, rng, p.max_cutout, fill="noise")
            if rng.random() < p.donor_prob:
                remaining = max(p.max_cutout - float(mask.float().mean()), 0.0)
                cut, more = cutout(cut, rng, remaining, fill=other)
                mask = mask | more
            views[f"view{i}"] = cut
            views[f"target{i}"] = image
            views[f"rotation{i}"] = torch.tensor(labels[i - 1], dtype=torch.long)
            views[f"cut_fraction{i}"] = mask.float().mean()
        return views

    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        p = self.params
        n = batch["view1"].shape[0]
        bottleneck = self.encoder(torch.cat([batch["view1"], batch["view2"]], dim=0))[-1]
        pooled = global_pool(bottleneck)
        rotation_logits = self.rotation_head(pooled)
        labels = torch.cat([batch["rotation1"], batch["rotation2"]]).long()
        rot = rotation_ce(rotation_logits, labels)
        c = self.contrastive_head(pooled)
        contrast = nt_xent(gather_with_grad(c[:n]), gather_with_grad(c[n:]), p.temperature)
        reconstruction = self.decoder(bottleneck)
        target = torch.cat([batch["target1"], batch["target2"]], dim=0)
        recon = torch.nn.functional.l1_loss(reconstruction.float(), target.float())
        loss = p.rotation_weight * rot + p.contrastive_weight * contrast + p.reconstruction_weight * recon
        accuracy = (rotation_logits.detach().argmax(dim=1) == labels).float().mean()
        return {
            "loss": loss,
            "rotation_ce": rot.detach(),
            "contrastive": contrast.detach(),
            "reconstruction_l1": recon.detach(),
            "rotation_accuracy": accuracy,
            "embedding_std": embedding_std(pooled),
        }
