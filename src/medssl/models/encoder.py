"""The 3D Swin encoder: MONAI's ``SwinTransformer`` plus a mask-token path for masked image modeling.

The module subclasses MONAI's class so its state-dict keys are exactly MONAI's; inside a segmenter
it sits under ``swinViT.`` and checkpoints interchange with ``monai.networks.nets.SwinUNETR``.
The only extra tensor is ``mask_token``, which export drops.

``EncoderConfig.implementation`` picks the forward: ``"monai"`` runs MONAI's modules as MONAI does;
``"fast"`` (default) runs the same modules and weights through :mod:`medssl.models.swin_fast`
(``scaled_dot_product_attention``, cached shift masks, channels-last stages), equal to MONAI's
outputs and gradients to float rounding (tests/models/test_swin_fast.py) and faster
(benchmarks/encoder_speed.py). The state dict is the same either way.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import BasicLayer, SwinTransformer
from torch import Tensor, nn

from medssl.config import EncoderConfig
from medssl.models.size import check_network_size
from medssl.models.swin_fast import SwinCache, run_stage

MASK_TOKEN_KEY = "mask_token"


def _clear_fast_cache(module: nn.Module, keys: object) -> None:
    """Load-state-dict post hook; a module-level function so an encoder (and a method holding one, whose
    ``make_views`` a spawned DataLoader worker receives) pickles."""
    cast(SwinCache, module.fast_cache).clear()


class SwinEncoder(SwinTransformer):
    """Swin encoder returning the five multi-scale feature maps of MONAI's ``SwinTransformer``.

    ``forward(x, normalize=True, mask=None)`` (MONAI's argument order): ``mask`` is a boolean
    ``(B, D', H', W')`` grid over patch tokens
    (``D' = D / patch_size``); masked patch embeddings are replaced by a learnable token
    before the first stage, as in SimMIM.
    """

    def __init__(self, config: EncoderConfig) -> None:
        check_network_size(config, "encoder config")  # before MONAI allocates anything
        feature_size, window, depths, heads = config.feature_size, config.window_size, config.depths, config.num_heads
        assert feature_size is not None and window is not None and depths is not None and heads is not None  # preset
        dims = 3
        super().__init__(
            in_chans=config.in_channels,
            embed_dim=feature_size,
            window_size=(window,) * dims,
            patch_size=(config.patch_size,) * dims,
            depths=depths,
            num_heads=heads,
            drop_path_rate=config.drop_path_rate,
            use_checkpoint=config.use_checkpoint,
            spatial_dims=dims,
            use_v2=config.use_v2,
        )
        self.config = config
        self.mask_token = nn.Parameter(torch.zeros(1, feature_size, 1, 1, 1))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.fast_cache = SwinCache()
        # loaded weights may bring another relative-position index: drop what was derived from it
        self.register_load_state_dict_post_hook(_clear_fast_cache)

    @property
    def stage_channels(self) -> list[int]:
        """Channels of the five outputs: patch embedding, then stages 1-4."""
        f = int(self.config.feature_size or 0)
        return [f, 2 * f, 4 * f, 8 * f, 16 * f]

    @property
    def out_channels(self) -> int:
        return self.stage_channels[-1]

    def token_grid(self, spatial: tuple[int, int, int]) -> tuple[int, int, int]:
        """Patch-token grid of an input (output 0)."""
        return self.stage_grid(spatial, 0)

    def stage_stride(self, index: int) -> int:
        """Voxels per token along an axis in output ``index`` (0: patch embedding, 1-4: after each
        stage's patch merging): ``patch_size * 2**index``. SMIT distils output 3, iBOT output 4."""
        if not 0 <= index < len(self.stage_channels):
            raise ValueError(f"encoder output index {index} outside 0..{len(self.stage_channels) - 1}")
        return self.config.patch_size * 2**index

    def stage_grid(self, spatial: tuple[int, ...], index: int) -> tuple[int, int, int]:
        """Token grid of output ``index`` for an input of side lengths ``spatial`` (96^3, patch 2:
        48^3, 24^3, 12^3, 6^3, 3^3). Each merge halves a side, rounding up as MONAI pads odd sides."""
        self.stage_stride(index)  # validates the index
        grid = [-(-int(s) // self.config.patch_size) for s in spatial]
        for _ in range(index):
            grid = [-(-g // 2) for g in grid]
        return tuple(grid)  # type: ignore[return-value]

    def embed(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Patch embedding with masked tokens replaced by the mask token (B, C, D', H', W')."""
        x0 = self.patch_embed(x)
        if mask is not None:
            if mask.shape != (x0.shape[0], *x0.shape[2:]):
                raise ValueError(f"mask shape {tuple(mask.shape)} does not match token grid {tuple(x0.shape)}")
            w = mask.unsqueeze(1).to(x0.dtype)
            x0 = x0 * (1.0 - w) + self.mask_token.to(x0.dtype) * w
        return self.pos_drop(x0)

    def forward(self, x: Tensor, normalize: bool = True, mask: Tensor | None = None) -> list[Tensor]:
        x0 = self.embed(x, mask)
        if self.config.implementation == "fast":
            return self._fast_forward(x0, normalize)
        outs = [self.proj_out(x0, normalize)]
        h = x0
        for index, stage in enumerate((self.layers1, self.layers2, self.layers3, self.layers4)):
            if self.use_v2:  # MONAI's order: the stage's residual conv block, then its Swin blocks
                h = self.conv_blocks[index](h.contiguous())
            h = stage[0](h.contiguous())
            outs.append(self.proj_out(h, normalize))
        return outs

    @property
    def conv_blocks(self) -> list[nn.Module]:
        """SwinUNETR v2's residual conv block of each stage (``layers{1..4}c``); empty for v1."""
        if not self.use_v2:
            return []
        return [self.layers1c[0], self.layers2c[0], self.layers3c[0], self.layers4c[0]]

    def _fast_forward(self, x0: Tensor, normalize: bool) -> list[Tensor]:
        """Stages on channels-last tensors; outputs are (B, C, D, H, W) views of channels-last data.
        v2's conv blocks run on (B, C, D, H, W) as MONAI's do; their outputs are turned channels-last."""
        h = x0.permute(0, 2, 3, 4, 1).contiguous()
        outs = [h]
        for index, stage in enumerate((self.layers1, self.layers2, self.layers3, self.layers4)):
            if self.use_v2:
                h = self.conv_blocks[index](h.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1).contiguous()
            h = run_stage(cast(BasicLayer, stage[0]), h, self.fast_cache, self.config.use_checkpoint)
            outs.append(h)
        if normalize:
            outs = [F.layer_norm(o, (o.shape[-1],)) for o in outs]
        return [o.permute(0, 4, 1, 2, 3) for o in outs]

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """The weights that form "the encoder" (everything, the mask token included)."""
        return {k: v.detach().clone() for k, v in self.state_dict().items()}


def build_encoder(config: EncoderConfig) -> SwinEncoder:
    return SwinEncoder(config)


def global_pool(features: Tensor) -> Tensor:
    """Average a (B, C, D, H, W) map to (B, C)."""
    return features.flatten(2).mean(dim=2)
