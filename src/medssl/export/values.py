"""Every value a bundle states, validated to its type before it is written.

A MONAI bundle config is code: ``python -m monai.bundle run`` evaluates every string that begins with
``$`` as Python, resolves ``@`` as a reference and ``%`` as a macro that reads another file, in
``configs/inference.json`` and in ``configs/metadata.json`` (read into the same parser as ``_meta_``).
A checkpoint and a run directory are untrusted input, so no string of theirs is ever carried into a
bundle. What reaches a bundle, and how each value is checked:

=========================  ===========================================  ===================================
value                      from                                         checked as
=========================  ===========================================  ===================================
orientation                ``best.pt`` meta ``preprocess.orientation``  three axis letters (``RAS``, ...)
spacing                    ``best.pt`` meta ``preprocess.spacing``      three finite positive numbers
CT window, MRI percentiles ``best.pt`` meta ``preprocess``              two finite numbers each
network                    ``best.pt`` meta ``encoder``, ``norm``,      ``EncoderConfig`` (ints, presets),
                           ``out_channels``, ``crop_size``              norm enum, ints, crop a multiple of 32
label names                ``best.pt`` meta ``labels``                  label names: a letter or digit,
                                                                        then letters, digits, space, ``_.-+()``
modality                   ``results.json``                             ``ct`` or ``mri``
sliding window             the run's ``config.yaml``                    ``FinetuneConfig`` (int, float)
method, family, task       ``best.pt`` meta, ``results.json``           names: letters, digits, ``_.+-``
budget, seed, step         ``results.json``, ``best.pt`` meta           ``all`` or ints
Dice (mean, per label)     ``results.json`` ``cases``                   finite numbers in [0, 1]
tensors                    ``best.pt`` / ``encoder.pt``                 present, shaped, finite floats
=========================  ===========================================  ===================================

Anything else in the checkpoint or the run directory (paths, free text, per-case rows) is left out.
Finally :func:`check_inert` walks both documents: a string that begins with ``$``, ``@`` or ``%`` and
is not one of the exporter's own expressions refuses the export (exit 2, naming the field).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationError

from medssl.config import CropSize, EncoderConfig, PreprocessConfig, StrictModel, format_validation_error
from medssl.errors import MedsslInputError

EXPRESSION_STARTS = ("$", "@", "%")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.+()-]{0,63}")
_TITLE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.,+()/~*'-]{0,127}")


def _matching(pattern: re.Pattern[str], what: str) -> Any:
    def check(v: str) -> str:
        if not pattern.fullmatch(v):
            raise ValueError(f"{v[:60]!r} is not {what}")
        return v

    return AfterValidator(check)


Name = Annotated[str, _matching(_NAME, "a plain name (a letter or digit, then letters, digits, '_.+-')")]
LabelName = Annotated[
    str, _matching(_LABEL, "a label name (a letter or digit, then letters, digits, spaces or '_.+-()', at most 64)")
]
Title = Annotated[str, _matching(_TITLE, "a plain title (a letter or digit, then letters, digits, spaces, '_.,+-()/')")]
Dice = Annotated[float, Field(ge=0.0, le=1.0)]


class BundleNetwork(StrictModel):
    """What builds the network: MONAI ``SwinUNETR`` arguments, all typed."""

    encoder: EncoderConfig
    out_channels: int = Field(ge=2, le=100_000)
    crop_size: CropSize
    norm: Literal["auto", "instance", "group", "batch"] = "instance"


class CheckpointValues(StrictModel):
    """The values of a fine-tuned segmenter's ``best.pt`` metadata that its bundle writes."""

    network: BundleNetwork
    preprocess: PreprocessConfig
    labels: dict[int, LabelName]
    method: Name
    family: Name
    task: Title
    step: int | None = Field(None, ge=0)
    val_dice: Dice | None = None
    run_id: Name | None = None
    code_version: Title | None = None


class RunValues(StrictModel):
    """The values of the run's ``results.json`` that a segmenter bundle writes."""

    modality: Literal["ct", "mri"]
    budget: Literal["all"] | int
    seed: int = Field(ge=0)
    mean_dice: Dice | None = None
    per_structure_dice: dict[LabelName, Dice] = Field(default_factory=dict)


class SegmenterValues(StrictModel):
    """Every value of a fine-tuned run that a segmenter bundle writes (sliding window from its config.yaml)."""

    checkpoint: CheckpointValues
    run: RunValues
    sw_batch_size: int = Field(ge=1, le=4096)
    sw_overlap: float = Field(ge=0.0, lt=1.0)

    @property
    def network(self) -> BundleNetwork:
        return self.checkpoint.network

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.checkpoint.preprocess

    @property
    def modality(self) -> str:
        return self.run.modality


class EncoderValues(StrictModel):
    """Every value of an encoder checkpoint that an encoder bundle writes."""

    encoder: EncoderConfig
    method: Name
    family: Name
    steps: int = Field(0, ge=0)
    preprocess: PreprocessConfig | None = None  # the pretraining spacing/intensity, when recorded
    crop_size: int | None = Field(None, ge=1)
    run_id: Name | None = None
    exported_network: Name | None = None
    source_layout: Title | None = None
    source_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")


def validated(model: type[StrictModel], data: dict[str, Any], source: str | Path) -> Any:
    """``model`` from ``data``, or one line naming the file and the first fields that are wrong (exit 2)."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise MedsslInputError(source, f"cannot go into a bundle: {format_validation_error(err)[:400]}") from None


def mean_dice(rows: Iterable[Any], source: str | Path) -> tuple[float | None, dict[str, float]]:
    """Mean over test cases of each case's mean Dice, and the mean per structure, from ``results.json``'s
    ``cases`` rows; a Dice outside [0, 1] or not finite is refused (it cannot come from a real run)."""
    per_case: dict[str, list[float]] = {}
    per_structure: dict[str, list[float]] = {}
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or row.get("dice") is None:
            continue
        value = row["dice"]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise MedsslInputError(source, f"cases[{index}].dice is {str(value)[:40]!r}, not a finite number")
        if not 0.0 <= float(value) <= 1.0:
            raise MedsslInputError(source, f"cases[{index}].dice is {value}, outside [0, 1]")
        per_case.setdefault(str(row.get("case")), []).append(float(value))
        per_structure.setdefault(str(row.get("structure")), []).append(float(value))
    cases = [sum(v) / len(v) for v in per_case.values()]
    return (sum(cases) / len(cases) if cases else None), {s: sum(v) / len(v) for s, v in per_structure.items()}


def check_inert(document: Any, source: str | Path, allowed: frozenset[str], where: str = "") -> None:
    """Refuse a document in which a string outside ``allowed`` (the exporter's own expressions) would be
    evaluated, referenced or expanded by MONAI's config parser."""
    if isinstance(document, dict):
        for key, value in document.items():
            if isinstance(key, str) and key.startswith(EXPRESSION_STARTS):
                raise MedsslInputError(source, f"bundle field {where}{key[:40]!r} would be a MONAI config reference")
            check_inert(value, source, allowed, f"{where}{key}.")
    elif isinstance(document, list | tuple):
        for index, value in enumerate(document):
            check_inert(value, source, allowed, f"{where}{index}.")
    elif isinstance(document, str) and document.startswith(EXPRESSION_STARTS) and document not in allowed:
        raise MedsslInputError(
            source, f"bundle field {where.rstrip('.')} = {document[:40]!r} would be a MONAI config expression"
        )
    elif isinstance(document, float) and not math.isfinite(document):
        raise MedsslInputError(source, f"bundle field {where.rstrip('.')} is {document}, not a finite number")
