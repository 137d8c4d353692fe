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

Small crops (``decoder_stage``, a declared small-scale departure). The released decoder reads the
bottleneck (``SimMIM.forward``: ``z = self.encoder(x, mask)``, the last stage, stride 32 at patch 4 in 2D;
``encoder.stage_stride(4)`` = 32 voxels here), with masks of ``MASK_PATCH_SIZE: 32`` = one bottleneck token
(``configs/swin_base__100ep``). A 32^3 crop has one bottleneck token, so the decoder would rebuild the whole
crop from one vector: a global auto-encoder, not masked local prediction. ``decoder_stage: 3`` (2^3 = 8
tokens of 16 voxels at 32^3) or ``2`` (4^3 = 64 tokens of 8 voxels) reconstructs from that encoder output
instead; set ``mask_patch`` to its stride (16 or 8) to keep one mask cube per reconstructing token, as the
release does. The stages after ``decoder_stage`` then receive no gradient and are frozen at their
initialisation (``trained_stages`` in the run's ``pretext`` record).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field
from torch import Tensor

from medssl.config import StrictModel
from medssl.data.views import block_mask, random_flip, random_resized_crop_3d, upsample_mask
from medssl.methods.base import SSLMethod, freeze_stages_after, register, token_count
from medssl.methods.losses import masked_l1
from medssl.models.encoder import global_pool
from medssl.models.heads import PixelShuffleDecoder

BOTTLENECK = 4  # encoder output index of the bottleneck (after the fourth patch merging)


class SimMIMParams(StrictModel):
    mask_ratio: float = Field(0.6, ge=0.0, le=1.0)
    mask_patch: int = Field(16, ge=2, description="side of a masked cube, in voxels")
    flip_prob: float = Field(0.5, ge=0.0, le=1.0, description="flip probability per spatial axis")
    crop_scale: tuple[float, float] = Field((0.67, 1.0), description="volume fraction of the region a crop covers")
    crop_ratio: tuple[float, float] | None = Field(
        (3.0 / 4.0, 4.0 / 3.0), description="range of a crop's side ratios Y/X and Z/X; null keeps the region's"
    )
    decoder_stage: int = Field(
        BOTTLENECK,
        ge=1,
        le=BOTTLENECK,
        description="encoder output the decoder reconstructs from: 4 the bottleneck (released); 3 or 2 the "
        "small-scale option (>= 8 tokens per 32^3 crop), later stages frozen",
    )


@register
class SimMIM(SSLMethod):
    name = "simmim"
    family = "mim"
    description = "SimMIM: masked 3D token cubes, L1 reconstruction of masked voxels by a linear decoder."
    Params = SimMIMParams
    params: SimMIMParams

    def build_heads(self) -> None:
        encoder, stage = self.encoder, self.params.decoder_stage
        self.patch = encoder.config.patch_size
        self.stride = encoder.stage_stride(stage)  # voxels per reconstructing token
        self.decoder = PixelShuffleDecoder(encoder.stage_channels[stage], encoder.config.in_channels, self.stride)
        freeze_stages_after(encoder, stage)

    def pretext(self) -> dict[str, Any]:
        stage = self.params.decoder_stage
        return {
            "reconstruct_stage": stage,
            "reconstruct_tokens": token_count(self.encoder, self.crop_size, stage),
            "mask_unit_voxels": max(self.params.mask_patch // self.patch, 1) * self.patch,
            "trained_stages": stage,
        }

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
        stage = self.params.decoder_stage
        reconstruction = self.decoder(features[stage])
        voxel_mask = upsample_mask(mask, self.patch)
        loss = masked_l1(reconstruction, image, voxel_mask)
        return self.outputs(
            loss,
            features=global_pool(features[stage]),
            reconstruction_l1=loss,
            mask_fraction=voxel_mask.float().mean(),
        )
