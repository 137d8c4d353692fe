"""What every converter shares: the plan of a conversion, safe paths, and the one nnU-Net v2 raw writer.

A converter turns a public dataset's own layout into a :class:`Plan`: channel names, labels
(name → value, background 0), and the cases, each a function that reads its channels and its label
map. :func:`write_nnunet` then writes the nnU-Net v2 raw layout::

    OUT/imagesTr/<case>_0000.nii.gz   one file per channel, channel order of channel_names
    OUT/labelsTr/<case>.nii.gz
    OUT/dataset.json                  channel_names, labels, numTraining, file_ending
    OUT/convert_manifest.json         kind, options, and per finished case its files (with sizes)

Every file is written to a temporary name and renamed into place, and a case enters the manifest only
after all its files are in place, so an interrupted conversion resumes where it stopped: a case whose
manifest entry lists files that exist with the recorded sizes is skipped.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medssl.data.readers import Volume, read_volume, write_nifti
from medssl.errors import MedsslInputError
from medssl.fileio import atomic_write_json

FILE_ENDING = ".nii.gz"
MANIFEST = "convert_manifest.json"
# Case ids become file names: no separators, no leading dot (hidden / temporary files start with one).
_SAFE_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_GEOMETRY_RTOL = 1e-3


@dataclass
class CaseData:
    """A case read from its source files: channels in channel order, and the label map on their grid."""

    channels: list[Volume]
    label: Volume
    notes: dict[str, Any] = field(default_factory=dict)  # recorded in the manifest (e.g. overlap voxels)


@dataclass
class SourceCase:
    case_id: str
    sources: list[Path]  # the files it is read from, for the manifest
    read: Callable[[], CaseData]


@dataclass
class Plan:
    name: str
    channel_names: list[str]
    labels: dict[str, int]  # declared in every output, background included
    cases: list[SourceCase]
    # Labels that only some releases carry (KiTS21/23's cyst): declared when a converted case has them.
    optional_labels: dict[str, int] = field(default_factory=dict)
    description: str = ""
    reference: str = ""
    skipped: list[str] = field(default_factory=list)  # source cases left out, one line each (no label, ...)


# --------------------------------------------------------------------------------------------- paths


def inside(root: Path, path: Path) -> Path:
    """``path`` when it stays inside ``root`` after resolving '..' and symlinks, else bad input."""
    try:
        ok = path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # symlink loops
        ok = False
    if not ok:
        raise MedsslInputError(path, f"resolves outside the dataset folder {root}")
    return path


def listed_path(root: Path, relative: Any, listing: Path, what: str) -> Path:
    """A path written in a dataset's own json (``./imagesTr/x.nii.gz``), which must stay inside ``root``."""
    if not isinstance(relative, str) or not relative.strip():
        raise MedsslInputError(listing, f"{what} is not a path string: {relative!r}")
    if os.path.isabs(relative):
        raise MedsslInputError(listing, f"{what} {relative!r} is absolute; paths must be relative to {root}")
    candidate = Path(os.path.normpath(root / relative))
    if not candidate.resolve().is_relative_to(root.resolve()):
        raise MedsslInputError(listing, f"{what} {relative!r} resolves outside the dataset folder {root}")
    return candidate


def required_file(root: Path, path: Path, what: str) -> Path:
    if not path.is_file():
        raise MedsslInputError(path, f"missing {what}")
    return inside(root, path)


def check_case_id(case_id: str, source: Path) -> str:
    if not _SAFE_CASE_ID.fullmatch(case_id):
        raise MedsslInputError(source, f"case id {case_id!r} is not a safe file name")
    return case_id


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise MedsslInputError(path, "missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MedsslInputError(path, f"malformed JSON: {exc.msg} at line {exc.lineno}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MedsslInputError(path, f"unreadable: {exc}") from None
    if not isinstance(data, dict):
        raise MedsslInputError(path, "must hold a JSON object")
    return data


def msd_labels(raw: Any, path: Path) -> dict[str, int]:
    """MSD ``{"0": "background", "1": "liver"}`` as nnU-Net v2 ``{"background": 0, "liver": 1}``."""
    if not isinstance(raw, dict) or not raw:
        raise MedsslInputError(path, '\'labels\' must be a non-empty mapping like {"0": "background"}')
    labels: dict[str, int] = {}
    for key, name in raw.items():
        if not re.fullmatch(r"\d+", str(key)) or not isinstance(name, str) or not name.strip():
            raise MedsslInputError(path, f'label entry {key!r}: {name!r} is not "N": "name"')
        if name in labels:
            raise MedsslInputError(path, f"label name {name!r} is used twice")
        labels[name] = int(key)
    if 0 not in labels.values():
        labels = {"background": 0, **labels}
    return dict(sorted(labels.items(), key=lambda kv: kv[1]))


# --------------------------------------------------------------------------------------------- volumes


def read_image(path: Path, channel: int | None = None) -> Volume:
    return read_volume(path, channel=channel)


def read_label(path: Path) -> Volume:
    return read_volume(path, label=True)


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


def _compact_image(array: np.ndarray) -> np.ndarray:
    """Images come back from the readers as float32; CT in whole HU goes back to int16 (lossless)."""
    if array.size and np.all(array == np.round(array)):
        low, high = float(array.min()), float(array.max())
        if low >= np.iinfo(np.int16).min and high <= np.iinfo(np.int16).max:
            return array.astype(np.int16)
    return array


# --------------------------------------------------------------------------------------------- writer


@dataclass
class ConvertSummary:
    out: Path
    converted: list[str]
    resumed: list[str]
    skipped: list[str]
    n_training: int


def _case_complete(out: Path, entry: Any) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("files"), dict) or not entry["files"]:
        return False
    for relative, size in entry["files"].items():
        path = out / relative
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def _load_manifest(out: Path, kind: str, options: dict[str, Any], source: Path) -> dict:
    path = out / MANIFEST
    if not path.exists():
        if (out / "dataset.json").exists() or (out / "imagesTr").exists():
            raise MedsslInputError(
                out, "holds a dataset that 'medssl data convert' did not write; choose an empty --out folder"
            )
        return {"kind": kind, "options": options, "source": str(source), "cases": {}}
    manifest = read_json(path)
    if manifest.get("kind") != kind or manifest.get("options") != options:
        raise MedsslInputError(
            path,
            f"was written by 'convert {manifest.get('kind')}' with options "
            f"{manifest.get('options')}, not {kind} with {options}; use another --out",
        )
    if not isinstance(manifest.get("cases"), dict):
        raise MedsslInputError(path, "'cases' must be a mapping; delete the folder and convert again")
    return manifest


def write_nnunet(
    plan: Plan,
    kind: str,
    source: Path,
    out: Path,
    options: dict[str, Any],
    progress: Callable[[str], None] | None = None,
) -> ConvertSummary:
    """Write ``plan`` as an nnU-Net v2 raw dataset in ``out``; finished cases of an earlier run are kept."""
    source, out = Path(source), Path(out)
    if out.resolve() == source.resolve() or out.resolve().is_relative_to(source.resolve()):
        raise MedsslInputError(out, f"--out must lie outside the source folder {source}")
    out.mkdir(parents=True, exist_ok=True)
    manifest = _load_manifest(out, kind, options, source)
    n_channels = len(plan.channel_names)
    declared = {**plan.labels, **plan.optional_labels}
    allowed = set(declared.values())
    converted, resumed = [], []
    for case in plan.cases:
        check_case_id(case.case_id, case.sources[0] if case.sources else source)
        if _case_complete(out, manifest["cases"].get(case.case_id)):
            resumed.append(case.case_id)
            continue
        data = case.read()
        if len(data.channels) != n_channels:
            raise MedsslInputError(case.sources[0], f"has {len(data.channels)} channel(s); {n_channels} expected")
        for channel in data.channels[1:]:
            require_same_grid(data.channels[0], channel, "channel")
        require_same_grid(data.channels[0], data.label, "label")
        values = sorted(int(v) for v in np.unique(data.label.array))
        undeclared = [v for v in values if v not in allowed]
        if undeclared:
            raise MedsslInputError(
                data.label.source, f"label value(s) {undeclared} are not among the {kind} labels {declared}"
            )
        files: dict[str, int] = {}
        for c, channel in enumerate(data.channels):
            relative = f"imagesTr/{case.case_id}_{c:04d}{FILE_ENDING}"
            write_nifti(out / relative, _compact_image(channel.array), channel.affine)
            files[relative] = (out / relative).stat().st_size
        relative = f"labelsTr/{case.case_id}{FILE_ENDING}"
        label = data.label.array.astype(np.uint8 if max(values) <= 255 else np.int32)
        write_nifti(out / relative, label, data.channels[0].affine)  # the image's grid, checked equal above
        files[relative] = (out / relative).stat().st_size
        manifest["cases"][case.case_id] = {
            "files": files,
            "label_values": values,
            "sources": [os.path.relpath(p, source) for p in case.sources],
            **({"notes": data.notes} if data.notes else {}),
        }
        atomic_write_json(out / MANIFEST, manifest)
        converted.append(case.case_id)
        if progress:
            progress(case.case_id)
    if not manifest["cases"]:
        raise MedsslInputError(source, f"no {kind} training cases found")
    seen = {v for entry in manifest["cases"].values() for v in entry.get("label_values", [])}
    labels = dict(plan.labels)
    labels.update({name: value for name, value in plan.optional_labels.items() if value in seen})
    dataset = {
        "name": plan.name,
        "description": plan.description,
        "reference": plan.reference,
        "channel_names": {str(i): name for i, name in enumerate(plan.channel_names)},
        "labels": dict(sorted(labels.items(), key=lambda kv: kv[1])),
        "numTraining": len(manifest["cases"]),
        "file_ending": FILE_ENDING,
        "converted_by": f"medssl data convert {kind}",
    }
    atomic_write_json(out / "dataset.json", dataset)
    return ConvertSummary(
        out=out, converted=converted, resumed=resumed, skipped=list(plan.skipped), n_training=len(manifest["cases"])
    )
