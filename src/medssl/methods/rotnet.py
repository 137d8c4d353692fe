"""RotNet (Gidaris et al. 2018) in 3D: predict which 90-degree rotation a crop went through.

One intensity-augmented crop rotated by k * 90 degrees about one axis: 4 classes about the last
spatial axis (``axes: 1``), or the identity plus 90/180/270 degrees about each of the three axes
(``axes: 3``, 10 distinct classes). A linear classifier on the pooled bottleneck; cross-entropy.
No flips: two flips compose to a 180-degree rotation and would make the label ambiguous.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from medssl.config import StrictModel
from medssl.data.views import intensity_augment, random_rotation_label, rotate90_view, rotation_classes
from medssl.methods.base import SSLMethod, embedding_std, register
from medssl.methods.losses import rotation_ce
from medssl.methods.simclr import IntensityAugmentParams, freeze_mask_token
from medssl.models.encoder import SwinEncoder, global_pool


class RotNetParams(StrictModel):
    axes: Literal[1, 3] = Field(1, description="rotate about 1 axis (4 classes) or any of 3 (10 classes)")
    augment: IntensityAugmentParams = Field(default_factory=IntensityAugmentParams)


@register
class RotNet(SSLMethod):
    name = "rotnet"
    family = "rotation"
    description = "RotNet: classify the k*90-degree rotation of a crop (4-way, or 10-way over 3 axes)."
    Params = RotNetParams

    def __init__(self, encoder: SwinEncoder, params: RotNetParams, crop_size: int, total_steps: int) -> None:
        super().__init__(encoder, params, crop_size, total_steps)
        freeze_mask_token(encoder)
        self.n_classes = rotation_classes(params.axes)
        self.head = nn.Linear(encoder.out_channels, self.n_classes)

    def make_views(self, region: Tensor, rng: np.random.Generator) -> dict[str, Tensor]:
        image = intensity_augment(region, rng, **self.params.augment.model_dump())
        label, k, axis = random_rotation_label(rng, self.params.axes)
        return {"image": rotate90_view(image, k, axis), "rotation": torch.tensor(label, dtype=torch.long)}

    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        pooled = global_pool(self.encoder(batch["image"])[-1])
        logits = self.head(pooled)
        labels = batch["rotation"].long()
        loss = rotation_ce(logits, labels)
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
        return {
            "loss": loss,
            "rotation_ce": loss.detach(),
            "rotation_accuracy": accuracy,
            "embedding_std": embedding_std(pooled),
        }
