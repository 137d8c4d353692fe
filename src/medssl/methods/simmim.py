"""SimMIM (Xie et al. 2022) in 3D: mask random cubes of patch tokens, reconstruct the voxels.

Reference: microsoft/SimMIM ``data/data_simmim.py`` (``SimMIMTransform``: ``RandomResizedCrop(scale=(0.67,
1.), ratio=(3/4, 4/3))``, ``RandomHorizontalFlip``, ``MaskGenerator``) and ``models/simmim.py``
(``SimMIM``: 1x1 conv + pixel shuffle decoder, L1 on masked pixels). One crop per sample: a random
resized crop of the region (volume fraction 0.67-1, side ratios Y/X and Z/X in 3/4-4/3, trilinear back
to ``crop_size``^3), flipped; token cubes of ``mask_patch`` voxels replaced by a learnable mask token
at ``mask_ratio``; the decoder (:class:`~medssl.models.heads.PixelShuffleDecoder`) maps the bottleneck
back to voxels; L1 on masked voxels only.
3D departures (config fields): the 2D area fraction and aspect ratio become a volume fraction and two
side ratios (``crop_scale``, ``crop_ratio``); the horizontal flip becomes a flip per spatial axis
(``flip_prob``).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field
from torch import Tensor

from medssl.config import StrictModel
from medssl.data.views import block_mask, random_flip, random_resized_crop_3d, upsample_mask
from medssl.methods.base import SSLMethod, register
from medssl.methods.health import health_metrics
from medssl.methods.losses import masked_l1
from medssl.models.encoder import SwinEncoder, global_pool
from medssl.models.heads import PixelShuffleDecoder


class SimMIMParams(StrictModel):
    mask_ratio: float = Field(0.6, ge=0.0, le=1.0)
    mask_patch: int = Field(16, ge=2, description="side of a masked cube, in voxels")
    flip_prob: float = Field(0.5, ge=0.0, le=1.0, description="flip probability per spatial axis")
    crop_scale: tuple[float, float] = Field((0.67, 1.0), description="volume fraction of the region a crop covers")
    crop_ratio: tuple[float, float] | None = Field(
        (3.0 / 4.0, 4.0 / 3.0), description="range of a crop's side ratios Y/X and Z/X; null keeps the region's"
    )


@register
class SimMIM(SSLMethod):
    name = "simmim"
    family = "mim"
    description = "SimMIM: masked 3D token cubes, L1 reconstruction of masked voxels by a linear decoder."
    Params = SimMIMParams

    def __init__(self, encoder: SwinEncoder, params: SimMIMParams, crop_size: int, total_steps: int) -> None:
        super().__init__(encoder, params, crop_size, total_steps)
        self.patch = encoder.config.patch_size
        self.stride = encoder.stage_stride(4)  # voxels per bottleneck token
        self.decoder = PixelShuffleDecoder(encoder.out_channels, encoder.config.in_channels, self.stride)

    def make_views(self, region: Tensor, rng: np.random.Generator) -> dict[str, Tensor]:
        p = self.params
        crop = random_resized_crop_3d(region, self.crop_size, p.crop_scale, rng, p.crop_ratio)
        image = random_flip(crop, rng, p.flip_prob)
        depth, height, width = (s // self.patch for s in image.shape[1:])
        grid = (depth, height, width)
        block = max(p.mask_patch // self.patch, 1)
        return {"image": image, "mask": block_mask(grid, block, p.mask_ratio, rng)}

    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        image, mask = batch["image"], batch["mask"]
        features = self.encoder(image, mask=mask)
        reconstruction = self.decoder(features[-1])
        voxel_mask = upsample_mask(mask, self.patch)
        loss = masked_l1(reconstruction, image, voxel_mask)
        return {
            "loss": loss,
            "reconstruction_l1": loss.detach(),
            "mask_fraction": voxel_mask.float().mean(),
            **health_metrics(features=global_pool(features[-1]), history=self.rank_history),
        }
