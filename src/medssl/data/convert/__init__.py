"""``medssl data convert KIND SRC --out DIR``: public datasets as they ship → the nnU-Net v2 raw layout.

One module per dataset turns its own layout into a :class:`~medssl.data.convert.base.Plan`;
:func:`~medssl.data.convert.writer.write_nnunet` writes every plan the same way (resumable, atomic,
bound to its source).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from medssl.data.convert import amos, brats, btcv, hanseg, kits, msd
from medssl.data.convert.base import check_label_style
from medssl.data.convert.writer import ConvertSummary, write_nnunet
from medssl.errors import MedsslInputError, look_up_option

# kind → its module: ``plan(src, **options)``, and the DESCRIPTION and REFERENCE of what it converts
# (its docstring documents the layout it expects)
CONVERTERS: dict[str, ModuleType] = {
    "btcv": btcv,
    "amos": amos,
    "kits": kits,
    "brats": brats,
    "hanseg": hanseg,
    "msd": msd,
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
    look_up_option("dataset kind", kind, CONVERTERS)
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
    converter = CONVERTERS[kind]
    plan = converter.plan(src, **options)
    plan = dataclasses.replace(
        plan, description=plan.description or converter.DESCRIPTION, reference=plan.reference or converter.REFERENCE
    )
    return write_nnunet(plan, kind, src, out, options, progress=progress)


__all__ = ["CONVERTERS", "REGION_KINDS", "ConvertSummary", "convert_dataset"]
