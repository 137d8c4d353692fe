"""Per-case, per-structure Dice, HD95 and NSD (normalised surface Dice), in millimetres.

Conventions (the same for every method so the comparison is fair):
- a structure absent from the ground truth is not scored for that case;
- a structure present in the truth but not predicted gets Dice 0, NSD 0 and HD95 undefined (None);
- with nnU-Net regions (``regions``), the structures are the regions, scored on the region masks of
  the predicted and the true label maps (nnU-Net's ``region_or_label_to_mask``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice
from torch import Tensor

from medssl.data.regions import Regions, region_masks


def _one_hot(labels: Tensor, n_classes: int) -> Tensor:
    return torch.nn.functional.one_hot(labels.long(), n_classes).permute(3, 0, 1, 2).unsqueeze(0).float()


def _region_channels(labels: Tensor, regions: Regions) -> Tensor:
    """(1, 1 + R, X, Y, Z): channel r (1-based, as ``Regions.structures``) is region r's mask."""
    masks = region_masks(labels.long(), regions)
    outside = ~masks.any(dim=0, keepdim=True)
    return torch.cat([outside, masks]).unsqueeze(0).float()


def case_metrics(
    prediction: Tensor,
    truth: Tensor,
    structures: dict[int, str],
    spacing: Sequence[float],
    nsd_tolerance_mm: float = 2.0,
    case_id: str = "",
    regions: Regions | None = None,
) -> list[dict[str, Any]]:
    """One row per structure (or region) present in ``truth``: dice, hd95 (mm), nsd at the tolerance."""
    if regions is not None:
        pred_oh, true_oh = _region_channels(prediction, regions), _region_channels(truth, regions)
    else:
        n_classes = max(max(structures, default=0), int(truth.max()), int(prediction.max())) + 1
        pred_oh, true_oh = _one_hot(prediction, n_classes), _one_hot(truth, n_classes)
    n_classes = pred_oh.shape[1]
    dice = compute_dice(pred_oh, true_oh, include_background=True, ignore_empty=False)[0]
    spacing = [float(s) for s in spacing]
    rows = []
    present = [c for c in sorted(structures) if c > 0 and bool(true_oh[0, c].any())]
    predicted = {c for c in present if bool(pred_oh[0, c].any())}
    hd95 = nsd = None
    if predicted:
        # MONAI warns for every class missing from the prediction; those are handled below (None / 0).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            hd95 = compute_hausdorff_distance(
                pred_oh, true_oh, include_background=True, percentile=95, spacing=spacing
            )[0]
            nsd = compute_surface_dice(
                pred_oh,
                true_oh,
                class_thresholds=[nsd_tolerance_mm] * n_classes,
                include_background=True,
                spacing=spacing,
            )[0]
    for c in present:
        row: dict[str, Any] = {"case": case_id, "label": c, "structure": structures[c], "dice": float(dice[c])}
        if c in predicted:
            assert hd95 is not None and nsd is not None  # computed above whenever a structure is predicted
            h, n = float(hd95[c]), float(nsd[c])
            row["hd95"] = h if math.isfinite(h) else None
            row["nsd"] = n if math.isfinite(n) else None
        else:
            row["hd95"], row["nsd"] = None, 0.0
        rows.append(row)
    return rows


def mean_dice(
    prediction: Tensor, truth: Tensor, structures: dict[int, str], regions: Regions | None = None
) -> dict[str, float]:
    """Dice per structure (or region) present in the truth (fast: no surface distances), for validation."""
    if regions is not None:
        pred_masks, true_masks = region_masks(prediction.long(), regions), region_masks(truth.long(), regions)
    out = {}
    for c, name in structures.items():
        if c == 0:
            continue
        t = true_masks[c - 1] if regions is not None else truth == c
        if not bool(t.any()):
            continue
        p = pred_masks[c - 1] if regions is not None else prediction == c
        inter = float((p & t).sum())
        out[name] = 2.0 * inter / (float(p.sum()) + float(t.sum()))
    return out
