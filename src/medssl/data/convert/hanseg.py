"""HaN-Seg (head-and-neck organs at risk, CT + MR T1) as it ships (``HaN-Seg/set_1/case_01/``)::

    case_01/case_01_IMG_CT.nrrd
    case_01/case_01_IMG_MR_T1.nrrd            not converted (see below)
    case_01/case_01_OAR_<Structure>.seg.nrrd  one binary mask per organ at risk (30 structures)

The 30 per-structure masks are merged into one label map on the CT grid, values 1..30 in the
alphabetical order of the HaN-Seg structure names (``STRUCTURES``), so a value means the same organ in
every case even when a case lacks some masks. A mask on another grid than the CT (a Slicer segment
cropped to its extent) is resampled onto the CT grid (nearest neighbour, SimpleITK).

Overlap rule: where masks overlap, the voxel goes to the structure with fewer voxels in that case
(small organs such as the optic chiasm are not swallowed by large ones such as the oral cavity);
ties go to the lower label value. The number of overlapping voxels per case is recorded in the
conversion manifest.

The MR T1 is not converted: HaN-Seg's organs are delineated on the CT and the MR is on its own,
unregistered grid, so it cannot be a channel of the CT label map.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medssl.data.convert.base import CaseData, Plan, SourceCase, inside, read_image, read_label, same_grid
from medssl.data.readers import Volume, read_itk_image
from medssl.errors import MedsslInputError, look_up_option

DESCRIPTION = "HaN-Seg organs at risk on CT; per-structure masks merged (smaller structure wins)"
REFERENCE = "https://han-seg2023.grand-challenge.org"

STRUCTURES = (
    "A_Carotid_L",
    "A_Carotid_R",
    "Arytenoid",
    "Bone_Mandible",
    "Brainstem",
    "BuccalMucosa",
    "Cavity_Oral",
    "Cochlea_L",
    "Cochlea_R",
    "Cricopharyngeus",
    "Esophagus_S",
    "Eye_AL",
    "Eye_AR",
    "Eye_PL",
    "Eye_PR",
    "Glnd_Lacrimal_L",
    "Glnd_Lacrimal_R",
    "Glnd_Submand_L",
    "Glnd_Submand_R",
    "Glnd_Thyroid",
    "Glottis",
    "Larynx_SG",
    "Lips",
    "OpticChiasm",
    "OpticNrv_L",
    "OpticNrv_R",
    "Parotid_L",
    "Parotid_R",
    "Pituitary",
    "SpinalCord",
)
LABELS = {"background": 0, **{name: i for i, name in enumerate(STRUCTURES, start=1)}}
_CASE = re.compile(r"^case_\d+$")


def _case_folders(src: Path) -> list[Path]:
    """Case folders in SRC, or one level down (``HaN-Seg/set_1/case_01``)."""
    found = [p for p in src.iterdir() if p.is_dir() and _CASE.match(p.name)]
    if not found:
        found = [c for p in src.iterdir() if p.is_dir() for c in p.iterdir() if c.is_dir() and _CASE.match(c.name)]
    return sorted(found)


def _on_ct_grid(mask: Volume, ct_path: Path, ct: Volume) -> np.ndarray:
    if same_grid(ct, mask):
        return mask.array > 0
    reference = read_itk_image(ct_path)
    moving = read_itk_image(mask.source)
    if moving.GetNumberOfComponentsPerPixel() > 1 or moving.GetDimension() != 3:
        raise MedsslInputError(mask.source, "mask is not a single 3D binary segment")
    resampled = sitk.Resample(moving, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    array = sitk.GetArrayFromImage(resampled).transpose(2, 1, 0)  # ITK (k, j, i) to the readers' (i, j, k)
    if array.shape != ct.shape:
        raise MedsslInputError(mask.source, f"resampled mask shape {array.shape} differs from the CT's {ct.shape}")
    return array > 0


def merge_masks(ct: Volume, ct_path: Path, masks: dict[str, Path]) -> tuple[np.ndarray, int]:
    """One label map from per-structure masks (the overlap rule of the module docstring); overlap voxels."""
    binary = {name: _on_ct_grid(read_label(path), ct_path, ct) for name, path in masks.items()}
    label = np.zeros(ct.shape, dtype=np.uint8)
    counts = np.zeros(ct.shape, dtype=np.uint8)
    # Paint largest first, so each smaller structure overwrites the larger ones where they overlap.
    order = sorted(binary, key=lambda name: (-int(binary[name].sum()), -LABELS[name]))
    for name in order:
        label[binary[name]] = LABELS[name]
        counts += binary[name]
    return label, int(np.count_nonzero(counts > 1))


def plan(src: Path) -> Plan:
    folders = _case_folders(src)
    if not folders:
        raise MedsslInputError(src, "no HaN-Seg case_XX folders found (in SRC or one level down)")
    cases = []
    for folder in folders:
        ct_path = folder / f"{folder.name}_IMG_CT.nrrd"
        if not ct_path.is_file():
            raise MedsslInputError(ct_path, "missing HaN-Seg CT")
        prefix, suffix = f"{folder.name}_OAR_", ".seg.nrrd"
        masks: dict[str, Path] = {}
        for path in sorted(folder.glob(f"{prefix}*{suffix}")):
            structure = path.name[len(prefix) : -len(suffix)]
            if structure not in LABELS or structure == "background":
                look_up_option("HaN-Seg structure", structure, STRUCTURES, source=path)
            masks[structure] = inside(src, path)
        if not masks:
            raise MedsslInputError(folder, f"no {prefix}<Structure>{suffix} masks")
        inside(src, ct_path)

        def read(ct_path: Path = ct_path, masks: dict[str, Path] = masks) -> CaseData:
            ct = read_image(ct_path)
            label, overlap = merge_masks(ct, ct_path, masks)
            return CaseData(
                channels=[ct],
                label=Volume(array=label, affine=ct.affine, source=ct_path),
                notes={"overlap_voxels": overlap, "structures": sorted(masks)},
            )

        cases.append(SourceCase(case_id=folder.name, sources=[ct_path, *masks.values()], read=read))
    return Plan(
        name="HaN-Seg",
        channel_names=["CT"],
        labels=LABELS,
        cases=cases,
    )
