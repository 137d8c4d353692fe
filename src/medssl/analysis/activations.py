"""Encoder activations for CKA: the five stage outputs of a Swin encoder at shared token positions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from medssl.models.encoder import SwinEncoder

LAYER_NAMES = ("patch_embed", "stage1", "stage2", "stage3", "stage4")


def sample_token_positions(grid: Sequence[int], n_crops: int, max_tokens: int, seed: int) -> np.ndarray:
    """``(n_crops, t, 3)`` token positions on the finest (patch-embedding) grid, distinct per crop.

    ``t = min(max_tokens, tokens in the grid)``; the positions depend only on the seed, the grid and
    the number of crops, so two models compared on the same crops see the same positions.
    """
    n_grid = int(np.prod(grid))
    t = min(int(max_tokens), n_grid)
    rng = np.random.default_rng(seed)
    flat = np.stack([rng.choice(n_grid, size=t, replace=False) for _ in range(n_crops)])
    return np.stack(np.unravel_index(flat, tuple(grid)), axis=-1)


def stage_activations(
    encoder: SwinEncoder,
    crops: Tensor,
    *,
    max_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 4,
) -> list[Tensor]:
    """The encoder's five outputs on ``crops`` (N, C, S, S, S) as ``(N·t, channels)`` float32 matrices.

    Rows are tokens at ``t`` seeded positions per crop, drawn on the patch-embedding grid; a
    coarser stage contributes the token whose cell contains that position. Why subsampling and
    not pooling: CKA needs row k to be the same example in every layer, and the five maps have
    grids S/2 … S/32. Pooling every map to the bottleneck grid keeps rows aligned but leaves one
    row per 32³ crop (too few rows for stable estimates with d up to 16·feature_size); sampling
    shared positions keeps the rows aligned across stages and models, gives ``t`` rows per crop
    and keeps the Gram matrices small (t=64, 16 crops: 1,024 rows). Caveat: a 32³ crop has a 1³
    bottleneck, so stage 4 then has only one distinct row per crop; use 64³+ crops or more crops
    when the stage-4 score matters.
    """
    if crops.ndim != 5:
        raise ValueError(f"crops must be (N, C, D, H, W), got shape {tuple(crops.shape)}")
    n = crops.shape[0]
    grid0 = [-(-s // _patch_size(encoder)) for s in crops.shape[2:]]
    positions = torch.from_numpy(sample_token_positions(grid0, n, max_tokens, seed))  # (n, t, 3)
    t = positions.shape[1]
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    per_layer: list[list[Tensor]] = []
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                batch = crops[start : start + batch_size].to(device=device, dtype=torch.float32)
                outputs = encoder(batch)
                pos = positions[start : start + batch_size]
                crop_index = torch.arange(batch.shape[0]).repeat_interleave(t)
                for layer, feat in enumerate(outputs):
                    grid = torch.tensor(feat.shape[2:])
                    # The cell of a coarser grid containing a patch token: floor(p · G_l / G_0).
                    idx = (pos * grid // torch.tensor(grid0)).reshape(-1, 3).to(feat.device)
                    rows = feat.permute(0, 2, 3, 4, 1)[crop_index.to(feat.device), idx[:, 0], idx[:, 1], idx[:, 2]]
                    if layer == len(per_layer):
                        per_layer.append([])
                    per_layer[layer].append(rows.float().cpu())
    finally:
        encoder.train(was_training)
    return [torch.cat(chunks) for chunks in per_layer]


def _patch_size(encoder: SwinEncoder) -> int:
    config = getattr(encoder, "config", None)
    if config is not None and hasattr(config, "patch_size"):
        return int(config.patch_size)
    return int(encoder.patch_embed.patch_size[0])


def layer_names(n_layers: int) -> list[str]:
    return list(LAYER_NAMES[:n_layers]) if n_layers <= len(LAYER_NAMES) else [f"layer{i}" for i in range(n_layers)]
