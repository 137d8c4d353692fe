"""KiTS19 / KiTS21 / KiTS23 (kidney tumour CT) as their repositories ship them::

    case_00000/imaging.nii.gz
    case_00000/segmentation.nii.gz          KiTS19, KiTS23 (KiTS21: aggregated_MAJ_seg.nii.gz)
    labels: 0 background, 1 kidney, 2 tumor, 3 cyst (KiTS21/23 only)

Cases without a segmentation (KiTS19's test cases 210-299) are listed as skipped. ``cyst`` is declared
in dataset.json only when a converted case contains it, so KiTS19 gets {kidney, tumor}. nnU-Net's
``Dataset220_KiTS2023.py`` declares the same values as regions (kidney+masses, masses, tumor); medssl
trains on the plain label map, so the plain labels are declared.
"""

from __future__ import annotations

import re
from pathlib import Path

from medssl.data.convert.base import CaseData, Plan, SourceCase, inside, read_image, read_label
from medssl.errors import MedsslInputError

LABELS = {"background": 0, "kidney": 1, "tumor": 2}
OPTIONAL = {"cyst": 3}
SEGMENTATION_NAMES = ("segmentation.nii.gz", "aggregated_MAJ_seg.nii.gz")
_CASE = re.compile(r"^case_\d{5}$")


def plan(src: Path, modality: str | None = None) -> Plan:
    # SRC is the folder of case_XXXXX folders or the repository root holding data/ (KiTS19/21) or dataset/ (23).
    root = next(
        (
            p
            for p in (src, src / "data", src / "dataset", src / "kits21" / "data")
            if p.is_dir() and any(_CASE.match(c.name) for c in p.iterdir())
        ),
        None,
    )
    if root is None:
        raise MedsslInputError(src, "no KiTS case_XXXXX folders found")
    inside(src, root)
    cases, skipped = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and _CASE.match(p.name)):
        image = folder / "imaging.nii.gz"
        label = next((folder / n for n in SEGMENTATION_NAMES if (folder / n).is_file()), None)
        if not image.is_file():
            raise MedsslInputError(image, "missing KiTS image")
        if label is None:
            skipped.append(f"{folder.name}: no segmentation (unlabeled test case)")
            continue
        inside(src, image), inside(src, label)

        def read(image: Path = image, label: Path = label) -> CaseData:
            return CaseData(channels=[read_image(image)], label=read_label(label))

        cases.append(SourceCase(case_id=folder.name, sources=[image, label], read=read))
    return Plan(
        name="KiTS",
        channel_names=["CT"],
        labels=LABELS,
        optional_labels=OPTIONAL,
        cases=cases,
        skipped=skipped,
        description="KiTS kidney tumour segmentation, converted from case folders",
        reference="https://kits-challenge.org",
    )
