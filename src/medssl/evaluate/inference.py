"""Whole-volume prediction with MONAI's sliding-window inference."""

from __future__ import annotations

import torch
from monai.inferers import sliding_window_inference
from torch import Tensor, nn


@torch.no_grad()
def predict_volume(
    model: nn.Module,
    image: Tensor,
    roi_size: int,
    sw_batch_size: int = 2,
    overlap: float = 0.5,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Label map (X, Y, Z) int64 for a (C, X, Y, Z) image; Gaussian-blended windows."""
    was_training = model.training
    model.eval()
    x = image.unsqueeze(0).to(device)
    logits = sliding_window_inference(
        x,
        roi_size=(roi_size,) * 3,
        sw_batch_size=sw_batch_size,
        predictor=model,
        overlap=overlap,
        mode="gaussian",
    )
    if was_training:
        model.train()
    assert isinstance(logits, Tensor)  # a network with one output gives one tensor
    return logits.argmax(dim=1)[0].cpu()
