"""Encoder checkpoints with metadata, strict loading, and export to MONAI's SwinUNETR layout.

An encoder checkpoint is ``{"encoder": state_dict, "meta": {...}}``. It is read with
``torch.load(weights_only=True)`` because a pickle is code. Loading reports how many encoder
tensors it took and fails when any is missing: a silently half-loaded encoder would make a
pretrained model look like random init.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from medssl.config import EncoderConfig
from medssl.errors import MedsslInputError
from medssl.fileio import atomic_path
from medssl.models.encoder import MASK_TOKEN_KEY, SwinEncoder
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


def read_encoder_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read and validate the two parts of an encoder checkpoint."""
    payload = safe_torch_load(path)
    if not isinstance(payload, dict) or "encoder" not in payload or "meta" not in payload:
        from medssl.models.foreign import read_foreign_encoder  # MONAI SwinUNETR, research-contributions

        return read_foreign_encoder(payload, path)
    state, meta = payload["encoder"], payload["meta"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise MedsslInputError(path, "'encoder' entry is not a state dict of tensors")
    check_meta(path, meta)
    return state, meta


def check_meta(path: str | Path, meta: Any) -> None:
    """Checkpoint metadata is a mapping with string method/family and a valid encoder config."""
    if not isinstance(meta, dict):
        raise MedsslInputError(path, f"checkpoint metadata is a {type(meta).__name__}, not a mapping")
    lacking = [k for k in REQUIRED_META if k not in meta]
    if lacking:
        raise MedsslInputError(path, f"checkpoint metadata lacks {', '.join(lacking)}")
    for key in ("method", "family"):
        if not isinstance(meta[key], str):
            raise MedsslInputError(path, f"checkpoint metadata '{key}' is not a string")
    if not isinstance(meta["encoder"], dict):
        raise MedsslInputError(path, "checkpoint metadata 'encoder' is not a mapping of encoder settings")
    try:
        EncoderConfig.model_validate(meta["encoder"])
    except Exception as err:  # noqa: BLE001 - pydantic's ValidationError, or a TypeError on odd values
        first = str(err).splitlines()
        raise MedsslInputError(path, f"checkpoint encoder config is invalid: {' '.join(first[:3])[:200]}") from None


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


def load_encoder_state(
    module: nn.Module, state: dict[str, Tensor], source: str | Path = "<state>", prefix: str = ""
) -> LoadReport:
    """Copy encoder tensors into ``module`` (keys under ``prefix``); fail if any is missing.

    ``module`` may be an encoder (``prefix=""``) or a segmenter (``prefix="swinViT."``). Keys of
    ``module`` outside the prefix (decoder) are not the encoder's concern and are left alone.
    """
    target = {k[len(prefix) :]: v for k, v in module.state_dict().items() if k.startswith(prefix)}
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise MedsslInputError(source, f"checkpoint is missing {len(missing)} encoder tensors: {shown}")
    mismatched = [k for k in target if tuple(target[k].shape) != tuple(state[k].shape)]
    if mismatched:
        k = mismatched[0]
        raise MedsslInputError(
            source,
            f"encoder tensor '{k}' has shape {tuple(state[k].shape)}, model expects {tuple(target[k].shape)}"
            " (different encoder preset?)",
        )
    check_tensor_values(source, state, target)
    full = {prefix + k: state[k] for k in target}
    result = module.load_state_dict(full, strict=False)
    still_missing = [k for k in result.missing_keys if k.startswith(prefix)]
    if still_missing:  # defensive: should be impossible after the check above
        raise MedsslInputError(source, f"encoder tensors not loaded: {still_missing[:5]}")
    return LoadReport(loaded=len(target), expected=len(target), missing=[], unexpected=unexpected)


def load_encoder(path: str | Path) -> tuple[SwinEncoder, dict[str, Any]]:
    """Rebuild the encoder a checkpoint describes and load every tensor into it."""
    state, meta = read_encoder_checkpoint(path)
    try:
        config = EncoderConfig.model_validate(meta["encoder"])
    except Exception as err:  # noqa: BLE001
        raise MedsslInputError(path, f"checkpoint encoder config is invalid: {err}") from None
    encoder = SwinEncoder(config)
    report = load_encoder_state(encoder, state, source=path)
    meta = dict(meta)
    meta["load_report"] = report.summary()
    return encoder, meta


def monai_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The encoder as ``swinViT.*`` keys, for ``monai.networks.nets.SwinUNETR.load_state_dict``."""
    state, _ = read_encoder_checkpoint(path)
    return {SWIN_PREFIX + k: v for k, v in state.items() if k != MASK_TOKEN_KEY}


def export_monai(path: str | Path, out: str | Path) -> int:
    """Write the MONAI-layout state dict; returns the number of tensors written.

    The encoder is rebuilt from its metadata and every tensor loaded into it first, so a missing,
    mis-shaped, non-finite or non-float tensor fails here instead of exporting a file that MONAI's
    ``strict=False`` load would take silently short. ``out`` may not be the input or a folder."""
    path, out = Path(path), Path(out)
    if out.is_dir():
        raise MedsslInputError(out, "--out is a folder; give the path of the .pt file to write")
    if out.exists() and path.exists() and out.resolve() == path.resolve():
        raise MedsslInputError(out, "--out is the input checkpoint; exporting would overwrite it")
    load_encoder(path)  # validates every tensor against the encoder the metadata describes
    state = monai_state_dict(path)
    atomic_torch_save(state, out)
    return len(state)


def save_segmenter(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """A fine-tuned segmenter: ``{"model": state_dict, "meta": {...}}``; meta must hold
    ``encoder`` (config dict), ``out_channels``, ``crop_size`` and ``norm``."""
    for key in ("encoder", "out_channels", "crop_size", "norm"):
        if key not in meta:
            raise ValueError(f"segmenter metadata lacks {key!r}")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    atomic_torch_save({"model": state, "meta": meta}, path)


def load_segmenter(path: str | Path):
    """Rebuild a fine-tuned :class:`SwinSegmenter` and load every tensor (strict)."""
    from medssl.models.segmenter import SwinSegmenter

    payload = safe_torch_load(path)
    if not isinstance(payload, dict) or "model" not in payload or "meta" not in payload:
        raise MedsslInputError(path, "not a medssl segmenter checkpoint (needs 'model' and 'meta')")
    meta = payload["meta"]
    check_meta(path, {"method": "", "family": "", **meta} if isinstance(meta, dict) else meta)
    try:
        config = EncoderConfig.model_validate(meta["encoder"])
        model = SwinSegmenter(config, int(meta["out_channels"]), crop_size=int(meta["crop_size"]), norm=meta["norm"])
    except (KeyError, TypeError, ValueError) as err:
        raise MedsslInputError(path, f"segmenter metadata is invalid ({type(err).__name__}: {err})") from None
    try:
        model.load_state_dict(payload["model"], strict=True)
    except RuntimeError as err:
        raise MedsslInputError(path, f"segmenter weights do not match: {str(err).splitlines()[0]}") from None
    return model, meta
