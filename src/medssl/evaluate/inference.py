"""Whole-volume prediction with MONAI's sliding-window inference."""

from __future__ import annotations

import torch
from monai.inferers import sliding_window_inference
from monai.networks import eval_mode
from torch import Tensor, nn

from medssl.data.regions import Regions, label_map_from_regions


@torch.no_grad()
def predict_volume(
    model: nn.Module,
    image: Tensor,
    roi_size: int,
    sw_batch_size: int = 2,
    overlap: float = 0.5,
    device: torch.device | str = "cpu",
    regions: Regions | None = None,
) -> Tensor:
    """Label map (X, Y, Z) int64 for a (C, X, Y, Z) image; Gaussian-blended windows. A region-trained
    model's outputs are sigmoids painted into a label map in ``regions_class_order`` (nnU-Net's rule)."""
    with eval_mode(model):
        logits = sliding_window_inference(
            image.unsqueeze(0).to(device),
            roi_size=(roi_size,) * 3,
            sw_batch_size=sw_batch_size,
            predictor=model,
            overlap=overlap,
            mode="gaussian",
        )
    if regions is not None:
        return label_map_from_regions(torch.sigmoid(logits[0]), regions).cpu()
    assert isinstance(logits, Tensor)  # a network with one output gives one tensor
    return logits.argmax(dim=1)[0].cpu()
