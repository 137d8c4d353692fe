"""A faster forward for MONAI's 3D ``SwinTransformer``, on MONAI's own modules and weights.

The modules (and so every state-dict key) are MONAI's ``BasicLayer`` / ``SwinTransformerBlock`` /
``WindowAttention`` / ``PatchMerging``; only the computation is ours. It follows
``monai/networks/nets/swin_unetr.py`` step by step (``BasicLayer.forward``,
``SwinTransformerBlock.forward_part1/2``, ``WindowAttention.forward``, ``PatchMerging.forward``,
``compute_mask``, ``get_window_size``) so outputs and gradients equal MONAI's to float rounding,
including its quirks: zero padding after ``norm1`` up to window multiples (padded tokens take part
in attention as keys), window and shift clipped to the feature size, the relative-position index
sliced ``[:n, :n]`` when the window is clipped, and -100 (not -inf) in the shift mask.

Where the time goes in MONAI's version on a CPU (torch.profiler, tiny preset at 64^3): about two
thirds in window attention, mostly memory traffic over the (windows x heads x n x n) score tensor:
separate bias and mask additions that each allocate a new score tensor, the softmax, and a shift
mask rebuilt in every stage call. Here:

- features stay channels-last ``(B, D, H, W, C)`` and contiguous through a stage; the five outputs
  are ``(B, C, D, H, W)`` views of channels-last tensors (what 3D convolutions downstream like);
- window attention goes through ``scaled_dot_product_attention`` with the relative-position bias
  plus shift mask as one additive float mask wherever that keeps the bias gradient (CUDA, whose
  fused kernels return the mask gradient) or no bias gradient is needed (inference, EMA teachers);
  on a CPU with autograd on, PyTorch's SDPA falls back to its unfused math path for a mask that
  needs a gradient, which is slower than MONAI's, so there :class:`_BiasedSoftmaxAttention` does the
  same arithmetic with the bias and mask added in place into the score tensor, the softmax
  gradient formed in place, and the bias gradient reduced once from it;
- shift masks are built once per (padded size, window, shift, device) and kept;
- patch merging gathers the eight neighbours with one reshape instead of eight strided slices and a
  concatenation (whose backward writes eight zero-filled full-size tensors); MONAI's v1 channel
  order is recovered by permuting the norm and reduction weights, not the activations.

SwinUNETR v2 (``use_v2``) adds a residual conv block before each stage; ``SwinEncoder._fast_forward`` runs
it as MONAI's module on a channels-first view and hands the stage a channels-last tensor
(tests/models/test_swin_fast.py compares outputs and gradients with MONAI's v2).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import (
    BasicLayer,
    PatchMerging,
    PatchMergingV2,
    SwinTransformerBlock,
    WindowAttention,
    compute_mask,
    get_window_size,
)
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# MONAI's PatchMerging (v1) concatenates the 2x2x2 neighbours (d, h, w offsets) in this order;
# PatchMergingV2 uses the lexicographic order (0,0,0), (0,0,1), ..., (1,1,1).
_V1_ORDER = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1))


class SwinCache:
    """Per-encoder tensors that depend only on the input size: shift masks and bias indices."""

    def __init__(self) -> None:
        self.masks: dict[tuple, Tensor] = {}
        self.indices: dict[tuple, Tensor] = {}
        self.merge_index: dict[tuple, Tensor] = {}

    def clear(self) -> None:
        self.masks.clear()
        self.indices.clear()
        self.merge_index.clear()

    def shift_mask(self, padded: tuple[int, int, int], window: tuple, shift: tuple, device: torch.device) -> Tensor:
        key = (padded, window, shift, device)
        mask = self.masks.get(key)
        if mask is None:
            mask = compute_mask(list(padded), window, shift, device)  # (windows, n, n), 0 or -100
            self.masks[key] = mask
        return mask

    def bias_index(self, index: Tensor, n: int) -> Tensor:
        """Flattened ``relative_position_index[:n, :n]`` (MONAI slices it when the window is clipped)."""
        key = (index.data_ptr(), index.device, n)
        flat = self.indices.get(key)
        if flat is None:
            flat = index[:n, :n].reshape(-1).clone()
            self.indices[key] = flat
        return flat


class _BiasedSoftmaxAttention(torch.autograd.Function):
    """softmax(q k^T + bias + mask) v for windows, with the bias gradient; q arrives pre-scaled.

    q, k, v: (B*nW, heads, n, e); bias: (heads, n, n); mask: (nW, n, n) or None. The same operations
    as MONAI's ``WindowAttention.forward`` in the same order (matmul, + bias, + mask, softmax,
    matmul); only the score tensor is reused in place for the bias, mask and softmax, and the softmax
    gradient is formed in place, so a block allocates two score-sized tensors per step, not seven.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, mask: Tensor | None) -> Tensor:
        scores = torch.matmul(q, k.transpose(-2, -1))
        bw, heads, n, _ = scores.shape
        windows = 1 if mask is None else mask.shape[0]
        grouped = scores.view(bw // windows, windows, heads, n, n)
        grouped.add_(bias)
        if mask is not None:
            grouped.add_(mask.unsqueeze(1))
        # in place: a fresh (windows x heads x n x n) tensor costs more in page faults than the softmax
        probs = torch._softmax(scores, -1, False, out=scores)
        del grouped
        out = torch.matmul(probs, v)
        ctx.save_for_backward(q, k, v, probs)
        ctx.windows = windows
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, probs = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_v = torch.matmul(probs.transpose(-2, -1), grad_out)
        grad_scores = torch.matmul(grad_out, v.transpose(-2, -1))
        torch._softmax_backward_data(grad_scores, probs, -1, probs.dtype, grad_input=grad_scores)
        bw, heads, n, _ = grad_scores.shape
        grad_bias = None
        if ctx.needs_input_grad[3]:
            grad_bias = grad_scores.view(bw // ctx.windows, ctx.windows, heads, n, n).sum(dim=(0, 1))
        grad_q = torch.matmul(grad_scores, k)
        grad_k = torch.matmul(grad_scores.transpose(-2, -1), q)
        return grad_q, grad_k, grad_v, grad_bias, None


def window_attention(block: SwinTransformerBlock, windows: Tensor, mask: Tensor | None, cache: SwinCache) -> Tensor:
    """MONAI ``WindowAttention.forward`` on (B*nW, n, C) windows."""
    attn = cast(WindowAttention, block.attn)
    bw, n, c = windows.shape
    heads = attn.num_heads
    qkv = F.linear(windows, attn.qkv.weight, attn.qkv.bias).view(bw, n, 3, heads, c // heads)
    qkv = qkv.permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * attn.scale, qkv[1], qkv[2]
    index = cache.bias_index(cast(Tensor, attn.relative_position_index), n)
    bias = attn.relative_position_bias_table[index].view(n, n, heads).permute(2, 0, 1).contiguous()
    needs_bias_grad = torch.is_grad_enabled() and bias.requires_grad
    if windows.device.type == "cpu" and needs_bias_grad and q.dtype == torch.float32:
        x = _BiasedSoftmaxAttention.apply(q, k, v, bias, mask)
    else:
        if mask is None:
            additive = bias.unsqueeze(0)
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=additive.to(q.dtype), scale=1.0)
        else:
            nw = mask.shape[0]
            additive = (bias.unsqueeze(0) + mask.unsqueeze(1)).view(1, nw * heads, n, n)
            e = c // heads
            qg, kg, vg = (t.reshape(bw // nw, nw * heads, n, e) for t in (q, k, v))
            x = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=additive.to(q.dtype), scale=1.0)
            x = x.view(bw, heads, n, e)
    x = x.transpose(1, 2).reshape(bw, n, c)
    return F.linear(x, attn.proj.weight, attn.proj.bias)


def _partition(x: Tensor, window: tuple[int, int, int]) -> Tensor:
    b, d, h, w, c = x.shape
    x = x.view(b, d // window[0], window[0], h // window[1], window[1], w // window[2], window[2], c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, window[0] * window[1] * window[2], c)


def _reverse(windows: Tensor, window: tuple[int, int, int], dims: tuple[int, int, int, int]) -> Tensor:
    b, d, h, w = dims
    x = windows.view(b, d // window[0], h // window[1], w // window[2], window[0], window[1], window[2], -1)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, d, h, w, -1)


def block_forward(block: SwinTransformerBlock, x: Tensor, mask: Tensor | None, cache: SwinCache) -> Tensor:
    """MONAI ``SwinTransformerBlock.forward`` on channels-last ``x`` (B, D, H, W, C)."""
    b, d, h, w, c = x.shape
    window, shift = get_window_size((d, h, w), block.window_size, block.shift_size)
    y = F.layer_norm(x, (c,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
    pads = [(window[i] - s % window[i]) % window[i] for i, s in enumerate((d, h, w))]
    if any(pads):
        y = F.pad(y, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
    dp, hp, wp = d + pads[0], h + pads[1], w + pads[2]
    shifted = any(s > 0 for s in shift)
    if shifted:
        y = torch.roll(y, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
    attn = window_attention(block, _partition(y, window), mask if shifted else None, cache)
    y = _reverse(attn, window, (b, dp, hp, wp))
    if shifted:
        y = torch.roll(y, shifts=shift, dims=(1, 2, 3))
    if any(pads):
        y = y[:, :d, :h, :w, :]
    x = x + block.drop_path(y)
    mlp = block.mlp
    z = F.layer_norm(x, (c,), block.norm2.weight, block.norm2.bias, block.norm2.eps)
    z = F.linear(mlp.fn(F.linear(z, mlp.linear1.weight, mlp.linear1.bias)), mlp.linear2.weight, mlp.linear2.bias)
    return x + block.drop_path(z)


def _merge_channel_index(c: int, device: torch.device, cache: SwinCache) -> Tensor:
    """Index that maps MONAI v1 merged channels onto the lexicographic neighbour order."""
    key = (c, device)
    index = cache.merge_index.get(key)
    if index is None:
        lex = [i * 4 + j * 2 + k for i, j, k in _V1_ORDER]  # lex position of the v1 chunk p
        inverse = [lex.index(p) for p in range(8)]  # v1 chunk that holds lex chunk p
        index = (torch.tensor(inverse, device=device)[:, None] * c + torch.arange(c, device=device)).reshape(-1)
        cache.merge_index[key] = index
    return index


def merge_forward(merge: nn.Module, x: Tensor, cache: SwinCache) -> Tensor:
    """MONAI ``PatchMerging`` / ``PatchMergingV2`` on channels-last ``x`` with one gather."""
    b, d, h, w, c = x.shape
    if d % 2 or h % 2 or w % 2:
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        b, d, h, w, c = x.shape
    x = x.view(b, d // 2, 2, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
    x = x.reshape(b, d // 2, h // 2, w // 2, 8 * c)
    norm = cast(nn.LayerNorm, merge.norm)
    weight, bias, reduction = (
        cast(Tensor, norm.weight),
        cast(Tensor, norm.bias),
        cast(nn.Linear, merge.reduction).weight,
    )
    if type(merge) is PatchMerging:
        index = _merge_channel_index(c, x.device, cache)
        weight, bias, reduction = weight[index], bias[index], reduction[:, index]
    elif type(merge) is not PatchMergingV2:
        raise TypeError(f"fast Swin forward supports MONAI PatchMerging/PatchMergingV2, not {type(merge).__name__}")
    x = F.layer_norm(x, (8 * c,), weight, bias, norm.eps)
    return F.linear(x, reduction)


def stage_forward(layer: BasicLayer, x: Tensor, cache: SwinCache) -> Tensor:
    """MONAI ``BasicLayer.forward`` on channels-last ``x``; returns channels-last output."""
    b, d, h, w, c = x.shape
    window, shift = get_window_size((d, h, w), layer.window_size, layer.shift_size)
    padded = tuple(-(-s // window[i]) * window[i] for i, s in enumerate((d, h, w)))
    mask = cache.shift_mask(padded, window, shift, x.device) if any(s > 0 for s in shift) else None
    for block in layer.blocks:
        x = block_forward(cast(SwinTransformerBlock, block), x, mask, cache)
    if layer.downsample is not None:
        x = merge_forward(layer.downsample, x, cache)
    return x


def run_stage(layer: BasicLayer, x: Tensor, cache: SwinCache, use_checkpoint: bool) -> Tensor:
    """One stage, recomputed in backward (activation checkpointing) when ``use_checkpoint``."""
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(stage_forward, layer, x, cache, use_reentrant=False)
    return stage_forward(layer, x, cache)
