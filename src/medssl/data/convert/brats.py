"""BraTS (2018-2021 naming) as it ships: one folder per case, four MRI sequences and a segmentation::

    BraTS2021_00000/BraTS2021_00000_t1.nii.gz, _t1ce, _t2, _flair, _seg.nii.gz
    seg labels: 0 background, 1 necrotic / non-enhancing tumour core, 2 peritumoral edema, 4 enhancing tumour

Channels and labels follow nnU-Net's ``Dataset137_BraTS21.py``
(``copy_BraTS_segmentation_and_convert_labels_to_nnUNet``): channels T1, T1ce, T2, Flair as
``_0000``..``_0003``; labels made contiguous as 4 → 3, 2 → 1, 1 → 2, so 1 edema, 2 necrotic core,
3 enhancing tumour; any other value is bad input. ``--labels regions`` (the default) declares
nnU-Net's regions, whole tumor (1, 2, 3), tumor core (2, 3) and enhancing tumor (3) with
``regions_class_order`` (1, 2, 3), which are what BraTS scores; ``--labels plain`` declares the three
classes instead (edema, necrotic_core, enhancing_tumor). The label maps are the same either way.
"""

from __future__ import annotations

from pathlib import Path

from medssl.data.convert.base import CaseData, Plan, SourceCase, inside, read_image, read_label, remap
from medssl.data.regions import Regions
from medssl.errors import MedsslInputError

DESCRIPTION = "BraTS glioma segmentation; labels as nnU-Net Dataset137 (4->3, 2->1, 1->2)"
REFERENCE = "https://www.synapse.org/#!Synapse:syn25829067/wiki/610863"

SEQUENCES = ("t1", "t1ce", "t2", "flair")
CHANNEL_NAMES = ["T1", "T1ce", "T2", "Flair"]
LABEL_MAP = {0: 0, 1: 2, 2: 1, 4: 3}
LABELS = {"background": 0, "edema": 1, "necrotic_core": 2, "enhancing_tumor": 3}
REGIONS = Regions(
    names=("whole tumor", "tumor core", "enhancing tumor"), labels=((1, 2, 3), (2, 3), (3,)), class_order=(1, 2, 3)
)


def plan(src: Path, labels: str = "regions") -> Plan:
    folders = sorted(p for p in src.iterdir() if p.is_dir() and (p / f"{p.name}_seg.nii.gz").exists())
    if not folders:
        raise MedsslInputError(src, "no BraTS case folders (<case>/<case>_seg.nii.gz) found")
    cases = []
    for folder in folders:
        files = [folder / f"{folder.name}_{s}.nii.gz" for s in SEQUENCES]
        label = folder / f"{folder.name}_seg.nii.gz"
        for path, sequence in zip(files, SEQUENCES, strict=True):
            if not path.is_file():
                raise MedsslInputError(path, f"missing BraTS {sequence} image")
        for path in [*files, label]:
            inside(src, path)

        def read(files: list[Path] = files, label: Path = label) -> CaseData:
            return CaseData(channels=[read_image(p) for p in files], label=remap(read_label(label), LABEL_MAP))

        cases.append(SourceCase(case_id=folder.name, sources=[*files, label], read=read))
    return Plan(
        name="BraTS",
        channel_names=CHANNEL_NAMES,
        labels=LABELS,
        regions=REGIONS if labels == "regions" else None,
        cases=cases,
    )
