"""Segmentation metrics (Dice, HD95, NSD with voxel spacing), lesion-wise detection metrics and
sliding-window inference."""

from medssl.evaluate.inference import predict_volume
from medssl.evaluate.lesions import LESION_FIELDS, lesion_detection, lesion_rows
from medssl.evaluate.metrics import case_metrics, mean_dice

__all__ = ["LESION_FIELDS", "case_metrics", "lesion_detection", "lesion_rows", "mean_dice", "predict_volume"]
