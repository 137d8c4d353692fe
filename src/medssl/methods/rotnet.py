"""RotNet (Gidaris, Singh & Komodakis 2018) in 3D: predict which 90-degree rotation a crop went through.

Reference: gidariss/FeatureLearningRotNet ``dataloader.py`` (``DataLoader.get_iterator``,
``_load_function``: each image is augmented once, then presented in all four rotations 0/90/180/270
in the same batch, labels 0-3) and ``algorithms/ClassificationModel.py`` (cross-entropy).
``all_rotations: true`` (the default) does the same: a sample contributes every rotation class, so a
step of B samples classifies ``B * n_classes`` crops; ``false`` draws one rotation per sample.
3D departures (config fields): the 2D image plane becomes the axial (X, Y) plane, turned about the
last spatial axis (``rotation_axis: 2``, 4 classes), or any of the three axes (``axes: 3``: identity
plus 90/180/270 degrees about each axis, 10 distinct classes, as Taleb et al. 2020); grey-level
augmentation instead of crops and flips. No flips: two flips compose to a 180-degree rotation and
would make the label ambiguous. A linear classifier on the pooled bottleneck.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from medssl.config import StrictModel
from medssl.data.views import (
    DEFAULT_ROTATION_AXIS,
    intensity_augment,
    random_rotation_label,
    rotate90_view,
    rotation_classes,
    rotation_from_label,
)
from medssl.methods.base import UnmaskedMethod, register
from medssl.methods.losses import rotation_ce
from medssl.methods.two_crop import IntensityAugmentParams
from medssl.models.encoder import global_pool


class RotNetParams(StrictModel):
    axes: Literal[1, 3] = Field(1, description="rotate about 1 axis (4 classes) or any of 3 (10 classes)")
    rotation_axis: Literal[0, 1, 2] = Field(
        DEFAULT_ROTATION_AXIS, description="spatial axis turned about when axes is 1 (2: the axial plane)"
    )
    all_rotations: bool = Field(True, description="present every rotation of a sample in its batch (RotNet's)")
    augment: IntensityAugmentParams = Field(default_factory=IntensityAugmentParams)


@register
class RotNet(UnmaskedMethod):
    name = "rotnet"
    family = "rotation"
    description = "RotNet: classify the k*90-degree rotation of a crop (4-way, or 10-way over 3 axes)."
    Params = RotNetParams
    params: RotNetParams

    def make_views(self, region: Tensor, rng: np.random.Generator) -> dict[str, Tensor]:
        """``image`` (R, C, X, Y, Z) and ``rotation`` (R,): all R = n_classes rotations, or one drawn."""
        p = self.params
        image = intensity_augment(region, rng, **p.augment.model_dump())
        if p.all_rotations:
            labels = list(range(self.n_classes))
        else:
            labels = [random_rotation_label(rng, p.axes, p.rotation_axis)[0]]
        rotated = [rotate90_view(image, *rotation_from_label(label, p.axes, p.rotation_axis)) for label in labels]
        return {"image": torch.stack(rotated), "rotation": torch.tensor(labels, dtype=torch.long)}

    def build_heads(self) -> None:
        self.n_classes = rotation_classes(self.params.axes)
        self.head = nn.Linear(self.encoder.out_channels, self.n_classes)

    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        images = batch["image"].flatten(0, 1)  # (B, R, C, ...) -> (B * R, C, ...)
        labels = batch["rotation"].flatten().long()
        pooled = global_pool(self.encoder(images)[-1])
        logits = self.head(pooled)
        loss = rotation_ce(logits, labels)
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
        return self.outputs(loss, embedding=logits, features=pooled, rotation_ce=loss, rotation_accuracy=accuracy)
