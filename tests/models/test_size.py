"""The declared network size is counted before allocation and bounded by limits.model_bytes."""

import pytest
import torch
from monai.networks.nets import SwinUNETR

from medssl.config import EncoderConfig
from medssl.errors import MedsslInputError
from medssl.limits import Limits, set_limits
from medssl.models import SwinEncoder, load_encoder
from medssl.models.checkpoint import encoder_meta
from medssl.models.size import encoder_bytes, segmenter_bytes


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@pytest.mark.parametrize(
    "fields",
    [{"preset": "tiny"}, {"preset": "tiny", "use_v2": True}, {"preset": "smit"}, {"preset": "tiny", "in_channels": 3}],
)
def test_counted_size_matches_the_built_networks(fields):
    config = EncoderConfig(**fields)
    assert encoder_bytes(config) == _bytes(SwinEncoder(config)) + (
        # v2's instance norms hold no tensors; the count reserves room for the largest norm
        encoder_bytes(config) - _bytes(SwinEncoder(config)) if config.use_v2 else 0
    )
    built = SwinUNETR(
        in_channels=config.in_channels,
        out_channels=5,
        feature_size=config.feature_size,
        depths=config.depths,
        num_heads=config.num_heads,
        window_size=config.window_size,
        use_v2=config.use_v2,
        norm_name="batch",  # the largest normalisation: the count is exact for it
    )
    assert segmenter_bytes(config, 5) == _bytes(built) + 4 * config.feature_size + (
        encoder_bytes(config) - _bytes(SwinEncoder(config))
    )


def test_v2_encoder_count_is_an_upper_bound_within_one_percent():
    config = EncoderConfig(preset="tiny", use_v2=True)
    built = _bytes(SwinEncoder(config))
    assert built <= encoder_bytes(config) <= 1.01 * built


@pytest.mark.parametrize(
    "declared",
    [
        {"preset": "tiny", "window_size": 40},  # 64000^2 int64 relative-position index per block: ~262 GB
        {"preset": "base", "feature_size": 1200},
        {"preset": "tiny", "depths": [2, 2, 20000, 2]},
    ],
)
def test_a_small_checkpoint_declaring_a_huge_encoder_exits_2_before_allocation(tmp_path, declared):
    """A ~100 kB file whose metadata declares a 27-262 GB encoder is refused in one line naming it."""
    meta = encoder_meta(method="simmim", family="mim", encoder=EncoderConfig(preset="tiny"))
    meta["encoder"] = {**meta["encoder"], **{k: v for k, v in declared.items() if k != "preset"}}
    meta["encoder"]["preset"] = declared["preset"]
    path = tmp_path / "huge.pt"
    torch.save({"encoder": {"patch_embed.proj.weight": torch.zeros(12, 1, 2, 2, 2)}, "meta": meta}, path)
    assert path.stat().st_size < 200_000
    with pytest.raises(
        MedsslInputError, match=r"huge\.pt: declared encoder size in bytes [\d,]+ exceeds .*limits\.model_bytes"
    ):
        load_encoder(path)


def test_a_foreign_file_whose_key_names_declare_thousands_of_blocks_is_refused(tmp_path):
    state = {k: v for k, v in SwinUNETR(in_channels=1, out_channels=2, feature_size=12).state_dict().items()}
    state["swinViT.layers3.0.blocks.30000.norm1.weight"] = torch.ones(48)
    torch.save(state, tmp_path / "blocks.pt")
    with pytest.raises(MedsslInputError, match=r"blocks\.pt: declared encoder size in bytes"):
        load_encoder(tmp_path / "blocks.pt")


def test_the_limit_can_be_raised():
    config = EncoderConfig(preset="smit")
    previous = set_limits(Limits(model_bytes=10_000_000))
    try:
        with pytest.raises(MedsslInputError, match="model_bytes"):
            SwinEncoder(config)
        set_limits(Limits(model_bytes=encoder_bytes(config)))
        SwinEncoder(config)
    finally:
        set_limits(previous)
