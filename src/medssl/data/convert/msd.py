"""Medical Segmentation Decathlon ``TaskXX_Name`` folders as they ship::

    Task01_BrainTumour/dataset.json  {"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
                                      "labels": {"0": "background", ...},
                                      "training": [{"image": "./imagesTr/BRATS_001.nii.gz",
                                                    "label": "./labelsTr/BRATS_001.nii.gz"}, ...]}
    imagesTr/<case>.nii.gz   3D, or 4D with the modalities along the fourth axis
    labelsTr/<case>.nii.gz

As nnU-Net's ``convert_MSD_dataset.py`` (``split_4d_nifti``): a 4D image becomes one 3D file per
channel, ``_0000`` .. in ``modality`` order; ``modality`` becomes ``channel_names`` and labels become
name → value. An image must hold exactly the channels ``modality`` declares (a 4D image with one more
is refused, never cut), and a case listed twice is refused. Departure: cases come from the
``training`` list (each path must stay inside SRC), not a glob of imagesTr, so the archives' macOS
``._*`` files never enter, and labels are re-written (values checked against ``labels``) rather than
copied.
"""

from __future__ import annotations

import re
from pathlib import Path

from medssl.data.convert.base import (
    CaseData,
    Plan,
    SourceCase,
    msd_labels,
    read_json,
    read_label,
    required_file,
    training_pairs,
)
from medssl.data.readers import read_channels
from medssl.errors import MedsslInputError

DESCRIPTION = "Medical Segmentation Decathlon task, 4D images split into channels"
REFERENCE = "http://medicaldecathlon.com"

_TASK = re.compile(r"^Task(\d+)_(.+)$")


def _channel_names(raw: object, listing: Path) -> list[str]:
    if not isinstance(raw, dict) or not raw or sorted(map(str, raw)) != [str(i) for i in range(len(raw))]:
        raise MedsslInputError(listing, '\'modality\' must map channel numbers 0..N-1 to names, like {"0": "CT"}')
    return [str(raw[str(i)]) for i in range(len(raw))]


def plan(src: Path) -> Plan:
    listing = src / "dataset.json"
    data = read_json(src, listing)
    channel_names = _channel_names(data.get("modality"), listing)
    labels = msd_labels(data.get("labels"), listing)
    cases = []
    for _, image, label in training_pairs(src, listing, data):
        required_file(src, image, "MSD image")
        required_file(src, label, "MSD label")

        def read(image: Path = image, label: Path = label, n: int = len(channel_names)) -> CaseData:
            # every channel the 4D file holds, and exactly as many as 'modality' declares
            return CaseData(channels=read_channels(image, n), label=read_label(label))

        case_id = image.name.removesuffix(".gz").removesuffix(".nii")
        cases.append(SourceCase(case_id=case_id, sources=[image, label], read=read))
    match = _TASK.match(src.resolve().name)
    name = str(data.get("name") or (match[2] if match else src.name))
    return Plan(
        name=name,
        channel_names=channel_names,
        labels=labels,
        cases=cases,
        description=f"Medical Segmentation Decathlon {src.resolve().name}, 4D images split into channels",
        reference=str(data.get("reference") or REFERENCE),
    )
