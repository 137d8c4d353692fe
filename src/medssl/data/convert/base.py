"""What every converter shares: the plan of a conversion, safe paths into the source, and reading volumes.

A converter turns a public dataset's own layout into a :class:`Plan`: channel names, labels
(name → value, background 0), optionally nnU-Net regions over those labels, and the cases, each a
function that reads its channels and its label map. :func:`medssl.data.convert.writer.write_nnunet`
then writes every plan the same way.

Every path a converter takes from the source (found in a folder, or written in the dataset's own
json) must stay inside the source folder once ``..`` and symlinks are resolved; the writer checks each
case's files again just before reading them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medssl.data.jsonfile import load_json_object
from medssl.data.readers import Volume, read_volume
from medssl.data.regions import Regions
from medssl.data.safe_read import inside_root
from medssl.errors import MedsslInputError

# Case ids become file names: no separators, no leading dot (hidden / temporary files start with one).
_SAFE_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_GEOMETRY_RTOL = 1e-3
MAX_PATH_CHARS = 4096  # PATH_MAX on Linux
MAX_NAME_CHARS = 255  # NAME_MAX
LABEL_STYLES = ("regions", "plain")


@dataclass
class CaseData:
    """A case read from its source files: channels in channel order, and the label map on their grid."""

    channels: list[Volume]
    label: Volume
    notes: dict[str, Any] = field(default_factory=dict)  # recorded in the manifest (e.g. overlap voxels)


@dataclass
class SourceCase:
    case_id: str
    sources: list[Path]  # every file it is read from: checked inside the source, fingerprinted in the manifest
    read: Callable[[], CaseData]


@dataclass
class Plan:
    name: str
    channel_names: list[str]
    labels: dict[str, int]  # the values of the label maps, declared in every output, background included
    cases: list[SourceCase]
    # Labels that only some releases carry (KiTS21/23's cyst): declared when a converted case has them.
    optional_labels: dict[str, int] = field(default_factory=dict)
    # nnU-Net regions over the label values, declared instead of the labels (the label maps stay plain).
    regions: Regions | None = None
    description: str = ""  # empty: the converter module's DESCRIPTION
    reference: str = ""  # empty: the converter module's REFERENCE
    skipped: list[str] = field(default_factory=list)  # source cases left out, one line each (no label, ...)


# --------------------------------------------------------------------------------------------- paths


def inside(root: Path, path: Path) -> Path:
    """``path`` when it stays inside ``root`` after resolving '..' and symlinks, else bad input."""
    if not inside_root(path, root):
        raise MedsslInputError(path, f"resolves outside the dataset folder {root} (a symlink or '..' leading out)")
    return path


def listed_path(root: Path, relative: Any, listing: Path, what: str) -> Path:
    """A path written in a dataset's own json (``./imagesTr/x.nii.gz``), which must stay inside ``root``."""
    if not isinstance(relative, str) or not relative.strip():
        raise MedsslInputError(listing, f"{what} is not a path string: {str(relative)[:80]!r}")
    if "\0" in relative:
        raise MedsslInputError(listing, f"{what} {relative[:80]!r} contains a NUL byte")
    if len(relative) > MAX_PATH_CHARS or any(len(part) > MAX_NAME_CHARS for part in relative.split("/")):
        raise MedsslInputError(listing, f"{what} {relative[:80]!r}... is too long for a path")
    if os.path.isabs(relative):
        raise MedsslInputError(listing, f"{what} {relative!r} is absolute; paths must be relative to {root}")
    candidate = Path(os.path.normpath(root / relative))
    if not inside_root(candidate, root):
        raise MedsslInputError(
            candidate, f"{what} of {listing} resolves outside the dataset folder {root} (a symlink or '..' leading out)"
        )
    return candidate


def required_file(root: Path, path: Path, what: str) -> Path:
    if not path.is_file():
        raise MedsslInputError(path, f"missing {what}")
    return inside(root, path)


def read_json(root: Path, path: Path) -> dict:
    """A dataset's own json file: inside ``root`` (not a symlink leading out) and read as untrusted input."""
    if not path.is_file():
        raise MedsslInputError(path, "missing")
    return load_json_object(inside(root, path))


def msd_labels(raw: Any, path: Path) -> dict[str, int]:
    """MSD ``{"0": "background", "1": "liver"}`` as nnU-Net v2 ``{"background": 0, "liver": 1}``."""
    if not isinstance(raw, dict) or not raw:
        raise MedsslInputError(path, '\'labels\' must be a non-empty mapping like {"0": "background"}')
    labels: dict[str, int] = {}
    for key, name in raw.items():
        if not re.fullmatch(r"\d+", str(key)) or not isinstance(name, str) or not name.strip():
            raise MedsslInputError(path, f'label entry {str(key)[:40]!r}: {str(name)[:40]!r} is not "N": "name"')
        if name in labels or (name == "background" and int(key) != 0):
            raise MedsslInputError(path, f"label name {name[:40]!r} is used twice (background is 0)")
        labels[name] = int(key)
    if 0 not in labels.values():
        labels = {"background": 0, **labels}
    return dict(sorted(labels.items(), key=lambda kv: kv[1]))


def training_pairs(root: Path, listing: Path, data: dict) -> list[tuple[str, Path, Path]]:
    """The ``training`` list of an MSD-style dataset.json: (where, image, label) per entry, paths inside ``root``."""
    training = data.get("training")
    if not isinstance(training, list) or not training:
        raise MedsslInputError(listing, "missing 'training' list of image/label pairs")
    pairs = []
    for index, entry in enumerate(training):
        where = f"training[{index}]"
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise MedsslInputError(listing, f"{where} needs 'image' and 'label'")
        image = listed_path(root, entry["image"], listing, f"{where}.image")
        label = listed_path(root, entry["label"], listing, f"{where}.label")
        pairs.append((where, image, label))
    return pairs


# --------------------------------------------------------------------------------------------- volumes


def read_image(path: Path) -> Volume:
    return read_volume(path)


def read_label(path: Path) -> Volume:
    return read_volume(path, label=True)


def image_and_label(image: Path, label: Path) -> Callable[[], CaseData]:
    """The reader of a one-channel case whose label map needs no remapping."""

    def read() -> CaseData:
        return CaseData(channels=[read_image(image)], label=read_label(label))

    return read


def same_grid(a: Volume, b: Volume) -> bool:
    if a.shape != b.shape:
        return False
    scale = float(max(a.spacing))
    return bool(
        np.allclose(a.affine[:3, :3], b.affine[:3, :3], rtol=_GEOMETRY_RTOL, atol=_GEOMETRY_RTOL * scale)
        and np.allclose(a.affine[:3, 3], b.affine[:3, 3], atol=_GEOMETRY_RTOL * scale)
    )


def require_same_grid(reference: Volume, other: Volume, what: str) -> None:
    if other.shape != reference.shape:
        raise MedsslInputError(
            other.source,
            f"{what} shape {other.shape} differs from the image's {reference.shape} ({reference.source.name})",
        )
    if not same_grid(reference, other):
        raise MedsslInputError(
            other.source,
            f"{what} voxel grid (spacing, orientation or origin) differs from the image's ({reference.source.name})",
        )


def remap(label: Volume, mapping: dict[int, int]) -> Volume:
    """Label values through ``mapping`` (values not in it: unexpected, bad input)."""
    values = np.unique(label.array)
    unexpected = sorted(int(v) for v in values if int(v) not in mapping)
    if unexpected:
        raise MedsslInputError(label.source, f"unexpected label value(s) {unexpected}; expected {sorted(mapping)}")
    lut = np.zeros(int(values.max()) + 1, dtype=np.uint8)
    for old, new in mapping.items():
        if old < lut.size:
            lut[old] = new
    return Volume(array=lut[label.array], affine=label.affine, source=label.source)


def check_label_style(kind: str, label_style: str | None, kinds_with_regions: set[str]) -> str | None:
    """The label style of a conversion: regions by default where nnU-Net converts with regions."""
    if label_style is None:
        return "regions" if kind in kinds_with_regions else None
    if label_style not in LABEL_STYLES:
        raise MedsslInputError(None, f"--labels must be one of {', '.join(LABEL_STYLES)}, not {label_style!r}")
    if kind not in kinds_with_regions:
        raise MedsslInputError(None, f"--labels applies to {', '.join(sorted(kinds_with_regions))} only, not {kind}")
    return label_style
