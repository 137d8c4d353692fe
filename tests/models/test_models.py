"""Encoder mask path, segmenter shapes, checkpoint round trip and MONAI interchange."""

import pytest
import torch
from monai.networks.nets import SwinUNETR

from medssl.config import EncoderConfig
from medssl.errors import MedsslInputError
from medssl.models import SwinEncoder, SwinSegmenter, load_encoder, save_encoder
from medssl.models.checkpoint import encoder_meta, load_encoder_state, safe_torch_load

TINY = EncoderConfig(preset="tiny", window_size=4)


def test_presets_fill_fields():
    smit = EncoderConfig(preset="smit")
    assert (smit.feature_size, smit.depths, smit.num_heads, smit.window_size) == (48, (2, 2, 8, 2), (4, 4, 8, 16), 4)
    assert EncoderConfig(preset="tiny").feature_size == 12
    assert EncoderConfig(preset="base", window_size=5).window_size == 5


def test_encoder_outputs_five_scales():
    enc = SwinEncoder(TINY).eval()
    outs = enc(torch.randn(2, 1, 32, 32, 32))
    assert [tuple(o.shape) for o in outs] == [
        (2, 12, 16, 16, 16),
        (2, 24, 8, 8, 8),
        (2, 48, 4, 4, 4),
        (2, 96, 2, 2, 2),
        (2, 192, 1, 1, 1),
    ]


def test_mask_token_replaces_masked_patches_and_keeps_shapes():
    torch.manual_seed(0)
    enc = SwinEncoder(TINY).eval()
    with torch.no_grad():
        enc.mask_token.fill_(3.25)
    x = torch.randn(2, 1, 32, 32, 32)
    mask = torch.zeros(2, 16, 16, 16, dtype=torch.bool)
    mask[0, :8] = True
    mask[1, :, :, 4:9] = True
    plain, masked = enc.embed(x), enc.embed(x, mask)
    assert masked.shape == plain.shape
    m = mask.unsqueeze(1).expand_as(masked)
    assert torch.all(masked[m] == 3.25)
    assert torch.equal(masked[~m], plain[~m])
    # the whole forward keeps its shapes and the mask changes the output
    a, b = enc(x), enc(x, mask=mask)
    assert [o.shape for o in a] == [o.shape for o in b]
    assert not torch.allclose(a[-1], b[-1])


def test_mask_of_wrong_grid_is_rejected():
    enc = SwinEncoder(TINY)
    with pytest.raises(ValueError, match="token grid"):
        enc.embed(torch.randn(1, 1, 32, 32, 32), torch.zeros(1, 8, 8, 8, dtype=torch.bool))


@pytest.mark.parametrize("size,norm_type", [(32, "GroupNorm"), (64, "InstanceNorm3d")])
def test_segmenter_shapes_and_norm(size, norm_type):
    seg = SwinSegmenter(TINY, out_channels=3, crop_size=size)
    y = seg(torch.randn(1, 1, size, size, size))
    assert y.shape == (1, 3, size, size, size)
    assert any(type(m).__name__ == norm_type for m in seg.modules())
    y.mean().backward()
    assert seg.swinViT.patch_embed.proj.weight.grad is not None


def test_segmenter_keys_match_monai_swinunetr():
    ours = set(SwinSegmenter(EncoderConfig(preset="tiny"), 4, crop_size=64).state_dict())
    ref = set(SwinUNETR(in_channels=1, out_channels=4, feature_size=12).state_dict())
    assert ours - ref == {"swinViT.mask_token"}
    assert ref - ours == set()


def _save(tmp_path, enc):
    meta = encoder_meta(
        method="simmim",
        family="mim",
        encoder=enc.config,
        preprocess={"spacing": [1.5] * 3},
        crop_size=32,
        steps=3,
        config_hash="abc",
    )
    path = tmp_path / "encoder.pt"
    save_encoder(path, enc, meta)
    return path


def test_checkpoint_round_trip_with_metadata(tmp_path):
    enc = SwinEncoder(TINY)
    path = _save(tmp_path, enc)
    loaded, meta = load_encoder(path)
    for k, v in enc.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    n = len(enc.state_dict())
    assert meta["load_report"] == f"loaded {n}/{n} encoder tensors"
    for key in (
        "method",
        "family",
        "preset",
        "encoder",
        "spacing",
        "intensity",
        "crop_size",
        "steps",
        "code_version",
        "config_hash",
    ):
        assert key in meta


def test_loading_fails_when_an_encoder_tensor_is_missing(tmp_path):
    enc = SwinEncoder(TINY)
    path = _save(tmp_path, enc)
    payload = safe_torch_load(path)
    del payload["encoder"]["layers2.0.blocks.0.attn.qkv.weight"]
    torch.save(payload, path)
    with pytest.raises(MedsslInputError, match="missing 1 encoder tensors: layers2.0.blocks.0.attn.qkv.weight"):
        load_encoder(path)
    seg = SwinSegmenter(TINY, 2, crop_size=32)
    with pytest.raises(MedsslInputError, match="missing"):
        load_encoder_state(seg, payload["encoder"], prefix="swinViT.")


def test_loading_rejects_pickles_and_garbage(tmp_path):
    bad = tmp_path / "evil.pt"
    torch.save({"encoder": {}, "meta": {"method": object}}, bad)  # needs full pickle to load
    with pytest.raises(MedsslInputError, match="evil.pt"):
        load_encoder(bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(MedsslInputError, match="not a readable checkpoint"):
        load_encoder(junk)


def test_swinunetr_v2_segmenter_interchanges_with_monai_both_ways():
    """encoder.use_v2: the segmenter is MONAI's SwinUNETR(use_v2=True) key for key; weights move both ways."""
    config = EncoderConfig(preset="tiny", window_size=4, use_v2=True)
    ours = SwinSegmenter(config, 3, crop_size=32)
    monai_net = SwinUNETR(
        in_channels=1,
        out_channels=3,
        feature_size=12,
        window_size=4,
        use_v2=True,
        norm_name=("group", {"num_groups": 12}),  # what the segmenter takes for 32^3 crops
    )
    ours_keys, ref_keys = set(ours.state_dict()), set(monai_net.state_dict())
    assert ours_keys - ref_keys == {"swinViT.mask_token"} and ref_keys - ours_keys == set()
    assert any(k.startswith("swinViT.layers4c.") for k in ref_keys)
    monai_net.load_state_dict({k: v for k, v in ours.state_dict().items() if k != "swinViT.mask_token"}, strict=True)
    back = SwinSegmenter(config, 3, crop_size=32)
    back.load_state_dict({**monai_net.state_dict(), "swinViT.mask_token": ours.swinViT.mask_token.detach()})
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x), monai_net.eval()(x), atol=1e-5)
        assert torch.allclose(back.eval()(x), monai_net(x), atol=1e-5)
