"""The frozen-encoder probe: voxel sampling, head, logit adjustment, multi-scale features, and the whole
probe telling an encoder whose features hold the labels from one whose features are noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from medssl.config import EncoderConfig, ProbeConfig
from medssl.evaluate.probe import (
    ProbeHead,
    feature_channels,
    fit_head,
    point_features,
    predict_labels,
    probe_cases,
    sample_points,
    window_starts,
)
from medssl.models.encoder import SwinEncoder

TINY = EncoderConfig(preset="tiny", window_size=4)
FAST = ProbeConfig(steps=300, points_per_class=300, lr=2e-2)


def test_sample_points_is_class_balanced_and_capped() -> None:
    label = torch.zeros(10, 10, 10, dtype=torch.int64)
    label[:2] = 1  # 200 voxels
    label[0, 0, :3] = 2  # 3 voxels
    points = sample_points(label, per_class=50, rng=np.random.default_rng(0))
    counts = torch.bincount(label.reshape(-1)[points], minlength=3).tolist()
    assert counts == [50, 50, 3]  # every class up to the cap, a rare one whole
    assert len(set(points.tolist())) == len(points)  # without replacement


def test_linear_head_learns_separable_features_and_logit_adjustment_restores_the_prior() -> None:
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (3000,))
    features = torch.randn(3000, 8) * 0.3
    features[torch.arange(3000), labels] += 2.0  # class c lifts channel c
    head, losses = fit_head(features, labels, 3, FAST, seed=0)
    assert losses[-1] < losses[0] / 3
    assert (predict_labels(head, features) == labels).float().mean() > 0.97

    # Uninformative features, balanced sample, true prior 90% background: adjusted, it predicts background
    noise, balanced = torch.randn(3000, 8), torch.arange(3000) % 2
    head, _ = fit_head(noise, balanced, 2, FAST, seed=0, class_prior=torch.tensor([0.9, 0.1]))
    assert head.offset[0] - head.offset[1] == pytest.approx(float(np.log(9.0)), rel=1e-4)
    assert (predict_labels(head, noise) == 0).float().mean() > 0.9


def test_window_starts_cover_the_axis_like_monai() -> None:
    assert window_starts(48, 32, 0.25) == [0, 16]
    assert window_starts(32, 32, 0.5) == [0]
    assert window_starts(70, 32, 0.5) == [0, 16, 32, 38]


def _upsampled(encoder: SwinEncoder, stages: tuple[int, ...]):
    def predictor(window: torch.Tensor) -> torch.Tensor:
        outputs = encoder(window)
        size = window.shape[2:]
        return torch.cat(
            [F.interpolate(outputs[s], size=size, mode="trilinear", align_corners=False) for s in stages], 1
        )

    return predictor


def test_point_features_and_window_logits_equal_the_upsampled_sliding_window_features() -> None:
    """Reading the stage maps at points, and a linear head applied per stage before upsampling, give what
    MONAI's Gaussian sliding window over the concatenated voxel-resolution features gives."""
    torch.manual_seed(0)
    encoder = SwinEncoder(TINY).eval()
    image = torch.rand(1, 40, 36, 33)  # not a multiple of the crop: windows overlap
    stages = (0, 2, 4)
    with torch.no_grad():
        full = sliding_window_inference(image[None], (32,) * 3, 2, _upsampled(encoder, stages), 0.25, mode="gaussian")[
            0
        ]
    assert full.shape == (feature_channels(encoder, stages), 40, 36, 33) == (12 + 48 + 192, 40, 36, 33)
    points = torch.stack([torch.randint(0, n, (50,)) for n in (40, 36, 33)], dim=1)
    mine = point_features(encoder, image, points, stages, crop_size=32)
    torch.testing.assert_close(mine, full[:, points[:, 0], points[:, 1], points[:, 2]].T, atol=1e-4, rtol=1e-4)

    head = ProbeHead(full.shape[0], 4)
    head.mean.normal_()
    head.std.uniform_(0.5, 2.0)
    window = image[None, :, :32, :32, :32]
    with torch.no_grad():
        outputs = encoder(window)
        exact = head(_upsampled(encoder, stages)(window)[0].movedim(0, -1)).movedim(-1, 0)
        fast = head.window_logits([outputs[s] for s in stages], (32, 32, 32))[0]
    torch.testing.assert_close(fast, exact, atol=1e-4, rtol=1e-4)


class LabelEncoder(SwinEncoder):
    """A stand-in for a supervised encoder: every output is a fixed random scaling per channel of the
    input average-pooled to the output's stride, so the features hold the (noisy) label the toy image
    encodes; with ``noise`` the pooled input is replaced by noise, independent of the image."""

    def __init__(self, config: EncoderConfig, noise: bool) -> None:
        super().__init__(config)
        self.noise = noise
        self.scales = [torch.randn(1, c, 1, 1, 1) for c in self.stage_channels]

    def forward(self, x: torch.Tensor, normalize: bool = True, mask: torch.Tensor | None = None) -> list[torch.Tensor]:  # type: ignore[override]
        outs = []
        for index, scale in enumerate(self.scales):
            pooled = F.avg_pool3d(x, self.stage_stride(index))
            outs.append((torch.randn_like(pooled) if self.noise else pooled) * scale)
        return outs


def _toy_case(seed: int, case_id: str) -> dict:
    """A 32^3 case: a box of class 1 and a box of class 2, the image their label plus noise."""
    rng = np.random.default_rng(seed)
    label = np.zeros((32, 32, 32), dtype=np.int64)
    a, b = rng.integers(2, 12, 3), rng.integers(18, 24, 3)
    label[a[0] : a[0] + 10, a[1] : a[1] + 10, a[2] : a[2] + 10] = 1
    label[b[0] : b[0] + 8, b[1] : b[1] + 8, b[2] : b[2] + 8] = 2
    image = label.astype(np.float32) + rng.normal(0, 0.2, label.shape).astype(np.float32)
    return {
        "image": torch.from_numpy(image)[None],
        "label": torch.from_numpy(label)[None],
        "case_id": case_id,
    }


def test_probe_tells_an_informative_encoder_from_a_noise_encoder() -> None:
    """The whole probe (windows, upsampling, sampling, head, adjustment, Dice) on a toy task: features
    that hold the labels score high, features of noise score low."""
    train = [_toy_case(0, "a"), _toy_case(1, "b")]
    test = [_toy_case(2, "c"), _toy_case(3, "d")]
    structures = {1: "big", 2: "small"}
    scores = {}
    for noise in (False, True):
        torch.manual_seed(0)
        outcome = probe_cases(LabelEncoder(TINY, noise), train, test, structures, FAST, crop_size=32, seed=0)
        assert {r["case"] for r in outcome.rows} == {"c", "d"} and {r["structure"] for r in outcome.rows} == {
            "big",
            "small",
        }
        scores[noise] = outcome.mean_dice
    assert scores[False] > 0.6 and scores[True] < 0.2, scores


def test_head_has_no_hidden_layer_unless_asked() -> None:
    assert isinstance(ProbeHead(10, 3).net, torch.nn.Linear)
    assert len(list(ProbeHead(10, 3, hidden=16).net)) == 3
