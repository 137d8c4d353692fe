"""The one nnU-Net v2 raw writer every converter's :class:`~medssl.data.convert.base.Plan` goes through::

    OUT/imagesTr/<case>_0000.nii.gz   one file per channel, channel order of channel_names
    OUT/labelsTr/<case>.nii.gz
    OUT/dataset.json                  channel_names, labels (or regions + regions_class_order),
                                      numTraining, file_ending
    OUT/convert_manifest.json         kind, options, the source folder, and per finished case its
                                      output files (sizes) and its input files (sizes, mtimes)

- **Resumable.** A case enters the manifest only after all its files are in place, so an interrupted
  conversion resumes where it stopped: a case whose recorded outputs exist with their sizes and whose
  inputs still have the recorded sizes and mtimes is skipped; one whose inputs changed is converted
  again, and a case the source no longer has is removed with its files.
- **Bound to its source.** An OUT written from another source folder, or by another kind or options,
  is refused, never reported "already done" with the first source's data.
- **No partial file where nnU-Net looks.** A case's files are written in ``OUT/.partial/`` and then
  renamed into ``imagesTr``/``labelsTr`` together (one filesystem, so each rename is atomic); a killed
  run leaves debris only there, and the next run sweeps it (and any hidden file in
  ``imagesTr``/``labelsTr``, which nnU-Net's case listing would take for a case).
- **Output that ``data check`` accepts.** What dataset.json will say (name, channels, labels, regions)
  is checked with the task reader's own rules before any case is converted (so ``limits.labels``,
  ``limits.label_value`` and names apply), case ids are unique (ignoring case), and the written
  folder is scanned by ``data check``'s structural pass at the end.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medssl.data.convert.base import Plan, SourceCase, inside, read_json, require_same_grid
from medssl.data.readers import write_nifti
from medssl.data.regions import Regions
from medssl.data.tasks import check_dataset_fields, check_task
from medssl.errors import MedsslInputError
from medssl.fileio import atomic_write_json

FILE_ENDING = ".nii.gz"
MANIFEST = "convert_manifest.json"
PARTIAL = ".partial"
MANIFEST_VERSION = 2
_SAFE_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class ConvertSummary:
    out: Path
    converted: list[str]
    resumed: list[str]
    skipped: list[str]
    n_training: int
    removed: list[str] = field(default_factory=list)  # cases of an earlier run the source no longer has


# --------------------------------------------------------------------------------------------- plan checks


def check_case_ids(plan: Plan, source: Path) -> None:
    """Refuse unsafe file names and two cases with one id (compared ignoring case: macOS and Windows
    disks would put both in one file), naming both cases' files."""
    seen: dict[str, SourceCase] = {}
    for case in plan.cases:
        where = case.sources[0] if case.sources else source
        if not _SAFE_CASE_ID.fullmatch(case.case_id):
            raise MedsslInputError(where, f"case id {case.case_id!r} is not a safe file name")
        first = seen.setdefault(case.case_id.casefold(), case)
        if first is not case:
            other = first.sources[0] if first.sources else source
            both = f"is listed twice ({where})" if other == where else f"comes from two files: {other} and {where}"
            raise MedsslInputError(where, f"case id {case.case_id!r} {both}; one case would be lost")


def final_regions(regions: Regions, values: set[int]) -> Regions:
    """``regions`` over the label values a conversion declares: values it lacks leave their regions, a
    region whose painting value is gone goes, and a region that shrank onto another's values goes
    (KiTS19 has no cyst: kidney+masses becomes kidney+tumour, masses would repeat tumour)."""
    kept = []
    for name, region, paint in zip(regions.names, regions.labels, regions.class_order, strict=True):
        values_left = tuple(v for v in region if v in values)
        if paint in values_left:
            kept.append((name, values_left, paint, values_left == region))
    kept = [k for k in kept if k[3] or sum(other[1] == k[1] for other in kept) == 1]
    return Regions(
        names=tuple(k[0] for k in kept), labels=tuple(k[1] for k in kept), class_order=tuple(k[2] for k in kept)
    )


def dataset_json(plan: Plan, kind: str, n_training: int, seen_values: set[int] | None) -> dict[str, Any]:
    """The dataset.json a plan writes (``seen_values`` None: as if every optional label were present)."""
    labels = dict(plan.labels)
    labels.update({n: v for n, v in plan.optional_labels.items() if seen_values is None or v in seen_values})
    dataset: dict[str, Any] = {
        "name": plan.name,
        "description": plan.description,
        "reference": plan.reference,
        "channel_names": {str(i): name for i, name in enumerate(plan.channel_names)},
    }
    if plan.regions is not None:
        regions = final_regions(plan.regions, set(labels.values()))
        dataset["labels"] = regions.dataset_labels()
        dataset["regions_class_order"] = list(regions.class_order)
    else:
        dataset["labels"] = dict(sorted(labels.items(), key=lambda kv: kv[1]))
    dataset["numTraining"] = n_training
    dataset["file_ending"] = FILE_ENDING
    dataset["converted_by"] = f"medssl data convert {kind}"
    return dataset


# --------------------------------------------------------------------------------------------- the output folder


def _prepare_out(out: Path, source: Path) -> None:
    if out.exists() and not out.is_dir():
        raise MedsslInputError(out, "--out exists and is not a folder")
    if out.resolve() == source.resolve() or out.resolve().is_relative_to(source.resolve()):
        raise MedsslInputError(out, f"--out must lie outside the source folder {source}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MedsslInputError(out, f"cannot create the folder: {err.strerror or err}") from None


def _sweep_partial(out: Path) -> None:
    """Drop what a killed run left: ``.partial/`` and hidden files in imagesTr/labelsTr (earlier versions
    wrote their temporaries there, and nnU-Net lists every file with the file ending as a case)."""
    shutil.rmtree(out / PARTIAL, ignore_errors=True)
    for sub in ("imagesTr", "labelsTr"):
        folder = out / sub
        if folder.is_dir():
            for path in folder.iterdir():
                if path.name.startswith(".") and path.is_file():
                    path.unlink()


def _fingerprint(paths: list[Path], source: Path) -> dict[str, list[int]]:
    """Input files by path relative to the source: [size, mtime_ns] (a changed file reconverts its case)."""
    prints = {}
    for path in paths:
        stat = path.stat()
        prints[os.path.relpath(path, source)] = [stat.st_size, stat.st_mtime_ns]
    return prints


def _case_complete(out: Path, entry: Any, inputs: dict[str, list[int]]) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("files"), dict) or not entry["files"]:
        return False
    if entry.get("inputs") != inputs:
        return False
    for relative, size in entry["files"].items():
        path = out / relative
        if not inside_out(out, path) or not path.is_file() or path.stat().st_size != size:
            return False
    return True


def inside_out(out: Path, path: Path) -> bool:
    """A manifest's file name stays in imagesTr/labelsTr of ``out`` (a manifest is data, not trusted)."""
    try:
        relative = path.resolve().relative_to(out.resolve())
    except (ValueError, OSError, RuntimeError):
        return False
    return len(relative.parts) == 2 and relative.parts[0] in ("imagesTr", "labelsTr")


def _load_manifest(out: Path, kind: str, options: dict[str, Any], source: Path) -> dict:
    path = out / MANIFEST
    identity = {"kind": kind, "options": options, "source": str(source.resolve())}
    if not path.exists():
        if any(out.iterdir()):
            raise MedsslInputError(
                out, "holds files that 'medssl data convert' did not write; choose an empty or new --out folder"
            )
        return {"version": MANIFEST_VERSION, **identity, "cases": {}}
    manifest = read_json(out, path)
    if manifest.get("version") != MANIFEST_VERSION:
        raise MedsslInputError(path, "was written by an older medssl; convert into a new --out folder")
    written = {key: manifest.get(key) for key in identity}
    if written != identity:
        differs = ", ".join(
            f"{k} {str(written[k])[:120]!r} (now {str(identity[k])[:120]!r})"
            for k in identity
            if written[k] != identity[k]
        )
        raise MedsslInputError(path, f"was converted with another {differs}; use another --out")
    if not isinstance(manifest.get("cases"), dict):
        raise MedsslInputError(path, "'cases' must be a mapping; delete the folder and convert again")
    return manifest


def _remove_case(out: Path, entry: Any) -> None:
    files = entry.get("files") if isinstance(entry, dict) else None
    for relative in files or {}:
        path = out / str(relative)
        if inside_out(out, path) and path.is_file():
            path.unlink()


# --------------------------------------------------------------------------------------------- writing


def _compact_image(array: np.ndarray) -> np.ndarray:
    """Images come back from the readers as float32; CT in whole HU goes back to int16 (lossless)."""
    if array.size and np.all(array == np.round(array)):
        low, high = float(array.min()), float(array.max())
        if low >= np.iinfo(np.int16).min and high <= np.iinfo(np.int16).max:
            return array.astype(np.int16)
    return array


def _write_case(out: Path, arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, int]:
    """Write a case's files (``relative path: (array, affine)``) in ``out/.partial/``, then rename them
    into place together: nnU-Net never lists an image whose label is not there yet. Sizes in bytes."""
    for relative, (array, affine) in arrays.items():
        write_nifti(out / PARTIAL / Path(relative).name, array, affine)
    sizes = {}
    for relative in arrays:
        (out / relative).parent.mkdir(exist_ok=True)
        os.replace(out / PARTIAL / Path(relative).name, out / relative)
        sizes[relative] = (out / relative).stat().st_size
    return sizes


def _convert_case(out: Path, case: SourceCase, plan: Plan, kind: str) -> tuple[dict[str, int], list[int], dict]:
    data = case.read()
    n_channels = len(plan.channel_names)
    if len(data.channels) != n_channels:
        raise MedsslInputError(case.sources[0], f"has {len(data.channels)} channel(s); {n_channels} expected")
    for channel in data.channels[1:]:
        require_same_grid(data.channels[0], channel, "channel")
    require_same_grid(data.channels[0], data.label, "label")
    declared = {**plan.labels, **plan.optional_labels}
    values = sorted(int(v) for v in np.unique(data.label.array))
    undeclared = [v for v in values if v not in declared.values()]
    if undeclared:
        raise MedsslInputError(
            data.label.source, f"label value(s) {undeclared} are not among the {kind} labels {declared}"
        )
    arrays = {
        f"imagesTr/{case.case_id}_{c:04d}{FILE_ENDING}": (_compact_image(channel.array), channel.affine)
        for c, channel in enumerate(data.channels)
    }
    label = data.label.array.astype(np.uint8 if max(values) <= 255 else np.int32)
    # on the image's grid, checked equal above
    arrays[f"labelsTr/{case.case_id}{FILE_ENDING}"] = (label, data.channels[0].affine)
    return _write_case(out, arrays), values, data.notes


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
    check_case_ids(plan, source)
    # What dataset.json will say, checked as `data check` reads it, before anything is converted.
    check_dataset_fields(dataset_json(plan, kind, len(plan.cases), None), source / "dataset.json")
    _prepare_out(out, source)
    manifest = _load_manifest(out, kind, options, source)
    atomic_write_json(out / MANIFEST, manifest)  # first: a run killed in its first case still resumes
    _sweep_partial(out)
    wanted = {case.case_id for case in plan.cases}
    removed = sorted(set(manifest["cases"]) - wanted)
    for case_id in removed:
        _remove_case(out, manifest["cases"].pop(case_id))
    if removed:
        atomic_write_json(out / MANIFEST, manifest)
    converted, resumed = [], []
    for case in plan.cases:
        for path in case.sources:
            inside(source, path)  # again at read time: the plan was made earlier
        inputs = _fingerprint(case.sources, source)
        if _case_complete(out, manifest["cases"].get(case.case_id), inputs):
            resumed.append(case.case_id)
            continue
        files, values, notes = _convert_case(out, case, plan, kind)
        manifest["cases"][case.case_id] = {
            "files": files,
            "inputs": inputs,
            "label_values": values,
            **({"notes": notes} if notes else {}),
        }
        atomic_write_json(out / MANIFEST, manifest)
        converted.append(case.case_id)
        if progress:
            progress(case.case_id)
    shutil.rmtree(out / PARTIAL, ignore_errors=True)
    if not manifest["cases"]:
        raise MedsslInputError(source, f"no {kind} training cases found")
    seen = {v for entry in manifest["cases"].values() for v in entry.get("label_values", [])}
    dataset = dataset_json(plan, kind, len(manifest["cases"]), seen)
    check_dataset_fields(dataset, source / "dataset.json")
    atomic_write_json(out / "dataset.json", dataset)
    problems = check_task(out, deep=False)
    if problems:
        raise MedsslInputError(out, f"the converted folder fails 'medssl data check': {problems[0]}")
    return ConvertSummary(
        out=out,
        converted=converted,
        resumed=resumed,
        skipped=list(plan.skipped),
        n_training=len(manifest["cases"]),
        removed=removed,
    )
