"""SwinUNETR-style segmenter around the medssl Swin encoder.

The network is MONAI's ``SwinUNETR`` (encoder1..4, encoder10, decoder5..1, out) with its
``swinViT`` replaced by :class:`SwinEncoder`, so every key matches MONAI's and checkpoints move
both ways. Group norm replaces instance norm for 32^3 crops, where the bottleneck is 1x1x1 and
instance norm has nothing to normalise over.

``transformer="identity"`` is the transformer->identity control of Wald et al. 2025 ("Primus: enforcing
attention usage for 3D medical image segmentation", section 3): every Swin block is replaced by identity,
while the patch embedding, the patch mergings (which set each stage's channels and resolution) and the
whole SwinUNETR decoder stay, so what such a segmenter reaches is what the rest of the network does
without the transformer.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from monai.networks.nets import SwinUNETR
from torch import Tensor, nn

from medssl.config import EncoderConfig
from medssl.models.encoder import SwinEncoder
from medssl.models.size import check_network_size


def resolve_norm(norm: str, crop_size: int, feature_size: int) -> tuple | str:
    """The decoder normalisation: ``auto`` picks group norm for crops of 32^3 or less."""
    if norm == "auto":
        norm = "group" if crop_size <= 32 else "instance"
    if norm == "group":
        return ("group", {"num_groups": math.gcd(feature_size, 12)})
    return norm


def swin_unetr_kwargs(
    encoder_config: EncoderConfig, out_channels: int, norm_name: tuple | list | str
) -> dict[str, Any]:
    """The arguments of ``monai.networks.nets.SwinUNETR`` that build this network: the one place they are
    written (the segmenter, a bundle's ``network_def`` and ``medssl export --format monai`` use them)."""
    assert encoder_config.depths is not None and encoder_config.num_heads is not None  # filled from the preset
    return {
        "in_channels": encoder_config.in_channels,
        "out_channels": out_channels,
        "patch_size": encoder_config.patch_size,
        "depths": tuple(encoder_config.depths),
        "num_heads": tuple(encoder_config.num_heads),
        "window_size": encoder_config.window_size,
        "feature_size": encoder_config.feature_size,
        "norm_name": norm_name,
        "spatial_dims": 3,
        "use_v2": encoder_config.use_v2,
    }


class SwinSegmenter(SwinUNETR):
    """``SwinUNETR`` whose ``swinViT`` is a :class:`SwinEncoder` (same keys, plus the mask token)."""

    def __init__(
        self,
        encoder_config: EncoderConfig,
        out_channels: int,
        crop_size: int = 64,
        norm: str = "auto",
        transformer: Literal["swin", "identity"] = "swin",
    ) -> None:
        check_network_size(encoder_config, "encoder config", out_channels)  # before MONAI allocates anything
        assert encoder_config.feature_size is not None  # filled from the preset
        super().__init__(
            **swin_unetr_kwargs(
                encoder_config, out_channels, resolve_norm(norm, crop_size, encoder_config.feature_size)
            ),
            dropout_path_rate=encoder_config.drop_path_rate,
            use_checkpoint=encoder_config.use_checkpoint,
        )
        self.encoder_config = encoder_config
        self.swinViT = SwinEncoder(encoder_config)
        # The mask token only serves masked pretraining; frozen here so DDP sees no unused parameter.
        self.swinViT.mask_token.requires_grad_(False)
        self.transformer = transformer
        if transformer == "identity":
            for stage in (self.swinViT.layers1, self.swinViT.layers2, self.swinViT.layers3, self.swinViT.layers4):
                stage[0].blocks = nn.ModuleList()  # a stage without blocks: its input goes to its patch merging
        elif transformer != "swin":
            raise ValueError(f"transformer must be 'swin' or 'identity', not {transformer!r}")

    @property
    def encoder(self) -> SwinEncoder:
        return self.swinViT  # type: ignore[return-value]

    def forward(self, x_in: Tensor) -> Tensor:
        return super().forward(x_in)
