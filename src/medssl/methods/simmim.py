"""SimMIM (Xie et al. 2022) in 3D: mask random cubes of patch tokens, reconstruct the voxels.

One augmented crop; token cubes of ``mask_patch`` voxels replaced by a learnable mask token at
``mask_ratio``; a one-layer decoder (1x1x1 conv + 3D pixel shuffle) from the bottleneck back to
voxels; L1 on masked voxels only.
"""

from __future__ import annotations

import numpy as np
from monai.networks.utils import pixelshuffle
from pydantic import Field
from torch import Tensor, nn

from medssl.config import StrictModel
from medssl.data.views import block_mask, random_flip, upsample_mask
from medssl.methods.base import SSLMethod, register
from medssl.methods.losses import masked_l1
from medssl.models.encoder import SwinEncoder


class SimMIMParams(StrictModel):
    mask_ratio: float = Field(0.6, ge=0.0, le=1.0)
    mask_patch: int = Field(16, ge=2, description="side of a masked cube, in voxels")


class PixelShuffleDecoder(nn.Module):
    """SimMIM's light decoder: 1x1x1 conv to ``stride^3 * C`` channels, then 3D pixel shuffle."""

    def __init__(self, in_features: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.proj = nn.Conv3d(in_features, stride**3 * out_channels, kernel_size=1)

    def forward(self, bottleneck: Tensor) -> Tensor:
        return pixelshuffle(self.proj(bottleneck), spatial_dims=3, scale_factor=self.stride)


@register
class SimMIM(SSLMethod):
    name = "simmim"
    family = "mim"
    description = "SimMIM: masked 3D token cubes, L1 reconstruction of masked voxels by a linear decoder."
    Params = SimMIMParams

    def __init__(self, encoder: SwinEncoder, params: SimMIMParams, crop_size: int, total_steps: int) -> None:
        super().__init__(encoder, params, crop_size, total_steps)
        self.patch = encoder.config.patch_size
        self.stride = self.patch * 2**4  # patch embedding, then four 2x merges
        self.decoder = PixelShuffleDecoder(encoder.out_channels, encoder.config.in_channels, self.stride)

    def make_views(self, region: Tensor, rng: np.random.Generator) -> dict[str, Tensor]:
        image = random_flip(region, rng)
        grid = tuple(s // self.patch for s in image.shape[1:])
        block = max(self.params.mask_patch // self.patch, 1)
        return {"image": image, "mask": block_mask(grid, block, self.params.mask_ratio, rng)}

    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        image, mask = batch["image"], batch["mask"]
        features = self.encoder(image, mask=mask)
        reconstruction = self.decoder(features[-1])
        voxel_mask = upsample_mask(mask, self.patch)
        loss = masked_l1(reconstruction, image, voxel_mask)
        return {"loss": loss, "reconstruction_l1": loss.detach(), "mask_fraction": voxel_mask.float().mean()}
