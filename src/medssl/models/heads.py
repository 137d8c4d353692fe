"""Heads shared by the SSL methods: MLP projector/predictor, the DINO/iBOT prototype head, and the
reconstruction decoders (SimMIM's pixel-shuffle decoder, SwinUNETR-SSL's convolutional upsampler)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from monai.networks.utils import pixelshuffle
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm


class MLPHead(nn.Module):
    """``n_layers`` linear layers with (optional) BatchNorm and ReLU between them.

    SimCLR: 2 layers, 2048 -> 128; MoCo v3 / BYOL: projector and predictor 4096 -> 256, with
    BatchNorm on hidden layers. ``last_batch_norm``: a BatchNorm after the last layer, ``True`` without
    affine parameters (MoCo v3's ``_build_mlp(..., last_bn=True)``: ``BatchNorm1d(affine=False)``),
    ``"scale"`` with a scale and no shift (SimCLR's ``tf2/model.py`` last ``LinearLayer``: ``center=False``).
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        n_layers: int = 2,
        batch_norm: bool = True,
        last_batch_norm: bool | Literal["scale"] = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(n_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=not last_batch_norm))
        if last_batch_norm == "scale":
            norm = nn.BatchNorm1d(out_dim, affine=True)
            norm.register_parameter("bias", None)  # no shift (F.batch_norm takes bias=None)
            layers.append(norm)
        elif last_batch_norm:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def prototype_layer(bottleneck_dim: int, out_dim: int, norm_last_layer: bool = True) -> nn.Module:
    """DINO's last layer: a weight-normalised linear map to ``out_dim`` prototypes, gain 1, the gain
    frozen when ``norm_last_layer`` (``dino/vision_transformer.py`` ``DINOHead``; iBOT's
    ``last_layer2`` is a second one)."""
    layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
    with torch.no_grad():
        layer.parametrizations.weight.original0.fill_(1.0)
    if norm_last_layer:
        layer.parametrizations.weight.original0.requires_grad_(False)
    return layer


class DINOHead(nn.Module):
    """DINO head: 3-layer MLP (GELU) to a ``bottleneck_dim`` L2-normalised code, then a
    weight-normalised linear layer to ``out_dim`` prototypes whose gain is frozen at 1.

    Works on (N, C) global tokens and (N, L, C) patch tokens alike (iBOT, SMIT).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 8192,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_layers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(max(n_layers - 1, 0)):
            layers += [nn.Linear(dim, hidden_dim), nn.GELU()]
            dim = hidden_dim
        layers.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.apply(self._init)
        self.last_layer = prototype_layer(bottleneck_dim, out_dim, norm_last_layer)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def code(self, x: Tensor) -> Tensor:
        """The L2-normalised ``bottleneck_dim`` code the prototypes score."""
        return nn.functional.normalize(self.mlp(x), dim=-1, p=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(self.code(x))

    def last_layer_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.last_layer.parameters() if p.requires_grad]


# --------------------------------------------------------------------------- reconstruction decoders


class PixelShuffleDecoder(nn.Module):
    """SimMIM's light decoder (``models/simmim.py`` ``SimMIM.decoder``): a 1x1x1 conv to
    ``stride^3 * C`` channels, then a 3D pixel shuffle back to voxels (SimMIM, SMIT)."""

    def __init__(self, in_features: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.proj = nn.Conv3d(in_features, stride**3 * out_channels, kernel_size=1)

    def forward(self, bottleneck: Tensor) -> Tensor:
        return pixelshuffle(self.proj(bottleneck), spatial_dims=3, scale_factor=self.stride)


class ReconstructionDecoder(nn.Module):
    """SwinUNETR-SSL's "vae" upsampler (research-contributions ``SwinUNETR/Pretrain/models/ssl_head.py``
    ``SSLHead.conv``): per stage conv3 -> InstanceNorm (no affine) -> LeakyReLU -> 2x trilinear
    upsampling, channels halving down to ``dim / 16``, then a 1x1x1 conv to the image channels.

    ``n_stages = log2(stride)`` (5 for the released patch 2 and four merges). ``norm="group"`` is the
    3D-crop departure: at 32^3 crops the bottleneck is 1^3 and instance norm over one voxel is zero.
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
                nn.InstanceNorm3d(out) if norm == "instance" else nn.GroupNorm(math.gcd(out, 8), out)
            )
            layers += [
                nn.Conv3d(dim, out, kernel_size=3, padding=1),
                norm_layer,
                nn.LeakyReLU(),
                nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
            ]
            dim = out
        layers.append(nn.Conv3d(dim, out_channels, kernel_size=1))
        self.net = nn.Sequential(*layers)

    def forward(self, bottleneck: Tensor) -> Tensor:
        return self.net(bottleneck)
