"""The frozen-encoder probe: a light voxel classifier on frozen multi-scale Swin features.

A probe asks what an encoder's features already hold, without fine-tuning it: every Swin output
(patch embedding and the four stages, layer-normalised as the segmenter takes them) is upsampled
trilinearly to voxel resolution and concatenated, so each voxel gets one feature vector from every
scale; a linear (or one-hidden-layer) head is then trained on the frozen features of a few labelled
cases and scored with Dice on test cases. A token-resolution linear probe (one 4 mm token per 2-32
voxels) cannot see organs of a few voxels; at voxel resolution the fine stages carry boundaries and
the coarse ones context, as a segmentation decoder would combine them.

Features come from sliding windows of the fine-tuning crop size (MONAI ``sliding_window_inference``,
Gaussian blending), so the encoder sees inputs of the size it was trained and fine-tuned on. The
head trains on a class-balanced sample of voxels of the training cases (``points_per_class`` per
class and case, so small structures count), and at prediction its logits are shifted by the log
ratio of the training cases' class frequencies to the sample's (logit adjustment, Menon et al. 2021,
"Long-tail learning via logit adjustment"), so a balanced sample does not over-predict rare classes.

The voxel-resolution features are never built whole: a training voxel's features are read from each
window's stage maps where it lies (``point_features``), and a linear head is applied to each stage map
before upsampling its logits (``ProbeHead.window_logits``), which is exact because trilinear upsampling
is linear. The pieces are pure functions of tensors (``point_features``, ``sample_points``, ``fit_head``,
``predict_case``, ``probe_cases``), used by the ``probe`` run kind (``medssl.analysis.probe_run``)
and by pretraining's online probe (``medssl.train.pretrain``).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map
from monai.inferers import sliding_window_inference
from monai.networks import eval_mode
from torch import Tensor, nn

from medssl.config import OnlineProbeConfig, PreprocessConfig, ProbeConfig
from medssl.data.cache import VolumeCache, cache_task
from medssl.data.datasets import load_eval_case
from medssl.data.tasks import load_task
from medssl.errors import MedsslInputError
from medssl.evaluate.metrics import mean_dice
from medssl.models.encoder import SwinEncoder


def feature_channels(encoder: SwinEncoder, stages: Sequence[int]) -> int:
    """Channels of the concatenated features of ``stages`` (0: patch embedding, 1-4: Swin stages)."""
    return sum(encoder.stage_channels[s] for s in stages)


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start of every window along an axis of ``size`` voxels (``size >= roi``), as MONAI's sliding
    windows: a stride of ``roi * (1 - overlap)`` and a last window flush with the end."""
    stride = max(int(roi * (1.0 - overlap)), 1)
    starts = list(range(0, size - roi + 1, stride))
    if starts[-1] != size - roi:
        starts.append(size - roi)
    return starts


def _pad_to(image: Tensor, roi: int) -> Tensor:
    """Pad a ``(C, X, Y, Z)`` image at the far end of each axis shorter than ``roi`` (with its minimum)."""
    pads = [max(roi - s, 0) for s in image.shape[1:]]
    if not any(pads):
        return image
    return F.pad(image, (0, pads[2], 0, pads[1], 0, pads[0]), value=float(image.min()))


def _sample_map(feature_map: Tensor, local: Tensor, roi: int) -> Tensor:
    """Trilinear values ``(n, C)`` of a ``(C, d, h, w)`` map covering a window of ``roi``^3 voxels at the
    window's voxels ``local`` ``(n, 3)``: the values ``F.interpolate(..., size=roi, mode="trilinear",
    align_corners=False)`` would give there, without building the upsampled map."""
    grid = (2.0 * (local.to(feature_map.dtype) + 0.5) / roi - 1.0).flip(-1)  # grid_sample wants (x=W, y=H, z=D)
    values = F.grid_sample(
        feature_map[None], grid.view(1, -1, 1, 1, 3), mode="bilinear", padding_mode="border", align_corners=False
    )
    return values[0, :, :, 0, 0].T


@torch.no_grad()
def point_features(
    encoder: SwinEncoder,
    image: Tensor,
    points: Tensor,
    stages: Sequence[int],
    crop_size: int,
    overlap: float = 0.25,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Frozen features ``(N, C)`` of a case at voxels ``points`` ``(N, 3)``.

    Each window of ``crop_size``^3 (MONAI's sliding-window layout) goes through the encoder; its outputs
    ``stages``, upsampled trilinearly to the window's voxels and concatenated, are read at the points the
    window holds, and windows are blended with MONAI's Gaussian importance weights, exactly as
    ``sliding_window_inference(mode="gaussian")`` of the upsampled features would give them."""
    with eval_mode(encoder):
        padded = _pad_to(image, crop_size).to(device)
        weights = compute_importance_map((crop_size,) * 3, mode="gaussian", device=device)
        total = torch.zeros(len(points), feature_channels(encoder, stages), device=device)
        norm = torch.zeros(len(points), device=device)
        points = points.to(device)
        axes = [window_starts(s, crop_size, overlap) for s in padded.shape[1:]]
        for start in (torch.tensor(s, device=device) for s in itertools.product(*axes)):
            inside = ((points >= start) & (points < start + crop_size)).all(dim=1)
            if not bool(inside.any()):
                continue
            local = points[inside] - start
            x, y, z = (int(v) for v in start)
            outputs = encoder(padded[None, :, x : x + crop_size, y : y + crop_size, z : z + crop_size])
            features = torch.cat([_sample_map(outputs[s][0], local, crop_size) for s in stages], dim=1)
            weight = weights[local[:, 0], local[:, 1], local[:, 2]]
            total[inside] += weight[:, None] * features.float()
            norm[inside] += weight
    return (total / norm[:, None]).cpu()


def sample_points(label: Tensor, per_class: int, rng: np.random.Generator) -> Tensor:
    """Flat voxel indices of a class-balanced sample of a ``(X, Y, Z)`` label map: up to ``per_class``
    voxels of each class present (all of a class when it has fewer), drawn without replacement."""
    flat = label.reshape(-1).numpy()
    chosen = []
    for cls in np.unique(flat):
        where = np.flatnonzero(flat == cls)
        take = min(per_class, len(where))
        chosen.append(rng.choice(where, size=take, replace=False))
    return torch.from_numpy(np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64))


class ProbeHead(nn.Module):
    """Standardisation (fixed, from the training sample), then a linear map or a one-hidden-layer MLP,
    plus a fixed logit offset (the logit adjustment)."""

    mean: Tensor  # buffers (register_buffer)
    std: Tensor
    offset: Tensor

    def __init__(self, in_channels: int, n_classes: int, hidden: int = 0) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_channels))
        self.register_buffer("std", torch.ones(in_channels))
        self.register_buffer("offset", torch.zeros(n_classes))
        if hidden > 0:
            self.net: nn.Module = nn.Sequential(nn.Linear(in_channels, hidden), nn.GELU(), nn.Linear(hidden, n_classes))
        else:
            self.net = nn.Linear(in_channels, n_classes)

    def forward(self, features: Tensor) -> Tensor:
        """Logits ``(N, n_classes)`` of features ``(N, C)``, before the logit adjustment."""
        return self.net((features - self.mean) / self.std)

    def window_logits(self, maps: Sequence[Tensor], size: Sequence[int]) -> Tensor:
        """Logits ``(B, n_classes, *size)`` of a window from its stage maps ``(B, C_s, d, h, w)`` at their own
        resolution, as ``forward`` of their concatenated trilinear upsampling to ``size`` would give them.
        For a linear head the map is applied per stage before upsampling (upsampling is linear, so this is
        exact and never builds the voxel-resolution features); an MLP head gets the upsampled features."""
        linear = self.net
        if isinstance(linear, nn.Linear):
            weight = linear.weight / self.std  # standardisation folded into the map
            bias = linear.bias - weight @ self.mean
            logits, first = None, 0
            for stage_map in maps:
                channels = stage_map.shape[1]
                part = F.conv3d(stage_map, weight[:, first : first + channels, None, None, None])
                part = F.interpolate(part, size=tuple(size), mode="trilinear", align_corners=False)
                logits = part if logits is None else logits + part
                first += channels
            assert logits is not None  # at least one stage (ProbeConfig.stages)
            return logits + bias[None, :, None, None, None]
        full = torch.cat([F.interpolate(m, size=tuple(size), mode="trilinear", align_corners=False) for m in maps], 1)
        return self(full.movedim(1, -1)).movedim(-1, 1)


def fit_head(
    features: Tensor,
    labels: Tensor,
    n_classes: int,
    config: ProbeConfig,
    seed: int,
    class_prior: Tensor | None = None,
) -> tuple[ProbeHead, list[float]]:
    """Train a head on ``features`` ``(N, C)`` and ``labels`` ``(N,)`` with cross-entropy (AdamW,
    cosine decay, minibatches of ``config.batch_points``); returns the head and the loss every
    tenth step. ``class_prior`` (the true class frequencies) sets the logit adjustment."""
    generator = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))
    head = ProbeHead(features.shape[1], n_classes, config.hidden)
    head.mean.copy_(features.mean(dim=0))
    head.std.copy_(features.std(dim=0).clamp_min(1e-4))
    if class_prior is not None:
        sampled = torch.bincount(labels, minlength=n_classes).double() / max(len(labels), 1)
        ratio = class_prior.double().clamp_min(1e-8) / sampled.clamp_min(1e-8)
        head.offset.copy_(torch.where(sampled > 0, ratio.log(), torch.zeros_like(ratio)).float())
    standardised = (features - head.mean) / head.std  # once; the head standardises at prediction
    optimiser = torch.optim.AdamW(head.net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(config.steps, 1))
    losses: list[float] = []
    n = len(labels)
    for step in range(config.steps):
        index = (
            torch.randint(n, (min(config.batch_points, n),), generator=generator) if n > config.batch_points else None
        )
        x, y = (standardised, labels) if index is None else (standardised[index], labels[index])
        loss = F.cross_entropy(head.net(x), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 10 == 0 or step == config.steps - 1:
            losses.append(float(loss.detach()))
    head.eval()
    return head, losses


@torch.no_grad()
def predict_labels(head: ProbeHead, features: Tensor, chunk: int = 65536) -> Tensor:
    """The labels ``(N,)`` of point features ``(N, C)``: the adjusted logits' argmax."""
    return torch.cat([(head(block) + head.offset).argmax(dim=1) for block in features.split(chunk)])


@torch.no_grad()
def predict_case(
    encoder: SwinEncoder,
    head: ProbeHead,
    image: Tensor,
    stages: Sequence[int],
    crop_size: int,
    overlap: float = 0.25,
    device: torch.device | str = "cpu",
) -> Tensor:
    """The probe's label map ``(X, Y, Z)`` of a ``(1, X, Y, Z)`` image: sliding windows of the crop size,
    each window's head logits (``ProbeHead.window_logits``), Gaussian blending, the adjusted argmax."""

    def predictor(window: Tensor) -> Tensor:
        outputs = encoder(window)
        return head.window_logits([outputs[s] for s in stages], window.shape[2:])

    with eval_mode(encoder):
        logits = sliding_window_inference(
            image.unsqueeze(0).to(device),
            roi_size=(crop_size,) * 3,
            sw_batch_size=2,
            predictor=predictor,
            overlap=overlap,
            mode="gaussian",
        )
    assert isinstance(logits, Tensor)  # one tensor out of one tensor in
    return (logits[0] + head.offset.to(logits.device)[:, None, None, None]).argmax(dim=0).cpu()


@dataclass
class ProbeOutcome:
    """A probe's per-case rows (``case``, ``label``, ``structure``, ``dice``), its head's losses and sizes."""

    rows: list[dict[str, Any]]
    losses: list[float]
    n_points: int
    n_channels: int

    @property
    def mean_dice(self) -> float:
        """Mean over cases of each case's mean Dice over its structures (NaN without rows)."""
        per_case: dict[str, list[float]] = {}
        for row in self.rows:
            per_case.setdefault(row["case"], []).append(row["dice"])
        return float(np.mean([np.mean(v) for v in per_case.values()])) if per_case else math.nan


def probe_cases(
    encoder: SwinEncoder,
    train_cases: Sequence[dict[str, Any]],
    test_cases: Sequence[dict[str, Any]],
    structures: dict[int, str],
    config: ProbeConfig,
    crop_size: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> ProbeOutcome:
    """Train a probe head on the frozen features of ``train_cases`` and score it on ``test_cases``.

    Cases are ``load_eval_case`` dicts (``image`` ``(C, X, Y, Z)``, ``label`` ``(1, X, Y, Z)``,
    ``case_id``). The training cases' features are computed once and only their sampled voxels are
    kept; each test case's features are computed, predicted and dropped."""
    n_classes = max(structures, default=0) + 1
    rng = np.random.default_rng(int(seed))
    head_device = torch.device(device)
    xs, ys = [], []
    counts = torch.zeros(n_classes, dtype=torch.float64)
    for case in train_cases:
        label = case["label"][0]
        counts += torch.bincount(label.reshape(-1), minlength=n_classes)[:n_classes].double()
        flat = sample_points(label, config.points_per_class, rng)
        points = torch.from_numpy(np.stack(np.unravel_index(flat.numpy(), tuple(label.shape)), axis=1))
        xs.append(point_features(encoder, case["image"], points, config.stages, crop_size, config.overlap, device))
        ys.append(label.reshape(-1)[flat])
    features_train, labels_train = torch.cat(xs), torch.cat(ys).long()
    prior = counts / counts.sum() if config.logit_adjust else None
    head, losses = fit_head(features_train, labels_train, n_classes, config, seed, prior)
    head.to(head_device)
    rows: list[dict[str, Any]] = []
    for case in test_cases:
        prediction = predict_case(encoder, head, case["image"], config.stages, crop_size, config.overlap, device)
        for name, dice in mean_dice(prediction, case["label"][0], structures).items():
            label_value = next(k for k, v in structures.items() if v == name)
            rows.append({"case": case["case_id"], "label": label_value, "structure": name, "dice": dice})
    return ProbeOutcome(rows, losses, n_points=len(labels_train), n_channels=features_train.shape[1])


@dataclass
class ProbeSet:
    """The held-out labelled cases of an online probe, loaded once for a whole pretraining run."""

    train: list[dict[str, Any]]
    test: list[dict[str, Any]]
    structures: dict[int, str]
    task: str


def load_probe_set(config: OnlineProbeConfig, preprocess: PreprocessConfig, default_cache: Path) -> ProbeSet:
    """The first ``n_train`` cases of ``config.task`` (case-id order) train the head, the next ``n_test`` score it."""
    if config.task is None:
        raise MedsslInputError("probe.task", "the online probe needs a labelled task folder")
    task = load_task(config.task)
    need = config.n_train + config.n_test
    if len(task.cases) < need:
        raise MedsslInputError(
            task.root, f"{len(task.cases)} cases; the online probe needs probe.n_train + probe.n_test = {need}"
        )
    volumes = cache_task(task, VolumeCache(config.cache_dir or default_cache), preprocess)
    ids = sorted(volumes)[:need]
    cases = [load_eval_case(volumes[c]) for c in ids]
    return ProbeSet(cases[: config.n_train], cases[config.n_train :], task.structures, task.name)


def online_probe(
    encoder: SwinEncoder,
    probe_set: ProbeSet,
    config: ProbeConfig,
    crop_size: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """One online probe of the current encoder: the ``probe`` record of a pretraining metrics line
    (``dice``: mean test Dice, ``per_structure``, ``seconds``)."""
    start = time.perf_counter()
    outcome = probe_cases(
        encoder, probe_set.train, probe_set.test, probe_set.structures, config, crop_size, seed, device
    )
    per_structure: dict[str, list[float]] = {}
    for row in outcome.rows:
        per_structure.setdefault(row["structure"], []).append(row["dice"])
    return {
        "dice": outcome.mean_dice,
        "per_structure": {k: float(np.mean(v)) for k, v in per_structure.items()},
        "seconds": time.perf_counter() - start,
    }
