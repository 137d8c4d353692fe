"""``medssl data convert KIND SRC --out DIR``: public datasets as they ship → the nnU-Net v2 raw layout.

One module per dataset turns its own layout into a :class:`~medssl.data.convert.base.Plan`;
:func:`~medssl.data.convert.writer.write_nnunet` writes every plan the same way (resumable, atomic,
bound to its source).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from medssl.data.convert import amos, brats, btcv, hanseg, kits, msd
from medssl.data.convert.base import Plan, check_label_style
from medssl.data.convert.writer import ConvertSummary, write_nnunet
from medssl.errors import MedsslInputError, unknown_name_message

# kind → (plan builder, one-line description of what it expects)
CONVERTERS: dict[str, tuple[Callable[..., Plan], str]] = {
    "btcv": (btcv.plan, "BTCV RawData: Training/img/imgNNNN.nii.gz + Training/label/labelNNNN.nii.gz"),
    "amos": (amos.plan, "AMOS22: dataset.json 'training' list; --modality ct (ids <= 500) or mri (> 500)"),
    "kits": (kits.plan, "KiTS19/21/23: case_XXXXX/imaging.nii.gz + segmentation.nii.gz"),
    "brats": (brats.plan, "BraTS: <case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz"),
    "hanseg": (hanseg.plan, "HaN-Seg: case_XX/case_XX_IMG_CT.nrrd + case_XX_OAR_<Structure>.seg.nrrd"),
    "msd": (msd.plan, "MSD TaskXX_Name: dataset.json + imagesTr (3D or 4D) + labelsTr"),
}
MODALITY_KINDS = {"amos"}  # datasets that hold both CT and MRI and need --modality
REGION_KINDS = {"brats", "kits"}  # nnU-Net converts these with regions (Dataset137, Dataset220)


def convert_dataset(
    kind: str,
    src: str | Path,
    out: str | Path,
    modality: str | None = None,
    progress: Callable[[str], None] | None = None,
    label_style: str | None = None,
) -> ConvertSummary:
    """Convert the dataset ``kind`` in ``src`` into an nnU-Net v2 raw folder ``out`` (resumes a partial one).

    ``label_style`` (BraTS, KiTS): ``"regions"`` (default, as nnU-Net) or ``"plain"`` labels.
    """
    kind = kind.lower()
    src, out = Path(src), Path(out)
    if kind not in CONVERTERS:
        raise MedsslInputError(None, unknown_name_message("dataset kind", kind, CONVERTERS))
    if not src.is_dir():
        raise MedsslInputError(src, "not a folder")
    if modality is not None and kind not in MODALITY_KINDS:
        raise MedsslInputError(None, f"--modality applies to {', '.join(sorted(MODALITY_KINDS))} only, not {kind}")
    label_style = check_label_style(kind, label_style, REGION_KINDS)
    options: dict[str, str] = {}
    if kind in MODALITY_KINDS:
        modality = options["modality"] = modality or "ct"
    if label_style is not None:
        options["labels"] = label_style
    build, _ = CONVERTERS[kind]
    plan = build(src, **options)
    return write_nnunet(plan, kind, src, out, options, progress=progress)


__all__ = ["CONVERTERS", "REGION_KINDS", "ConvertSummary", "convert_dataset"]
