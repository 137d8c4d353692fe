"""BTCV (Synapse "Multi-Atlas Labeling Beyond the Cranial Vault", abdomen) as it ships in ``RawData.zip``::

    RawData/Training/img/img0001.nii.gz      CT
    RawData/Training/label/label0001.nii.gz  0 background, 1..13 organs

Label names are those of the SwinUNETR BTCV ``dataset_0.json`` (MONAI research-contributions,
``SwinUNETR/BTCV``): spleen, rkid, lkid, gall, eso, liver, sto, aorta, IVC, veins, pancreas, rad, lad.
SRC may be the folder holding ``RawData``, ``RawData`` itself, or its ``Training`` folder. The
``Testing`` images have no labels and are not converted.
"""

from __future__ import annotations

import re
from pathlib import Path

from medssl.data.convert.base import Plan, SourceCase, image_and_label, inside, required_file
from medssl.errors import MedsslInputError

DESCRIPTION = "BTCV abdomen (Synapse multi-atlas labeling), converted from RawData"
REFERENCE = "https://www.synapse.org/#!Synapse:syn3193805"

LABELS = {
    "background": 0,
    "spleen": 1,
    "rkid": 2,
    "lkid": 3,
    "gall": 4,
    "eso": 5,
    "liver": 6,
    "sto": 7,
    "aorta": 8,
    "IVC": 9,
    "veins": 10,
    "pancreas": 11,
    "rad": 12,
    "lad": 13,
}
_IMAGE = re.compile(r"^img(\d+)\.nii(\.gz)?$")


def _training_folder(src: Path) -> Path:
    for candidate in (src / "RawData" / "Training", src / "Training", src):
        if (candidate / "img").is_dir() and (candidate / "label").is_dir():
            return inside(src, candidate)
    raise MedsslInputError(src, "no BTCV Training/img and Training/label folders (RawData layout) found")


def plan(src: Path) -> Plan:
    training = _training_folder(src)
    cases = []
    for image in sorted((training / "img").iterdir()):
        match = _IMAGE.match(image.name)
        if match is None:
            continue
        label = training / "label" / image.name.replace("img", "label", 1)
        required_file(src, image, "BTCV image")
        required_file(src, label, f"BTCV label of {image.name}")
        cases.append(SourceCase(case_id=f"btcv_{match[1]}", sources=[image, label], read=image_and_label(image, label)))
    if not cases:
        raise MedsslInputError(training / "img", "no imgNNNN.nii.gz files")
    return Plan(
        name="BTCV",
        channel_names=["CT"],
        labels=LABELS,
        cases=cases,
    )
