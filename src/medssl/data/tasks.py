"""Labeled segmentation tasks in the Medical Segmentation Decathlon or nnU-Net v2 raw layout.

MSD::

    Task03_Liver/dataset.json   {"name": "Liver", "modality": {"0": "CT"},
                                 "labels": {"0": "background", "1": "liver"},
                                 "training": [{"image": "./imagesTr/liver_0.nii.gz",
                                               "label": "./labelsTr/liver_0.nii.gz"}, ...]}

nnU-Net v2::

    Dataset003_Liver/dataset.json  {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1},
                                    "numTraining": 131, "file_ending": ".nii.gz"}
    imagesTr/<case>_0000.nii.gz (one file per channel), labelsTr/<case>.nii.gz

``load_task`` stops at the first structural problem; ``check_task`` lists every problem it finds
and, when ``deep``, reads each case to check its content and geometry. Paths named in dataset.json
(and files found in the folders) must stay inside the task folder, symlinks included.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medssl.data.jsonfile import load_json_object
from medssl.data.readers import (
    VOLUME_SUFFIXES,
    Volume,
    find_volumes,
    is_volume_path,
    read_channels,
    read_volume,
)
from medssl.data.regions import Regions, has_regions, parse_regions
from medssl.data.safe_read import inside_root
from medssl.errors import MedsslInputError
from medssl.limits import exceeded, limits

# Relative tolerance when comparing the voxel spacing of an image and its label (or channels).
SPACING_RTOL = 1e-3
# Direction cosines are unit vectors: compare them with an absolute tolerance.
DIRECTION_ATOL = 1e-3

_CT_NAMES = {"ct", "cect", "ncct", "cta", "cbct"}
# MSD and nnU-Net name MRI channels by sequence: "MRI", "T2", "ADC", "FLAIR", "T1w", "t1gd", ...
_MRI_PATTERN = re.compile(r"^(mri?|t1|t2|flair|adc|dwi|pd|swi|dixon|bold|dti|hbv|cine|gre|ssfp)", re.I)
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class TaskCase:
    """One training case. ``image`` is the first (often only) channel; ``images`` lists every channel file.

    In the MSD layout a multi-channel case is one 4D file: then ``images == [image]`` and the channels
    are read with ``read_channels(image, n_channels)``; in nnU-Net each channel is its own ``_000c`` file.
    """

    case_id: str
    image: Path
    images: list[Path]
    label: Path | None


@dataclass
class TaskFolder:
    root: Path
    name: str
    modality: str  # "ct" or "mri"
    labels: dict[int, str]  # including 0: background
    cases: list[TaskCase]
    file_ending: str
    layout: str = "msd"  # "msd" or "nnunet"
    channel_names: list[str] = field(default_factory=list)
    regions: Regions | None = None  # nnU-Net region-based labels (medssl.data.regions)

    @property
    def structures(self) -> dict[int, str]:
        """What is scored: the declared labels without background (0), or the regions (1-based)."""
        if self.regions is not None:
            return self.regions.structures
        return {value: name for value, name in self.labels.items() if value != 0}

    @property
    def n_classes(self) -> int:
        """Label values a label map may hold: max(label) + 1."""
        return max(self.labels) + 1

    @property
    def n_outputs(self) -> int:
        """Network outputs: one per class (softmax), or one per region (a sigmoid each)."""
        return len(self.regions) if self.regions is not None else self.n_classes

    @property
    def n_channels(self) -> int:
        return max(len(self.channel_names), 1)

    @property
    def channels_in_one_file(self) -> bool:
        """True for MSD multi-channel tasks, whose cases are single 4D files."""
        return self.layout == "msd" and self.n_channels > 1


# ---------------------------------------------------------------------------------------------
# problem collection


class _Problems:
    """Problems as (path, message); ``check_task`` formats them, ``load_task`` raises the first."""

    def __init__(self) -> None:
        self.items: list[tuple[Path, str]] = []

    def add(self, path: Path, problem: str) -> None:
        self.items.append((path, problem))

    def add_error(self, error: MedsslInputError) -> None:
        self.items.append((Path(error.source or ""), error.problem))

    def __bool__(self) -> bool:
        return bool(self.items)

    def lines(self) -> list[str]:
        return [MedsslInputError(path, problem).one_line() for path, problem in self.items]


def _inside(root: Path, relative: Any, dataset_json: Path, what: str, problems: _Problems) -> Path | None:
    """``root / relative`` when it stays inside ``root`` after resolving '..' and symlinks."""
    if not isinstance(relative, str) or not relative.strip():
        problems.add(dataset_json, f"{what} is not a path string: {str(relative)[:80]!r}")
        return None
    if "\0" in relative or len(relative) > MAX_PATH_CHARS or any(len(p) > 255 for p in relative.split("/")):
        problems.add(dataset_json, f"{what} {relative[:80]!r}... contains a NUL byte or is too long for a path")
        return None
    if os.path.isabs(relative):
        problems.add(dataset_json, f"{what} {relative!r} is an absolute path; paths must be relative")
        return None
    candidate = Path(os.path.normpath(root / relative))
    if not _stays_inside(root, candidate):
        problems.add(candidate, f"{what} {relative!r} resolves outside the task folder {root}")
        return None
    return candidate


def _stays_inside(root: Path, path: Path) -> bool:
    return inside_root(path, root)


MAX_PATH_CHARS = 4096  # PATH_MAX on Linux
MAX_NAME_CHARS = 200


def _bad_text(text: str) -> str | None:
    """Why a name from dataset.json cannot be shown or stored (None when it is fine)."""
    if any(ord(c) < 32 for c in text):
        return f"name {text[:40]!r} contains control characters (NUL, newline, ...)"
    if len(text) > MAX_NAME_CHARS:
        return f"name of {len(text)} characters is longer than {MAX_NAME_CHARS}"
    return None


def _strip_ending(name: str, file_ending: str) -> str:
    if file_ending and name.endswith(file_ending):
        return name[: -len(file_ending)]
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


# ---------------------------------------------------------------------------------------------
# dataset.json fields


def _parse_labels(
    raw: Any, dataset_json: Path, problems: _Problems, class_order: Any = None
) -> tuple[dict[int, str], Regions | None]:
    """MSD ``{"0": "background", "1": "liver"}`` or nnU-Net ``{"background": 0, "liver": 1}``, or nnU-Net
    regions (``{"background": 0, "tumor core": [2, 3], ...}`` with ``regions_class_order``).

    Returns the label values a label map may hold (name each) and the regions, if any."""
    if not isinstance(raw, dict) or not raw:
        problems.add(dataset_json, "'labels' must be a non-empty mapping")
        return {}, None
    if len(raw) > limits().labels:  # before anything is sized by them
        problems.add_error(exceeded(dataset_json, "number of labels", len(raw), "labels"))
        return {}, None
    if has_regions(raw):
        return _parse_region_labels(raw, dataset_json, problems, class_order)
    labels: dict[int, str] = {}
    for key, value in raw.items():
        if isinstance(value, list) and len(value) == 1:
            value = value[0]  # nnU-Net: a one-value list is that value
        if isinstance(value, str) and re.fullmatch(r"\d+", str(key).strip()):
            number, name = int(key), value
        elif isinstance(value, int) and not isinstance(value, bool):
            number, name = value, str(key)
        else:
            shown = f"{str(key)[:40]!r}: {str(value)[:40]!r}"
            problems.add(dataset_json, f'label entry {shown} is neither "N": name nor name: N')
            continue
        if _bad_text(name):
            problems.add(dataset_json, f"label {number}: {_bad_text(name)}")
        elif number < 0:
            problems.add(dataset_json, f"label {name!r} has a negative value {number}")
        elif number > limits().label_value:  # the network gets max(label) + 1 outputs
            problems.add_error(exceeded(dataset_json, f"label value of {name[:40]!r}", number, "label_value"))
        elif number in labels:
            problems.add(dataset_json, f"label value {number} is declared twice ({labels[number]!r}, {name!r})")
        else:
            labels[number] = name
    if labels and 0 not in labels:
        labels[0] = "background"  # both layouts reserve 0 for background even when unnamed
    if labels and len(labels) < 2:
        problems.add(dataset_json, "'labels' declares no structure besides background")
    return dict(sorted(labels.items())), None


def _parse_region_labels(
    raw: dict, dataset_json: Path, problems: _Problems, class_order: Any
) -> tuple[dict[int, str], Regions | None]:
    before = len(problems.items)
    for name in raw:
        if _bad_text(str(name)):
            problems.add(dataset_json, f"region: {_bad_text(str(name))}")
    regions, found = parse_regions(raw, class_order)
    for problem in found:
        problems.add(dataset_json, problem)
    if regions is None or len(problems.items) > before:
        return {}, None
    biggest = max(regions.values)
    if biggest > limits().label_value:
        problems.add_error(exceeded(dataset_json, "label value in a region", biggest, "label_value"))
        return {}, None
    return {0: "background", **regions.value_names()}, regions


def _channel_modality(name: str) -> str | None:
    text = name.strip().lower()
    if text in _CT_NAMES:
        return "ct"
    if _MRI_PATTERN.match(text):
        return "mri"
    return None


def _parse_channels(raw: Any, key: str, dataset_json: Path, problems: _Problems) -> tuple[list[str], str]:
    """Channel names in index order and the task modality ("ct" or "mri"; "" when undecidable)."""
    if not isinstance(raw, dict) or not raw:
        problems.add(dataset_json, f'{key!r} must be a non-empty mapping like {{"0": "CT"}}')
        return [], ""
    if sorted(str(k) for k in raw) != [str(i) for i in range(len(raw))]:
        problems.add(dataset_json, f"{key!r} keys must be 0..{len(raw) - 1}, got {sorted(raw)}")
        return [], ""
    names = [str(raw[str(i)]) for i in range(len(raw))]
    kinds = {name: _channel_modality(name) for name in names}
    unknown = [name for name, kind in kinds.items() if kind is None]
    if unknown:
        problems.add(dataset_json, f"cannot tell CT from MRI by channel name(s) {unknown} in {key!r}")
        return names, ""
    found = {kind for kind in kinds.values() if kind is not None}
    if len(found) > 1:
        problems.add(dataset_json, f"{key!r} mixes CT and MRI channels: {names}")
        return names, ""
    return names, found.pop()


# ---------------------------------------------------------------------------------------------
# cases of each layout


def _msd_cases(root: Path, data: dict, dataset_json: Path, problems: _Problems) -> tuple[list[TaskCase], str]:
    training = data.get("training")
    if not isinstance(training, list):
        problems.add(dataset_json, "missing required key 'training' (a list of image/label pairs)")
        return [], ".nii.gz"
    cases: list[TaskCase] = []
    file_ending = ""
    for index, entry in enumerate(training):
        where = f"training[{index}]"
        if not isinstance(entry, dict) or "image" not in entry:
            problems.add(dataset_json, f"{where} lacks an 'image' path")
            continue
        image = _inside(root, entry["image"], dataset_json, f"{where}.image", problems)
        if "label" not in entry or entry["label"] is None:
            problems.add(dataset_json, f"{where} ({entry['image']}) has no 'label'")
            label = None
        else:
            label = _inside(root, entry["label"], dataset_json, f"{where}.label", problems)
        if image is None:
            continue
        if not file_ending:
            file_ending = next((s for s in VOLUME_SUFFIXES if image.name.lower().endswith(s)), image.suffix)
        if not image.is_file():
            problems.add(image, f"image of {where} not found")
        if label is not None and not label.is_file():
            problems.add(label, f"label of {where} not found")
        case_id = _strip_ending(image.name, file_ending)
        cases.append(TaskCase(case_id=case_id, image=image, images=[image], label=label))
    return cases, file_ending or ".nii.gz"


def _nnunet_cases(
    root: Path, data: dict, dataset_json: Path, n_channels: int, problems: _Problems
) -> tuple[list[TaskCase], str]:
    file_ending = data.get("file_ending")
    if not isinstance(file_ending, str) or not file_ending.startswith("."):
        problems.add(dataset_json, "missing required key 'file_ending' (such as \".nii.gz\")")
        return [], ""
    if isinstance(data.get("dataset"), dict):
        cases = _nnunet_listed_cases(root, data["dataset"], dataset_json, problems)
    else:
        cases = _nnunet_found_cases(root, file_ending, n_channels, problems)
    for case in cases:
        for image in case.images:
            if not image.is_file():
                problems.add(image, f"image of case {case.case_id} not found")
        if case.label is not None and not case.label.is_file():
            problems.add(case.label, f"label of case {case.case_id} not found")
    expected = data.get("numTraining")
    if not isinstance(expected, int) or isinstance(expected, bool):
        problems.add(dataset_json, "missing required key 'numTraining' (an integer)")
    elif expected != len(cases):
        problems.add(dataset_json, f"numTraining is {expected} but {len(cases)} training cases were found")
    return cases, file_ending


def _nnunet_listed_cases(root: Path, listing: dict, dataset_json: Path, problems: _Problems) -> list[TaskCase]:
    """nnU-Net v2's optional ``"dataset": {case: {"images": [...], "label": ...}}`` listing."""
    cases: list[TaskCase] = []
    for case_id, entry in listing.items():
        where = f"dataset[{case_id!r}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("images"), list) or not entry["images"]:
            problems.add(dataset_json, f"{where} lacks a non-empty 'images' list")
            continue
        images = [_inside(root, p, dataset_json, f"{where}.images", problems) for p in entry["images"]]
        label = None
        if entry.get("label") is None:
            problems.add(dataset_json, f"{where} has no 'label'")
        else:
            label = _inside(root, entry["label"], dataset_json, f"{where}.label", problems)
        if all(p is not None for p in images):
            kept = [p for p in images if p is not None]
            cases.append(TaskCase(case_id=str(case_id), image=kept[0], images=kept, label=label))
    return cases


def _nnunet_found_cases(root: Path, file_ending: str, n_channels: int, problems: _Problems) -> list[TaskCase]:
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not labels_dir.is_dir():
        problems.add(labels_dir, "missing labelsTr folder")
    channels: dict[str, dict[int, Path]] = {}
    for path in sorted(images_dir.iterdir()) if images_dir.is_dir() else []:
        if path.name.startswith(".") or not path.name.endswith(file_ending):
            continue
        if not _stays_inside(root, path):
            problems.add(path, "resolves outside the task folder (a symlink pointing out)")
            continue
        match = _CHANNEL_FILE.match(path.name[: -len(file_ending)])
        if match is None:
            problems.add(path, "image file name lacks the _XXXX channel suffix (e.g. case_0000)")
            continue
        channel = int(match["channel"])
        if channel >= n_channels:
            problems.add(path, f"channel {channel:04d} but dataset.json declares {n_channels} channel(s)")
            continue
        channels.setdefault(match["case"], {})[channel] = path
    cases: list[TaskCase] = []
    for case_id, files in channels.items():
        missing = [f"{c:04d}" for c in range(n_channels) if c not in files]
        if missing:
            problems.add(images_dir, f"case {case_id} lacks channel file(s) {', '.join(missing)}")
            continue
        images = [files[c] for c in range(n_channels)]
        label = labels_dir / f"{case_id}{file_ending}"
        inside = _stays_inside(root, label)
        if not inside:
            problems.add(label, "resolves outside the task folder (a symlink pointing out)")
        cases.append(TaskCase(case_id=case_id, image=images[0], images=images, label=label if inside else None))
    return cases


# ---------------------------------------------------------------------------------------------


@dataclass
class _Fields:
    """What dataset.json says about a task, before its cases are looked at."""

    layout: str
    channel_names: list[str]
    modality: str
    labels: dict[int, str]
    regions: Regions | None
    name: str


def _parse_fields(data: dict, dataset_json: Path, default_name: str, problems: _Problems) -> _Fields:
    if "channel_names" in data:
        layout, channel_key = "nnunet", "channel_names"
    elif "modality" in data:
        layout, channel_key = "msd", "modality"
    else:
        problems.add(dataset_json, "missing required key 'modality' (MSD) or 'channel_names' (nnU-Net v2)")
        layout, channel_key = ("nnunet" if "file_ending" in data else "msd"), ""
    channel_names, modality = (
        _parse_channels(data[channel_key], channel_key, dataset_json, problems) if channel_key else ([], "")
    )
    labels: dict[int, str] = {}
    regions: Regions | None = None
    if "labels" not in data:
        problems.add(dataset_json, "missing required key 'labels'")
    else:
        labels, regions = _parse_labels(data["labels"], dataset_json, problems, data.get("regions_class_order"))
    raw_name = data.get("name")
    name = raw_name if isinstance(raw_name, str) and raw_name.strip() else default_name
    if _bad_text(name):
        problems.add(dataset_json, f"'name': {_bad_text(name)}")
        name = default_name
    return _Fields(layout, channel_names, modality, labels, regions, name)


def check_dataset_fields(data: dict, dataset_json: Path) -> None:
    """Refuse (first problem, naming ``dataset_json``) a dataset.json whose name, channels or labels
    ``data check`` would refuse: ``data convert`` checks what it will write with the reader's own rules."""
    problems = _Problems()
    _parse_fields(data, dataset_json, dataset_json.parent.name, problems)
    if problems:
        path, problem = problems.items[0]
        raise MedsslInputError(path, problem)


def _duplicate_case_problems(cases: list[TaskCase], problems: _Problems) -> None:
    """Two cases with one id (ids that differ only in case collide on macOS and Windows disks) or one
    image file: each pair is named, never one of them dropped."""
    by_id: dict[str, TaskCase] = {}
    by_file: dict[Path, TaskCase] = {}
    for case in cases:
        first = by_id.get(case.case_id.casefold())
        if first is not None:
            problems.add(case.image, f"case id {case.case_id!r} appears twice: {first.image} and {case.image}")
        by_id.setdefault(case.case_id.casefold(), case)
        try:
            resolved = case.image.resolve()
        except (OSError, RuntimeError, ValueError):
            continue
        first = by_file.get(resolved)
        if first is not None and first.case_id != case.case_id:
            problems.add(case.image, f"image of case {case.case_id!r} is also case {first.case_id!r}'s ({case.image})")
        by_file.setdefault(resolved, case)


def _scan_task(root: Path, problems: _Problems) -> TaskFolder | None:
    """Structural checks (no voxel data read); returns the task unless it cannot be described at all."""
    if not root.exists():
        problems.add(root, "task folder not found")
        return None
    if not root.is_dir():
        problems.add(root, "not a folder (a task is a folder with dataset.json, imagesTr/, labelsTr/)")
        return None
    dataset_json = root / "dataset.json"
    if not dataset_json.is_file():
        problems.add(dataset_json, "missing (a task folder needs dataset.json)")
        return None
    if not _stays_inside(root, dataset_json):
        problems.add(dataset_json, "resolves outside the task folder (a symlink pointing out)")
        return None
    try:
        data = load_json_object(dataset_json)
    except MedsslInputError as err:
        problems.add_error(err)
        return None
    fields = _parse_fields(data, dataset_json, root.name, problems)

    images_dir = root / "imagesTr"
    if not images_dir.is_dir():
        problems.add(images_dir, "missing imagesTr folder")
    elif not _stays_inside(root, images_dir):
        problems.add(images_dir, "resolves outside the task folder (a symlink pointing out)")
    elif not any(not p.name.startswith(".") for p in images_dir.iterdir()):
        problems.add(images_dir, "empty imagesTr folder")

    if fields.layout == "msd":
        cases, file_ending = _msd_cases(root, data, dataset_json, problems)
    else:
        cases, file_ending = _nnunet_cases(root, data, dataset_json, len(fields.channel_names) or 1, problems)
    _duplicate_case_problems(cases, problems)
    if not cases and images_dir.is_dir():
        problems.add(dataset_json, "no training cases")
    return TaskFolder(
        root=root,
        name=fields.name,
        modality=fields.modality,
        labels=fields.labels,
        cases=cases,
        file_ending=file_ending,
        layout=fields.layout,
        channel_names=fields.channel_names,
        regions=fields.regions,
    )


def load_task(root: str | Path) -> TaskFolder:
    """Describe a task folder (MSD or nnU-Net v2 layout); raise ``MedsslInputError`` on the first problem."""
    problems = _Problems()
    task = _scan_task(Path(root), problems)
    if problems or task is None:
        path, problem = problems.items[0]
        raise MedsslInputError(path, problem)
    return task


# ---------------------------------------------------------------------------------------------
# deep checks: read every case


def _fmt(values: Any) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def _geometry_problems(reference: Volume, other: Volume, what: str) -> list[str]:
    """How ``other`` (a label or another channel) disagrees with the reference image's voxel grid."""
    if other.array.shape != reference.array.shape:
        return [f"{what} shape {other.array.shape} differs from image shape {reference.array.shape}"]
    found = []
    ref_spacing, spacing = np.array(reference.spacing), np.array(other.spacing)
    if not np.allclose(spacing, ref_spacing, rtol=SPACING_RTOL, atol=0.0):
        found.append(f"{what} spacing {_fmt(spacing)} differs from image spacing {_fmt(ref_spacing)}")
        return found  # direction and origin comparisons mean little on different grids
    ref_dirs = reference.affine[:3, :3] / ref_spacing
    dirs = other.affine[:3, :3] / spacing
    if not np.allclose(dirs, ref_dirs, rtol=0.0, atol=DIRECTION_ATOL):
        found.append(f"{what} orientation (affine direction) differs from the image's")
    origin_tol = SPACING_RTOL * float(ref_spacing.max())
    if np.any(np.abs(other.affine[:3, 3] - reference.affine[:3, 3]) > origin_tol):
        found.append(
            f"{what} origin {_fmt(other.affine[:3, 3])} differs from image origin {_fmt(reference.affine[:3, 3])}"
        )
    return found


def _check_case(task: TaskFolder, case: TaskCase, problems: _Problems) -> None:
    channel_volumes: list[Volume] = []
    reads: list[tuple[Path, int | None]]
    if task.channels_in_one_file:
        reads = [(case.image, c) for c in range(task.n_channels)]
        try:
            channel_volumes = read_channels(case.image, task.n_channels, root=task.root)
        except MedsslInputError as exc:
            problems.add_error(exc)
    else:
        reads = [(path, None) for path in case.images]
        for path in case.images:
            try:
                channel_volumes.append(read_volume(path, root=task.root))
            except MedsslInputError as exc:
                problems.add_error(exc)
    reference = channel_volumes[0] if len(channel_volumes) == len(reads) else None
    if reference is not None:
        for (path, channel), volume in zip(reads[1:], channel_volumes[1:], strict=True):
            what = f"channel {channel}" if channel is not None else "channel image"
            for problem in _geometry_problems(reference, volume, what):
                problems.add(path, problem)
    if case.label is None or not case.label.is_file():
        return  # already reported by the structural scan
    try:
        label = read_volume(case.label, label=True, root=task.root)
    except MedsslInputError as exc:
        problems.add_error(exc)
        return
    if reference is not None:
        for problem in _geometry_problems(reference, label, "label"):
            problems.add(case.label, problem)
    undeclared = sorted(set(np.unique(label.array).tolist()) - set(task.labels))
    if undeclared:
        shown = ", ".join(str(v) for v in undeclared[:10]) + (" ..." if len(undeclared) > 10 else "")
        problems.add(case.label, f"label values not declared in dataset.json: {shown}")


def check_task(root: str | Path, deep: bool = True) -> list[str]:
    """Every problem of a task folder, one "path: problem" line each (empty list: the task is fine).

    With ``deep`` each case is read: unreadable files, NaN/inf voxels, image/label shape, spacing,
    orientation and origin mismatches, label values not declared in dataset.json, non-integer labels.
    """
    problems = _Problems()
    task = _scan_task(Path(root), problems)
    if deep and task is not None:
        for case in task.cases:
            if all(p.is_file() for p in case.images):
                _check_case(task, case, problems)
    return problems.lines()


def check_corpus_folder(root: str | Path) -> list[str]:
    """Problems of a folder of unlabeled scans: not found, no volumes, unreadable files, NaN/inf."""
    root = Path(root)
    if not root.exists():
        return [MedsslInputError(root, "not found").one_line()]
    volumes = find_volumes(root)
    if not volumes:
        readable = ", ".join(VOLUME_SUFFIXES)
        return [MedsslInputError(root, f"no volumes found ({readable} files or DICOM series folders)").one_line()]
    problems = _Problems()
    for path in volumes:
        try:
            read_volume(path)
        except MedsslInputError as exc:
            problems.add_error(exc)
    return problems.lines()


def check_path(path: str | Path, deep: bool = True) -> list[str]:
    """What ``medssl data check PATH`` reports: a task folder, a single volume, or a folder of scans."""
    path = Path(path)
    if path.is_dir() and (path / "dataset.json").exists():
        return check_task(path, deep=deep)
    if path.exists() and is_volume_path(path):
        try:
            read_volume(path)
        except MedsslInputError as exc:
            return [exc.one_line()]
        return []
    if path.is_file():
        return [MedsslInputError(path, "not a volume file, a task folder or a folder of scans").one_line()]
    return check_corpus_folder(path)
