"""``medssl data convert KIND SRC --out DIR``: public datasets as they ship → the nnU-Net v2 raw layout.

One module per dataset turns its own layout into a :class:`~medssl.data.convert.base.Plan`;
:func:`~medssl.data.convert.base.write_nnunet` writes every plan the same way (resumable, atomic).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from medssl.data.convert import amos, brats, btcv, hanseg, kits, msd
from medssl.data.convert.base import ConvertSummary, Plan, write_nnunet
from medssl.errors import MedsslInputError, look_up_option

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


def convert_dataset(
    kind: str,
    src: str | Path,
    out: str | Path,
    modality: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> ConvertSummary:
    """Convert the dataset ``kind`` in ``src`` into an nnU-Net v2 raw folder ``out`` (resumes a partial one)."""
    kind = kind.lower()
    src, out = Path(src), Path(out)
    look_up_option("dataset kind", kind, CONVERTERS)
    if not src.is_dir():
        raise MedsslInputError(src, "not a folder")
    if modality is not None and kind not in MODALITY_KINDS:
        raise MedsslInputError(None, f"--modality applies to {', '.join(sorted(MODALITY_KINDS))} only, not {kind}")
    if kind in MODALITY_KINDS:
        modality = modality or "ct"
    build, _ = CONVERTERS[kind]
    plan = build(src, modality=modality)
    options = {"modality": modality} if kind in MODALITY_KINDS else {}
    return write_nnunet(plan, kind, src, out, options, progress=progress)


__all__ = ["CONVERTERS", "ConvertSummary", "convert_dataset"]
