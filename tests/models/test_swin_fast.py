"""The fast Swin forward equals MONAI's ``SwinTransformer`` (outputs and every gradient) on the same weights."""

import pytest
import torch
from monai.networks.nets.swin_unetr import SwinTransformer

from medssl.config import EncoderConfig
from medssl.models import SwinEncoder

TOL = 1e-5


def _monai(config: EncoderConfig) -> SwinTransformer:
    return SwinTransformer(
        in_chans=config.in_channels,
        embed_dim=config.feature_size,
        window_size=(config.window_size,) * 3,
        patch_size=(config.patch_size,) * 3,
        depths=config.depths,
        num_heads=config.num_heads,
        drop_path_rate=config.drop_path_rate,
        spatial_dims=3,
        use_v2=config.use_v2,
    )


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference, relative to the reference's scale where that exceeds 1."""
    return float((a - b).abs().max() / max(1.0, float(a.abs().max())))


def _run(model, x, mask=None, normalize=True):
    x = x.clone().requires_grad_()
    outs = model(x, normalize, mask) if mask is not None else model(x, normalize)
    weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(outs)]
    sum((o * w).sum() for o, w in zip(outs, weights, strict=True)).backward()
    return [o.detach() for o in outs], x.grad


SMIT_LIKE = dict(feature_size=12, depths=(2, 2, 8, 2), num_heads=(4, 4, 8, 16))
V2 = dict(use_v2=True)  # SwinUNETR v2: a residual conv block before each stage, run channels-first


@pytest.mark.parametrize(
    "size,window,masked,shape",
    [
        (32, 7, False, {}),
        (32, 7, True, {}),
        (32, 4, False, SMIT_LIKE),
        (32, 4, True, SMIT_LIKE),
        (32, 4, True, V2),
        pytest.param(64, 7, True, {}, marks=pytest.mark.slow),
        pytest.param(64, 4, False, SMIT_LIKE, marks=pytest.mark.slow),
    ],
)
def test_fast_forward_equals_monai_outputs_and_gradients(size, window, masked, shape):
    torch.manual_seed(0)
    config = EncoderConfig(preset="tiny", window_size=window, **shape)
    ours = SwinEncoder(config)
    reference = _monai(config)
    reference.load_state_dict({k: v for k, v in ours.state_dict().items() if k != "mask_token"}, strict=True)
    x = torch.randn(1, 1, size, size, size)
    mask = None
    if masked:
        grid = ours.token_grid((size,) * 3)
        mask = torch.rand(1, *grid, generator=torch.Generator().manual_seed(1)) < 0.6
        # MONAI's module has no mask path: give it the same masked embedding through its patch_embed
        reference_embed = reference.patch_embed.forward

        def masked_embed(inp, _orig=reference_embed):
            x0 = _orig(inp)
            w = mask.unsqueeze(1).to(x0.dtype)
            return x0 * (1.0 - w) + ours.mask_token * w

        reference.patch_embed.forward = masked_embed  # type: ignore[method-assign]
    ref_outs, ref_xgrad = _run(reference, x)
    ref_grads = {n: p.grad.clone() for n, p in reference.named_parameters()}
    if masked:
        mask_token_grad = ours.mask_token.grad.clone()
        ours.mask_token.grad = None
    fast_outs, fast_xgrad = _run(ours, x, mask)
    assert [o.shape for o in fast_outs] == [o.shape for o in ref_outs]
    assert max(_close(a, b) for a, b in zip(ref_outs, fast_outs, strict=True)) < TOL
    assert _close(ref_xgrad, fast_xgrad) < TOL
    fast_grads = dict(ours.named_parameters())
    worst = max((_close(g, fast_grads[n].grad), n) for n, g in ref_grads.items())
    assert worst[0] < TOL, worst
    if masked:
        assert _close(mask_token_grad, ours.mask_token.grad) < TOL
        assert ours.mask_token.grad.abs().sum() > 0


def test_fast_inference_path_equals_monai_and_batches_agree():
    torch.manual_seed(0)
    config = EncoderConfig(preset="tiny", window_size=4)
    ours = SwinEncoder(config).eval()
    monai_impl = SwinEncoder(config.model_copy(update={"implementation": "monai"})).eval()
    monai_impl.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():  # no bias gradient needed: scaled_dot_product_attention's fused path
        for a, b in zip(monai_impl(x), ours(x), strict=True):
            assert _close(a, b) < TOL
        for a, b in zip(monai_impl(x, False), ours(x, False), strict=True):
            assert _close(a, b) < TOL


def test_state_dicts_load_both_ways_and_implementation_keeps_keys():
    config = EncoderConfig(preset="tiny")
    ours, monai_impl = SwinEncoder(config), SwinEncoder(config.model_copy(update={"implementation": "monai"}))
    assert list(ours.state_dict()) == list(monai_impl.state_dict())
    reference = _monai(config)
    state = {k: v for k, v in ours.state_dict().items() if k != "mask_token"}
    reference.load_state_dict(state, strict=True)
    back = dict(reference.state_dict(), mask_token=ours.mask_token.detach())
    SwinEncoder(config).load_state_dict(back, strict=True)


def test_checkpointed_stages_give_the_same_gradients():
    torch.manual_seed(0)
    config = EncoderConfig(preset="tiny", window_size=4)
    plain = SwinEncoder(config)
    checkpointed = SwinEncoder(config.model_copy(update={"use_checkpoint": True}))
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, 32, 32, 32)
    (_, grad_a), (_, grad_b) = _run(plain, x), _run(checkpointed, x)
    assert _close(grad_a, grad_b) < TOL
    grads_b = dict(checkpointed.named_parameters())
    for name, p in plain.named_parameters():
        if p.grad is not None:
            assert _close(p.grad, grads_b[name].grad) < TOL, name
