"""AMOS22 (abdominal multi-organ, CT and MRI) as it ships (zenodo record 7262581)::

    amos22/dataset.json   {"labels": {"0": "background", "1": "spleen", ...15 organs},
                           "training": [{"image": "./imagesTr/amos_0001.nii.gz",
                                         "label": "./labelsTr/amos_0001.nii.gz"}, ...], ...}
    amos22/imagesTr/amos_XXXX.nii.gz, amos22/labelsTr/amos_XXXX.nii.gz

The AMOS22 documentation numbers CT scans 0001-0500 and MRI scans 0501-0600; one task must not mix
them, so ``--modality ct`` converts the ``training`` entries with id <= 500 and ``--modality mri`` those
above (nnU-Net's ``Dataset218_Amos2022_task1.py`` takes the same CT ids). Only the ``training`` list is
converted (nnU-Net adds the post-challenge ``validation`` cases as training cases; medssl keeps them out
so the split stays the one AMOS published). Every listed path must stay inside SRC.
"""

from __future__ import annotations

import re
from pathlib import Path

from medssl.data.convert.base import (
    Plan,
    SourceCase,
    image_and_label,
    msd_labels,
    read_json,
    required_file,
    training_pairs,
)
from medssl.errors import MedsslInputError

DESCRIPTION = "AMOS22 training cases of one modality, converted from its dataset.json"
REFERENCE = "https://amos22.grand-challenge.org"

LAST_CT_ID = 500
_CASE = re.compile(r"^(amos_(\d+))\.nii(\.gz)?$")


def plan(src: Path, modality: str = "ct") -> Plan:
    listing = src / "dataset.json"
    data = read_json(src, listing)
    labels = msd_labels(data.get("labels"), listing)
    cases = []
    for where, image, label in training_pairs(src, listing, data):
        match = _CASE.match(image.name)
        if match is None:
            raise MedsslInputError(listing, f"{where}.image {image.name!r} is not named amos_NNNN.nii.gz")
        if (int(match[2]) <= LAST_CT_ID) != (modality == "ct"):
            continue
        required_file(src, image, "AMOS image")
        required_file(src, label, "AMOS label")
        cases.append(SourceCase(case_id=match[1], sources=[image, label], read=image_and_label(image, label)))
    if not cases:
        raise MedsslInputError(
            listing, f"no {modality.upper()} cases in 'training' (CT ids <= {LAST_CT_ID}, MRI ids > {LAST_CT_ID})"
        )
    return Plan(
        name=f"AMOS_{modality.upper()}",
        channel_names=["CT" if modality == "ct" else "MRI"],
        labels=labels,
        cases=cases,
        description=f"AMOS22 {modality.upper()} training cases, converted from its dataset.json",
    )
