"""Lesion-wise detection metrics: did the model find each lesion, and how many of its lesions are real?

Dice per case hides a missed small lesion next to a well-segmented large one. Here each structure the task
declares a lesion (``FinetuneConfig.lesion_metrics``) is split into lesions, the connected components of
the truth and of the prediction (``scipy.ndimage.label``; 26-connected by default, as the BraTS 2023
lesion-wise metrics). True and predicted lesions are matched one to one, pairs of highest overlap first;
a pair counts as a detection when its overlap (IoU, or Dice) reaches ``threshold``, 0.1 IoU by default, the
lowest IoU at which nnDetection evaluates 3D detection (``nndet/evaluator/det.py``,
``DetectionEvaluator.create``; its ``MaskEvaluator`` compares masks by IoU as here). Then, per case:

- ``lesion_tp``: true lesions detected; ``lesion_fn``: true lesions missed; ``lesion_fp``: predicted
  lesions that match none;
- ``lesion_recall`` = TP / (TP + FN): NaN (``None`` in JSON) when the case has no true lesion;
- ``lesion_precision`` = TP / (TP + FP): NaN when the model predicts no lesion;
- ``lesion_f1`` = 2 TP / (2 TP + FP + FN): NaN only when there is neither a true nor a predicted lesion.

Undefined values are left out of every mean (the report's lesion table says how many cases each mean
covers), never counted as 0 or 1.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from medssl.config import LesionMetricsConfig
from medssl.data.regions import Regions, region_masks

LESION_FIELDS = ("lesion_tp", "lesion_fp", "lesion_fn", "lesion_recall", "lesion_precision", "lesion_f1")


def _as_numpy(volume: Tensor | np.ndarray) -> np.ndarray:
    return volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)


def _components(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    labelled, count = ndimage.label(mask, structure=structure)
    return labelled, int(count)


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def lesion_detection(
    prediction: Tensor | np.ndarray,
    truth: Tensor | np.ndarray,
    label: int,
    settings: LesionMetricsConfig | None = None,
) -> dict[str, Any]:
    """Counts and rates of lesion ``label`` in one case (see the module docstring); ``None`` for undefined."""
    return detect_lesions(_as_numpy(prediction) == label, _as_numpy(truth) == label, settings)


def detect_lesions(
    predicted: np.ndarray, true: np.ndarray, settings: LesionMetricsConfig | None = None
) -> dict[str, Any]:
    """Counts and rates of the lesions in two boolean masks (a label's voxels, or an nnU-Net region's)."""
    settings = settings or LesionMetricsConfig()
    true_lesions, n_true = _components(true, settings.connectivity)
    pred_lesions, n_pred = _components(predicted, settings.connectivity)
    tp = 0
    if n_true and n_pred:
        # voxel counts of every (true, predicted) pair at once; row/column 0 is the background
        joint = np.bincount(
            (true_lesions.astype(np.int64) * (n_pred + 1) + pred_lesions).ravel(), minlength=(n_true + 1) * (n_pred + 1)
        ).reshape(n_true + 1, n_pred + 1)
        inter = joint[1:, 1:].astype(np.float64)
        true_size = joint[1:, :].sum(axis=1, keepdims=True).astype(np.float64)
        pred_size = joint[:, 1:].sum(axis=0, keepdims=True).astype(np.float64)
        if settings.overlap == "iou":
            score = inter / (true_size + pred_size - inter)
        else:
            score = 2 * inter / (true_size + pred_size)
        pairs = np.argwhere(score >= settings.threshold)
        order = np.argsort(-score[pairs[:, 0], pairs[:, 1]], kind="stable")
        used_true, used_pred = set(), set()
        for i, j in pairs[order]:
            if i not in used_true and j not in used_pred:
                used_true.add(int(i))
                used_pred.add(int(j))
        tp = len(used_true)
    fn, fp = n_true - tp, n_pred - tp
    f1_den = 2 * tp + fp + fn
    return {
        "n_true_lesions": n_true,
        "n_pred_lesions": n_pred,
        "lesion_tp": tp,
        "lesion_fp": fp,
        "lesion_fn": fn,
        "lesion_recall": _ratio(tp, tp + fn),
        "lesion_precision": _ratio(tp, tp + fp),
        "lesion_f1": _ratio(2 * tp, f1_den),
    }


def lesion_rows(
    prediction: Tensor | np.ndarray,
    truth: Tensor | np.ndarray,
    structures: dict[int, str],
    settings: LesionMetricsConfig,
    case_id: str = "",
    regions: Regions | None = None,
) -> list[dict[str, Any]]:
    """One row per lesion structure for one case, lesion-free cases included (their FP count matters). With
    nnU-Net regions the structures are regions (1-based, as ``Regions.structures``), scored on region masks."""
    if not structures:
        return []
    pred, true = _as_numpy(prediction), _as_numpy(truth)
    if regions is not None:
        pred_masks, true_masks = np.asarray(region_masks(pred, regions)), np.asarray(region_masks(true, regions))
    rows = []
    for label, name in sorted(structures.items()):
        if regions is not None:
            found = detect_lesions(pred_masks[label - 1], true_masks[label - 1], settings)
        else:
            found = detect_lesions(pred == label, true == label, settings)
        rows.append({"case": case_id, "label": label, "structure": name, **found})
    return rows


def mean_defined(values: list[float | None]) -> tuple[float, int]:
    """Mean of the defined values (None and NaN left out) and how many there were (NaN, 0 when none)."""
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return (sum(kept) / len(kept) if kept else float("nan")), len(kept)
