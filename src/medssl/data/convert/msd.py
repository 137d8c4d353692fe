"""Medical Segmentation Decathlon ``TaskXX_Name`` folders as they ship::

    Task01_BrainTumour/dataset.json  {"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
                                      "labels": {"0": "background", ...},
                                      "training": [{"image": "./imagesTr/BRATS_001.nii.gz",
                                                    "label": "./labelsTr/BRATS_001.nii.gz"}, ...]}
    imagesTr/<case>.nii.gz   3D, or 4D with the modalities along the fourth axis
    labelsTr/<case>.nii.gz

As nnU-Net's ``convert_MSD_dataset.py`` (``split_4d_nifti``): a 4D image becomes one 3D file per
channel, ``_0000`` .. in ``modality`` order; ``modality`` becomes ``channel_names`` and labels become
name → value. Departure: cases come from the ``training`` list (each path must stay inside SRC), not a
glob of imagesTr, so the archives' macOS ``._*`` files never enter, and labels are re-written (values
checked against ``labels``) rather than copied.
"""

from __future__ import annotations

import re
from pathlib import Path

from medssl.data.convert.base import (
    CaseData,
    Plan,
    SourceCase,
    listed_path,
    msd_labels,
    read_image,
    read_json,
    read_label,
    required_file,
)
from medssl.errors import MedsslInputError

_TASK = re.compile(r"^Task(\d+)_(.+)$")


def plan(src: Path, modality: str | None = None) -> Plan:
    listing = src / "dataset.json"
    data = read_json(listing)
    raw = data.get("modality")
    if not isinstance(raw, dict) or sorted(map(str, raw)) != [str(i) for i in range(len(raw))] or not raw:
        raise MedsslInputError(listing, '\'modality\' must map channel numbers 0..N-1 to names, like {"0": "CT"}')
    channel_names = [str(raw[str(i)]) for i in range(len(raw))]
    labels = msd_labels(data.get("labels"), listing)
    training = data.get("training")
    if not isinstance(training, list) or not training:
        raise MedsslInputError(listing, "missing 'training' list of image/label pairs")
    cases = []
    for index, entry in enumerate(training):
        where = f"training[{index}]"
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise MedsslInputError(listing, f"{where} needs 'image' and 'label'")
        image = required_file(src, listed_path(src, entry["image"], listing, f"{where}.image"), "MSD image")
        label = required_file(src, listed_path(src, entry["label"], listing, f"{where}.label"), "MSD label")
        case_id = image.name.removesuffix(".gz").removesuffix(".nii")
        n = len(channel_names)

        def read(image: Path = image, label: Path = label, n: int = n) -> CaseData:
            channels = [read_image(image, channel=c if n > 1 else None) for c in range(n)]
            return CaseData(channels=channels, label=read_label(label))

        cases.append(SourceCase(case_id=case_id, sources=[image, label], read=read))
    match = _TASK.match(src.resolve().name)
    name = str(data.get("name") or (match[2] if match else src.name))
    return Plan(
        name=name,
        channel_names=channel_names,
        labels=labels,
        cases=cases,
        description=f"Medical Segmentation Decathlon {src.resolve().name}, 4D images split into channels",
        reference=str(data.get("reference", "http://medicaldecathlon.com")),
    )
