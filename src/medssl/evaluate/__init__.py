"""Segmentation metrics (Dice, HD95, NSD with voxel spacing) and sliding-window inference."""

from medssl.evaluate.inference import predict_volume
from medssl.evaluate.metrics import case_metrics, mean_dice

__all__ = ["case_metrics", "mean_dice", "predict_volume"]
