"""The memory a network declares, counted from its config before anything is allocated.

A checkpoint's metadata (or a foreign state dict's key names) declares an encoder: feature size, depths,
heads, window. A 2 MB file can declare one that needs hundreds of gigabytes (a window of 40 gives each block
a relative-position index of 64000^2 int64 entries), and building it would exhaust the machine before any
check ran. The counts below follow MONAI's modules (``monai/networks/nets/swin_unetr.py``: ``PatchEmbed``,
``SwinTransformerBlock``, ``WindowAttention``, ``PatchMerging``, the v2 ``UnetrBasicBlock`` per stage, and
``SwinUNETR``'s decoder) so the figure is exact for weights and an upper bound for normalisation layers;
tests/models/test_size.py compares it with the built networks. ``limits.model_bytes`` bounds it.
"""

from __future__ import annotations

from pathlib import Path

from medssl.config import EncoderConfig
from medssl.limits import check

FLOAT_BYTES = 4
INDEX_BYTES = 8  # relative_position_index is int64
MLP_RATIO = 4  # MONAI SwinTransformer's default


def _res_block(cin: int, cout: int) -> int:
    """``UnetResBlock`` with 3^3 kernels and no bias; a norm counted as 4 values per channel and 2 more (batch
    norm with its running statistics and step counter, the largest case)."""
    norm = 4 * cout + 2
    params = 27 * cin * cout + 27 * cout * cout + 2 * norm
    if cin != cout:
        params += cin * cout + norm
    return params


def encoder_bytes(config: EncoderConfig) -> int:
    """Bytes of the encoder's parameters and buffers (MONAI ``SwinTransformer`` + medssl's mask token)."""
    f, w = int(config.feature_size or 0), int(config.window_size or 0)
    depths, heads = config.depths or (0, 0, 0, 0), config.num_heads or (0, 0, 0, 0)
    params = f * config.in_channels * config.patch_size**3 + f + f  # patch embedding (+ bias), mask token
    index_entries = 0
    for stage, (depth, n_heads) in enumerate(zip(depths, heads, strict=True)):
        c = f * 2**stage
        block = 12 * c * c + 13 * c + (2 * w - 1) ** 3 * n_heads  # norms, qkv, proj, MLP, bias table
        params += depth * block + 16 * c * c + 16 * c  # + the stage's patch merging
        index_entries += depth * w**6
        if config.use_v2:
            params += _res_block(c, c)
    return FLOAT_BYTES * params + INDEX_BYTES * index_entries


def segmenter_bytes(config: EncoderConfig, out_channels: int) -> int:
    """Bytes of MONAI's ``SwinUNETR`` with this encoder: the encoder, the CNN encoder blocks and decoder."""
    f = int(config.feature_size or 0)
    decoder = (
        _res_block(config.in_channels, f)  # encoder1
        + _res_block(f, f)  # encoder2
        + _res_block(2 * f, 2 * f)  # encoder3
        + _res_block(4 * f, 4 * f)  # encoder4
        + _res_block(16 * f, 16 * f)  # encoder10
        + f * out_channels
        + out_channels  # out: 1x1 convolution with bias
    )
    for cin, cout in ((16 * f, 8 * f), (8 * f, 4 * f), (4 * f, 2 * f), (2 * f, f), (f, f)):  # decoder5..1
        decoder += 8 * cin * cout + _res_block(2 * cout, cout)  # transposed conv (2^3, no bias) + res block
    return encoder_bytes(config) + FLOAT_BYTES * decoder


def check_network_size(config: EncoderConfig, source: str | Path, out_channels: int | None = None) -> int:
    """Refuse (exit 2, naming ``source``) a network whose weights would exceed ``limits.model_bytes``;
    returns its size in bytes. ``out_channels`` given: the whole segmenter, else the encoder alone."""
    size = encoder_bytes(config) if out_channels is None else segmenter_bytes(config, out_channels)
    what = "declared encoder size in bytes" if out_channels is None else "declared network size in bytes"
    check(source, what, size, "model_bytes")
    return size
