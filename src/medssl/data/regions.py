"""Region-based labels as nnU-Net v2 declares them: overlapping structures, each a union of label values.

A task's ``dataset.json`` may declare regions instead of classes, as nnU-Net's BraTS and KiTS
conversions do (``Dataset137_BraTS21.py``, ``Dataset220_KiTS2023.py``)::

    "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]},
    "regions_class_order": [1, 2, 3]

The label maps on disk stay plain (values 1, 2, 3); the network has one output per region, trained
with a sigmoid each against the region's mask (``region_targets``), as nnU-Net's
``LabelManager``/``DC_and_BCE_loss``. A prediction becomes a label map again by painting each region
whose probability exceeds 0.5 with its ``regions_class_order`` value, in order
(``label_map_from_regions``, nnU-Net's ``convert_probabilities_to_segmentation``), and Dice is scored
per region on the region masks of the predicted and the true label maps (nnU-Net's
``region_or_label_to_mask`` in its evaluation).

As in nnU-Net's ``LabelManager``, a task has regions when some label value is a list of more than one
value; then ``regions_class_order`` must give one value per region, and here each value must lie in its
own region (so painting a region's mask and reading it back agree).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class Regions:
    """Region names, the label values each region unites, and the value each region paints."""

    names: tuple[str, ...]
    labels: tuple[tuple[int, ...], ...]
    class_order: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.names)

    @property
    def structures(self) -> dict[int, str]:
        """Output channel ``i`` (1-based, as label structures) → region name."""
        return {i + 1: name for i, name in enumerate(self.names)}

    @property
    def values(self) -> list[int]:
        """Every label value the regions use (background excluded), sorted."""
        return sorted({v for region in self.labels for v in region})

    def value_names(self) -> dict[int, str]:
        """A name for each label value: the region that paints it, else the smallest region holding it."""
        painted = dict(zip(self.class_order, self.names, strict=True))
        names = {}
        for value in self.values:
            holding = [i for i, region in enumerate(self.labels) if value in region]
            names[value] = painted.get(value) or self.names[min(holding, key=lambda i: len(self.labels[i]))]
        return names

    def dataset_labels(self) -> dict[str, Any]:
        """The ``labels`` entry of a dataset.json: background 0, then each region's values."""
        return {"background": 0, **{name: list(region) for name, region in zip(self.names, self.labels, strict=True)}}

    def to_json(self) -> dict[str, Any]:
        """For run metadata and results: the regions and their painting order."""
        return {"labels": self.dataset_labels(), "regions_class_order": list(self.class_order)}


def has_regions(raw_labels: Mapping[str, Any]) -> bool:
    """nnU-Net's rule: a label value that is a list (or tuple) of more than one value makes regions."""
    return any(isinstance(v, list | tuple) and len(v) > 1 for v in raw_labels.values())


def parse_regions(raw_labels: Mapping[str, Any], class_order: Any) -> tuple[Regions | None, list[str]]:
    """Regions from an nnU-Net ``labels`` mapping and ``regions_class_order``; the problems found.

    Every non-background entry is a region: an integer or a list of integers >= 1.
    """
    problems: list[str] = []
    names: list[str] = []
    labels: list[tuple[int, ...]] = []
    for name, value in raw_labels.items():
        values = value if isinstance(value, list | tuple) else [value]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            problems.append(f"region {str(name)[:40]!r}: {str(value)[:60]} is not a list of integer label values")
            continue
        if list(values) == [0]:
            continue  # background
        if any(v < 1 for v in values):
            problems.append(f"region {str(name)[:40]!r} holds a value below 1 ({list(values)}); background is 0 alone")
            continue
        names.append(str(name))
        labels.append(tuple(int(v) for v in values))
    if not isinstance(class_order, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in class_order
    ):
        problems.append("region labels need 'regions_class_order': one label value per region, like [1, 2, 3]")
        return None, problems
    if len(class_order) != len(names):
        problems.append(f"'regions_class_order' has {len(class_order)} values for {len(names)} regions")
        return None, problems
    for name, region, value in zip(names, labels, class_order, strict=True):
        if value not in region:
            problems.append(
                f"'regions_class_order' paints region {name[:40]!r} {list(region)} with {value}, not one of its values"
            )
    if problems or not names:
        return None, problems or ["'labels' declares no region besides background"]
    return Regions(names=tuple(names), labels=tuple(labels), class_order=tuple(int(v) for v in class_order)), []


# --------------------------------------------------------------------------------------------- masks


def region_masks(label_map: Any, regions: Regions) -> Any:
    """Boolean masks (R, ...) of each region in a label map (numpy array or torch tensor)."""
    if isinstance(label_map, np.ndarray):
        return np.stack([np.isin(label_map, region) for region in regions.labels])
    import torch

    return torch.stack(
        [torch.isin(label_map, torch.tensor(region, device=label_map.device)) for region in regions.labels]
    )


def region_targets(label: Tensor, regions: Regions) -> Tensor:
    """Training targets (B, R, X, Y, Z) float from a label batch (B, 1, X, Y, Z), as nnU-Net's
    ``ConvertSegmentationToRegionsTransform``: channel r is 1 where the label is one of region r's values."""
    return region_masks(label[:, 0].long(), regions).transpose(0, 1).float()


def label_map_from_regions(probabilities: Tensor, regions: Regions, threshold: float = 0.5) -> Tensor:
    """A label map (X, Y, Z) from region probabilities (R, X, Y, Z): each region above ``threshold`` is
    painted with its ``regions_class_order`` value, in that order (later regions overwrite earlier)."""
    import torch

    if probabilities.shape[0] != len(regions):
        raise ValueError(f"{probabilities.shape[0]} region channels for {len(regions)} regions")
    label = torch.zeros(probabilities.shape[1:], dtype=torch.long, device=probabilities.device)
    for channel, value in enumerate(regions.class_order):
        label[probabilities[channel] > threshold] = value
    return label
