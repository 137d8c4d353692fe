"""Checkpoint files with metadata: writing them, reading them safely, and loading tensors strictly.

An encoder checkpoint is ``{"encoder": state_dict, "meta": {...}}``, a fine-tuned segmenter
``{"model": state_dict, "meta": {...}}``. Both are read with ``torch.load(weights_only=True)``
because a pickle is code, and their metadata is validated to its types before anything is built
from it (an orientation is three axis letters, a spacing three finite positive numbers, the encoder
a valid config whose size is within ``limits.model_bytes``). Loading reports how many encoder
tensors it took and fails when any is missing: a silently half-loaded encoder would make a
pretrained model look like random init.

This module knows medssl's own format only; :mod:`medssl.models.foreign` reads other layouts and
:mod:`medssl.models.load` picks between the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor, nn

from medssl.config import CropSize, EncoderConfig, PreprocessConfig, format_validation_error
from medssl.errors import MedsslInputError
from medssl.fileio import atomic_path
from medssl.models.encoder import SwinEncoder
from medssl.models.segmenter import SwinSegmenter
from medssl.models.size import check_network_size
from medssl.version import code_version

REQUIRED_META = ("method", "family", "encoder")
SWIN_PREFIX = "swinViT."


@dataclass
class LoadReport:
    """What loading an encoder state took: counts and the names of anything left out."""

    loaded: int
    expected: int
    missing: list[str]
    unexpected: list[str]

    def summary(self) -> str:
        return f"loaded {self.loaded}/{self.expected} encoder tensors"


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """Save through a temporary file and rename, so a crash never leaves a truncated file. Written
    through a Python file object: a full disk then raises ``OSError(ENOSPC)`` naming ``path``, not
    torch's "PytorchStreamWriter failed writing file"."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load`` with ``weights_only=True``; unreadable files raise a one-line input error."""
    path = Path(path)
    if not path.is_file():
        raise MedsslInputError(path, "checkpoint file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for corrupt files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MedsslInputError(path, f"not a readable checkpoint ({first[:160]})") from None


def encoder_meta(
    *,
    method: str,
    family: str,
    encoder: EncoderConfig,
    preprocess: dict[str, Any] | None = None,
    crop_size: int | None = None,
    steps: int = 0,
    config_hash: str | None = None,
    exported_network: str = "student",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Metadata stored with every encoder: enough to rebuild, preprocess and trace it.

    ``exported_network`` names the network of the method stored ("teacher" for DINO and iBOT,
    "student" -- the online network -- otherwise; see ``SSLMethod.encoder_for_export``).
    """
    pre = preprocess or {}
    meta = {
        "method": method,
        "family": family,
        "preset": encoder.preset,
        "encoder": encoder.model_dump(mode="json"),
        "in_channels": encoder.in_channels,
        "patch_size": encoder.patch_size,
        "window_size": encoder.window_size,
        "encoder_implementation": encoder.implementation,  # forward only; the state dict is MONAI's either way
        "spacing": list(pre.get("spacing", [])),
        "intensity": {k: v for k, v in pre.items() if k != "spacing"},
        "crop_size": crop_size,
        "steps": steps,
        "code_version": code_version(),
        "config_hash": config_hash,
        "exported_network": exported_network,
    }
    meta.update(extra or {})
    return meta


def save_encoder(path: str | Path, encoder: SwinEncoder, meta: dict[str, Any]) -> None:
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"encoder metadata lacks {missing}")
    state = {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}
    atomic_torch_save({"encoder": state, "meta": meta}, path)


# --------------------------------------------------------------------------- metadata


class _Meta(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, protected_namespaces=())


class EncoderMeta(_Meta):
    """The typed part of an encoder checkpoint's metadata (other keys are kept as provenance)."""

    method: str
    family: str
    encoder: EncoderConfig
    spacing: list[float] = Field(default_factory=list)  # the pretraining spacing ([] when unknown)
    intensity: dict[str, Any] = Field(default_factory=dict)  # orientation, CT window, MRI percentiles
    crop_size: int | None = None


class SegmenterMeta(_Meta):
    """The typed part of a fine-tuned segmenter's metadata: what rebuilds it and what a bundle states."""

    encoder: EncoderConfig
    out_channels: int = Field(ge=1)  # classes with background, or nnU-Net regions (one output each)
    crop_size: CropSize
    norm: Literal["auto", "instance", "group", "batch"]
    transformer: Literal["swin", "identity"] = "swin"  # "identity": the transformer->identity control
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    labels: dict[int, str] = Field(default_factory=dict)


def _validated(model: type[_Meta], meta: Any, path: str | Path, what: str) -> Any:
    if not isinstance(meta, dict):
        raise MedsslInputError(path, f"{what} metadata is a {type(meta).__name__}, not a mapping")
    try:
        return model.model_validate(meta)
    except ValidationError as err:
        if all(e["loc"][:1] == ("encoder",) for e in err.errors()):
            detail = format_validation_error(err, prefix="").removeprefix("encoder.")
            raise MedsslInputError(path, f"{what} encoder config is invalid: {detail[:300]}") from None
        raise MedsslInputError(path, f"{what} metadata is invalid: {format_validation_error(err)[:300]}") from None
    except (TypeError, ValueError) as err:  # odd values pydantic's validators raise on directly
        raise MedsslInputError(path, f"{what} metadata is invalid ({type(err).__name__}: {err})"[:300]) from None


def pretraining_preprocess(meta: EncoderMeta, path: str | Path) -> PreprocessConfig | None:
    """The preprocessing an encoder was pretrained with, validated (None when the metadata records none):
    a spacing that is not three finite positive numbers, or an orientation that is not three axis letters,
    is refused here, naming the file, instead of failing later."""
    data: dict[str, Any] = {k: v for k, v in meta.intensity.items() if k in PreprocessConfig.model_fields}
    if meta.spacing:
        data["spacing"] = meta.spacing
    if not data:
        return None
    try:
        return PreprocessConfig.model_validate(data)
    except ValidationError as err:
        raise MedsslInputError(
            path, f"encoder metadata 'spacing'/'intensity' is invalid: {format_validation_error(err)[:300]}"
        ) from None


def check_meta(path: str | Path, meta: Any) -> EncoderMeta:
    """Validate an encoder checkpoint's metadata: string method/family, a valid encoder config within
    ``limits.model_bytes``, and a numeric spacing and valid intensity settings when they are recorded."""
    if isinstance(meta, dict):
        lacking = [k for k in REQUIRED_META if k not in meta]
        if lacking:
            raise MedsslInputError(path, f"checkpoint metadata lacks {', '.join(lacking)}")
    typed: EncoderMeta = _validated(EncoderMeta, meta, path, "checkpoint")
    pretraining_preprocess(typed, path)
    check_network_size(typed.encoder, path)
    return typed


def check_tensor_values(source: str | Path, state: dict[str, Tensor], target: dict[str, Tensor]) -> None:
    """Each tensor the model takes as floating point must be floating point and finite: NaN weights
    would train to NaN losses and report a result for a model that never existed."""
    for key, expected in target.items():
        value = state[key]
        if expected.is_floating_point():
            if not value.is_floating_point():
                raise MedsslInputError(source, f"encoder tensor '{key}' is {value.dtype}, not floating point")
            if not bool(torch.isfinite(value).all()):
                n_bad = int((~torch.isfinite(value)).sum())
                raise MedsslInputError(source, f"encoder tensor '{key}' holds {n_bad} NaN/inf values")


def tensor_coverage(state: dict[str, Tensor], target: dict[str, Tensor], what: str = "encoder") -> str:
    """``present/expected <what> tensors``: how many of the tensors of ``target`` ``state`` holds."""
    return f"{len(set(target) & set(state))}/{len(target)} {what} tensors"


def check_state_matches(
    source: str | Path,
    state: dict[str, Tensor],
    target: dict[str, Tensor],
    what: str = "encoder",
    *,
    rebuilt_from_file: bool = False,
) -> None:
    """Every tensor of ``target`` present in ``state`` with its shape, floating point and finite.

    ``rebuilt_from_file``: ``target`` was rebuilt from the shapes of this very file (an external encoder), so a
    missing tensor is reported with the file's coverage, and a wrong shape as the file's own inconsistency rather
    than as a different encoder preset."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise MedsslInputError(source, f"the {what} weights are not a state dict of tensors")
    missing = sorted(set(target) - set(state))
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        holder, coverage = "checkpoint", ""
        if rebuilt_from_file:
            holder, coverage = f"external {what}", f" ({tensor_coverage(state, target, what)} present)"
        raise MedsslInputError(source, f"{holder} is missing {len(missing)} {what} tensors{coverage}: {shown}")
    mismatched = [k for k in target if tuple(target[k].shape) != tuple(state[k].shape)]
    if mismatched:
        k = mismatched[0]
        expects = f"the {what} rebuilt from this file expects" if rebuilt_from_file else "model expects"
        hint = "" if rebuilt_from_file else " (different encoder preset?)"
        raise MedsslInputError(
            source, f"{what} tensor '{k}' has shape {tuple(state[k].shape)}, {expects} {tuple(target[k].shape)}{hint}"
        )
    check_tensor_values(source, state, target)


def load_encoder_state(
    module: nn.Module, state: dict[str, Tensor], source: str | Path = "<state>", prefix: str = ""
) -> LoadReport:
    """Copy encoder tensors into ``module`` (keys under ``prefix``); fail if any is missing.

    ``module`` may be an encoder (``prefix=""``) or a segmenter (``prefix="swinViT."``). Keys of
    ``module`` outside the prefix (decoder) are not the encoder's concern and are left alone.
    """
    target = {k[len(prefix) :]: v for k, v in module.state_dict().items() if k.startswith(prefix)}
    check_state_matches(source, state, target)
    unexpected = sorted(set(state) - set(target))
    full = {prefix + k: state[k] for k in target}
    result = module.load_state_dict(full, strict=False)
    still_missing = [k for k in result.missing_keys if k.startswith(prefix)]
    if still_missing:  # defensive: should be impossible after the check above
        raise MedsslInputError(source, f"encoder tensors not loaded: {still_missing[:5]}")
    return LoadReport(loaded=len(target), expected=len(target), missing=[], unexpected=unexpected)


def save_segmenter(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """A fine-tuned segmenter: ``{"model": state_dict, "meta": {...}}``; meta must hold
    ``encoder`` (config dict), ``out_channels``, ``crop_size`` and ``norm``."""
    for key in ("encoder", "out_channels", "crop_size", "norm"):
        if key not in meta:
            raise ValueError(f"segmenter metadata lacks {key!r}")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    atomic_torch_save({"model": state, "meta": meta}, path)


def is_segmenter_payload(payload: Any) -> bool:
    return isinstance(payload, dict) and "model" in payload and isinstance(payload.get("meta"), dict)


def read_segmenter_meta(path: str | Path, payload: Any) -> SegmenterMeta:
    """The validated metadata of a segmenter payload (``{"model", "meta"}``), its size within the limit."""
    if not is_segmenter_payload(payload):
        raise MedsslInputError(path, "not a medssl segmenter checkpoint (needs 'model' and 'meta')")
    typed: SegmenterMeta = _validated(SegmenterMeta, payload["meta"], path, "segmenter")
    check_network_size(typed.encoder, path, typed.out_channels)
    return typed


def load_segmenter(path: str | Path) -> tuple[SwinSegmenter, dict[str, Any]]:
    """Rebuild a fine-tuned :class:`SwinSegmenter` and load every tensor (strict): a missing, mis-shaped,
    non-float or non-finite tensor is refused with one line naming the file and the tensor."""
    payload = safe_torch_load(path)
    typed = read_segmenter_meta(path, payload)
    model = SwinSegmenter(
        typed.encoder, typed.out_channels, crop_size=typed.crop_size, norm=typed.norm, transformer=typed.transformer
    )
    check_state_matches(path, payload["model"], model.state_dict(), what="segmenter")
    extra = sorted(set(payload["model"]) - set(model.state_dict()))
    if extra:
        raise MedsslInputError(path, f"segmenter weights hold {len(extra)} unexpected tensors: {', '.join(extra[:5])}")
    model.load_state_dict(payload["model"], strict=True)
    return model, dict(payload["meta"])
