"""KiTS19 / KiTS21 / KiTS23 (kidney tumour CT) as their repositories ship them::

    case_00000/imaging.nii.gz
    case_00000/segmentation.nii.gz          KiTS19, KiTS23 (KiTS21: aggregated_MAJ_seg.nii.gz)
    labels: 0 background, 1 kidney, 2 tumor, 3 cyst (KiTS21/23 only)

Cases without a segmentation (KiTS19's test cases 210-299) are listed as skipped. The label maps are
copied as they are. ``--labels regions`` (the default) declares nnU-Net's ``Dataset220_KiTS2023.py``
regions: kidney (1, 2, 3: kidney and masses), masses (2, 3) and tumor (2), ``regions_class_order``
(1, 3, 2); without a cyst in any case (KiTS19) masses would repeat tumor, so the regions are kidney
(1, 2) and tumor (2). ``--labels plain`` declares the classes instead: kidney, tumor, and cyst when a
converted case contains it.
"""

from __future__ import annotations

import re
from pathlib import Path

from medssl.data.convert.base import Plan, SourceCase, image_and_label, inside
from medssl.data.regions import Regions
from medssl.errors import MedsslInputError

DESCRIPTION = "KiTS kidney tumour segmentation, converted from case folders"
REFERENCE = "https://kits-challenge.org"

LABELS = {"background": 0, "kidney": 1, "tumor": 2}
OPTIONAL = {"cyst": 3}
REGIONS = Regions(names=("kidney", "masses", "tumor"), labels=((1, 2, 3), (2, 3), (2,)), class_order=(1, 3, 2))
SEGMENTATION_NAMES = ("segmentation.nii.gz", "aggregated_MAJ_seg.nii.gz")
_CASE = re.compile(r"^case_\d{5}$")


def plan(src: Path, labels: str = "regions") -> Plan:
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
        cases.append(SourceCase(case_id=folder.name, sources=[image, label], read=image_and_label(image, label)))
    return Plan(
        name="KiTS",
        channel_names=["CT"],
        labels=LABELS,
        optional_labels=OPTIONAL,
        regions=REGIONS if labels == "regions" else None,
        cases=cases,
        skipped=skipped,
    )
