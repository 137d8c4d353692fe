"""Encoders from outside medssl, in the layouts the field publishes them, found from the tensors alone.

Every file is read with ``torch.load(weights_only=True)``; the state dict may be plain or under
``state_dict``/``model``/``net``/``network``/``model_state_dict`` (one or two levels), and DDP's
``module.`` prefixes are stripped. The Swin encoder is then found by its patch embedding
(``<prefix>patch_embed.proj.weight``), and the prefix names the layout:

=====================================  =============================================================
``swinViT.`` (or ``swin_vit.``)        MONAI ``SwinUNETR`` state dict (``torch.save(net.state_dict())``);
                                       with ``layers{1..4}c.*`` tensors it is SwinUNETR v2
                                       (``use_v2=True``), as VoCo and Large-Scale-Medical ship
                                       (Luffy03/VoCo ``Finetune/BTCV/main.py`` builds
                                       ``SwinUNETR(..., use_v2=True)`` and loads ``swinViT.*`` keys)
``encoder.`` with ``layers{i}.0.0.``   MONAI's SwinUNETR pretrained on ~50k CT/MR volumes
                                       (Project-MONAI/tutorials ``self_supervised_pretraining/
                                       swinunetr_pretrained``: the whole network under ``model``, the
                                       encoder as ``encoder.*`` with one more ``.0`` level per stage, a
                                       final ``encoder.norm`` and ``encoder.mask_token``; MONAI's
                                       ``filter_swinunetr`` maps it the same way)
``backbone.swinViT.``                  SuPreM (MrGiovanni/SuPreM ``target_applications/totalsegmentator/
                                       train.py``: ``torch.load(...)["net"]``, keys
                                       ``module.backbone.swinViT.*`` beside its decoder and text heads)
(no prefix)                            research-contributions' ``model_swinvit.pt`` (``SwinUNETR/BTCV/
                                       main.py``; MLPs named ``fc1``/``fc2``, renamed to MONAI's
                                       ``linear1``/``linear2``) and the ``SSLHead`` of its pretraining
any other single prefix                a Swin encoder inside another network, named by its prefix
=====================================  =============================================================

Tensors outside the encoder (decoders, SSL heads, the 50k model's final norm) are counted and left out.
Two encoders in one file (a student and a teacher) are refused rather than guessed between. The encoder
config (feature size, depths, heads, window, patch size, input channels, v1/v2) is rebuilt from the
shapes and key names, its size checked against ``limits.model_bytes`` before it is built, and every
tensor of that encoder must be present with its shape, or loading fails naming the first missing ones
(exit 2). The one tensor most files lack is medssl's ``mask_token`` (masked pretraining only, frozen in
the segmenter): taken from the file when there, else zeros.

Axis order cannot be checked for these files: they declare no orientation or spacing, and with a cubic
patch and a cubic window neither the patch-embedding kernel's shape nor the relative-position tables
change when the volume axes are permuted. The source is recorded as ``axis_order: "unchecked"`` and the
fine-tuning log says so; a medssl checkpoint's recorded orientation is compared instead
(:func:`medssl.models.adapt.axis_order_agreement`).

The result is labelled ``method: external-<name>`` with ``family: external`` (or the family its
benchmark entry declares, e.g. ``supervised`` for SuPreM) and its source file (path, sha256, layout,
coverage) in the metadata, so a fine-tuning run from it is its own row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import torch
from torch import Tensor

from medssl.config import ENCODER_PRESETS, EncoderConfig
from medssl.errors import MedsslInputError
from medssl.fileio import file_sha256
from medssl.models.checkpoint import (
    atomic_torch_save,
    check_state_matches,
    encoder_meta,
    safe_torch_load,
    tensor_coverage,
)
from medssl.models.encoder import MASK_TOKEN_KEY, SwinEncoder
from medssl.models.size import check_network_size

EXTERNAL_FAMILY = "external"
EXTERNAL_PREFIX = "external-"
WRAPPER_KEYS = ("state_dict", "model", "net", "network", "model_state_dict")
ANCHOR = "patch_embed.proj.weight"
# research-contributions' weights predate MONAI's MLPBlock renaming fc1/fc2 -> linear1/linear2
OLD_MLP_NAMES = ((".mlp.fc1.", ".mlp.linear1."), (".mlp.fc2.", ".mlp.linear2."))
_ENCODER_MODULES = re.compile(r"(patch_embed|pos_drop|layers[1-4]c?|norm|mask_token)(\.|$)")
_NESTED_STAGE = re.compile(r"^layers([1-4])\.0\.0\.")  # MONAI's 50k SSL encoder: one more level per stage
AXIS_ORDER_UNCHECKED = (
    "not checked: the file declares no orientation or spacing, and neither the patch-embedding kernel nor "
    "the relative-position tables reveal permuted axes (cubic patch and window); the encoder is assumed to "
    "take volumes in the task's orientation"
)


@dataclass(frozen=True)
class FoundEncoder:
    """The encoder tensors of a foreign file under MONAI ``SwinTransformer`` names, and where they were."""

    tensors: dict[str, Tensor]
    prefix: str
    layout: str
    ignored: list[str]


def external_method(name: str) -> str:
    """The method label of an external encoder (its row in every table)."""
    return f"{EXTERNAL_PREFIX}{name}"


def _is_state(obj: Any) -> TypeGuard[dict[str, Tensor]]:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def unwrap_state(payload: Any, path: str | Path) -> tuple[dict[str, Tensor], str]:
    """The state dict inside a checkpoint payload and where it was (``"."`` or ``"state_dict"`` ...)."""
    if isinstance(payload, dict):
        meta = payload.get("meta")
        if "model" in payload and isinstance(meta, dict) and "out_channels" in meta:
            raise MedsslInputError(
                path,
                "is a fine-tuned medssl segmenter, not an encoder checkpoint "
                "(use its pretraining run's checkpoints/encoder.pt)",
            )
        if _is_state(payload):
            return payload, "."
        for key in WRAPPER_KEYS:
            inner = payload.get(key)
            if _is_state(inner):
                return inner, key
            if isinstance(inner, dict):
                for key2 in WRAPPER_KEYS:
                    nested = inner.get(key2)
                    if _is_state(nested):
                        return nested, f"{key}.{key2}"
    raise MedsslInputError(
        path,
        "not a medssl encoder checkpoint (needs 'encoder' and 'meta' entries), nor a state dict of tensors "
        f"(plain or under {'/'.join(WRAPPER_KEYS)}) such as a MONAI SwinUNETR or model_swinvit.pt",
    )


def _strip_module(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module.") :]
    return key


def _layout_name(prefix: str, nested: bool, v2: bool) -> str:
    if prefix == "encoder." and nested:
        return "MONAI SwinUNETR SSL-pretrained (encoder.*, ~50k CT/MR)"
    if prefix == "backbone.swinViT.":
        return "SuPreM (backbone.swinViT.*)"
    if prefix == "":
        return "research-contributions model_swinvit" + (" (v2)" if v2 else "")
    if prefix in ("swinViT.", "swin_vit."):
        return "MONAI SwinUNETR v2" if v2 else "MONAI SwinUNETR"
    return f"Swin encoder under '{prefix}'" + (" (v2)" if v2 else "")


def encoder_tensors(state: dict[str, Tensor], path: str | Path) -> FoundEncoder:
    """The encoder's tensors renamed to MONAI ``SwinTransformer`` keys, with the layout they were found in."""
    keys = {_strip_module(k): v for k, v in state.items()}
    prefixes = sorted({k[: -len(ANCHOR)] for k in keys if k.endswith(ANCHOR)})
    if not prefixes:
        raise MedsslInputError(
            path, f"not an encoder checkpoint: no Swin encoder in this state dict (no '*{ANCHOR}' tensor)"
        )
    if len(prefixes) > 1:
        shown = ", ".join(repr(p or "(top level)") for p in prefixes[:4])
        raise MedsslInputError(path, f"holds {len(prefixes)} Swin encoders ({shown}): save the one to use alone")
    prefix = prefixes[0]
    nested = any(_NESTED_STAGE.match(k[len(prefix) :]) for k in keys if k.startswith(prefix))
    tensors: dict[str, Tensor] = {}
    ignored = []
    for key, value in keys.items():
        name = key[len(prefix) :]
        if not key.startswith(prefix) or not _ENCODER_MODULES.match(name):
            ignored.append(key)
            continue
        if nested:
            name = _NESTED_STAGE.sub(r"layers\1.0.", name)
        for old, new in OLD_MLP_NAMES:
            name = name.replace(old, new)
        if name in tensors:
            raise MedsslInputError(path, f"two tensors map onto encoder tensor '{name}' (e.g. '{key}')")
        tensors[name] = value
    v2 = any(re.match(r"layers[1-4]c\.", k) for k in tensors)
    return FoundEncoder(tensors, prefix, _layout_name(prefix, nested, v2), ignored)


def infer_encoder_config(state: dict[str, Tensor], path: str | Path) -> EncoderConfig:
    """Feature size, input channels and patch size from the patch embedding; depths from the blocks
    of each stage; heads and window size from each stage's relative-position bias table; v2 from the
    presence of the per-stage conv blocks (``layers{1..4}c``)."""
    proj = state[ANCHOR]
    if proj.ndim != 5 or len({*proj.shape[2:]}) != 1:
        raise MedsslInputError(path, f"'{ANCHOR}' has shape {tuple(proj.shape)}: not a 3D Swin with a cubic patch")
    feature_size, in_channels, patch = int(proj.shape[0]), int(proj.shape[1]), int(proj.shape[2])
    depths, heads, windows = [], [], []
    for stage in range(1, 5):
        blocks = {int(m.group(1)) for k in state if (m := re.match(rf"layers{stage}\.0\.blocks\.(\d+)\.", k))}
        if not blocks:
            raise MedsslInputError(path, f"Swin stage {stage} has no blocks (no 'layers{stage}.0.blocks.*' tensors)")
        depths.append(max(blocks) + 1)
        table = state.get(f"layers{stage}.0.blocks.0.attn.relative_position_bias_table")
        if table is None or table.ndim != 2:
            raise MedsslInputError(
                path,
                f"stage {stage} lacks 'layers{stage}.0.blocks.0.attn."
                "relative_position_bias_table' (heads and window size come from it)",
            )
        heads.append(int(table.shape[1]))
        side = round(int(table.shape[0]) ** (1 / 3))
        if side**3 != table.shape[0] or side % 2 == 0:
            raise MedsslInputError(
                path,
                f"stage {stage}: relative-position table of {table.shape[0]} rows is not (2w-1)^3 for a cubic window w",
            )
        windows.append((side + 1) // 2)
    if len(set(windows)) != 1:
        raise MedsslInputError(path, f"window sizes differ between stages ({windows})")
    use_v2 = any(re.match(r"layers[1-4]c\.", k) for k in state)
    fields = dict(feature_size=feature_size, depths=tuple(depths), num_heads=tuple(heads), window_size=windows[0])
    preset = next(
        (n for n, p in ENCODER_PRESETS.items() if all(p[k] == v for k, v in fields.items())),
        next((n for n, p in ENCODER_PRESETS.items() if p["feature_size"] == feature_size), "base"),
    )
    try:
        config = EncoderConfig(preset=preset, in_channels=in_channels, patch_size=patch, use_v2=use_v2, **fields)
    except ValueError as err:
        raise MedsslInputError(path, f"the encoder these tensors describe is not supported: {err}") from None
    check_network_size(config, path)  # block indices can declare far more than the file holds
    return config


def _mask_token(state: dict[str, Tensor], feature_size: int) -> Tensor | None:
    """The file's mask token as medssl's (1, C, 1, 1, 1): MONAI's 50k model stores (1, 1, C)."""
    token = state.get(MASK_TOKEN_KEY)
    if token is None or token.numel() != feature_size or not token.is_floating_point():
        return None
    return token.detach().reshape(1, feature_size, 1, 1, 1).clone()


def read_foreign_encoder(
    payload: Any, path: str | Path, name: str | None = None, family: str = EXTERNAL_FAMILY
) -> tuple[dict[str, Tensor], dict]:
    """``(state, meta)`` of an external encoder as :func:`medssl.models.load.read_encoder_checkpoint`
    returns them; fails (exit 2) when an encoder tensor is missing, mis-shaped or not finite."""
    path = Path(path)
    raw, wrapper = unwrap_state(payload, path)
    found = encoder_tensors(raw, path)
    state = found.tensors
    config = infer_encoder_config(state, path)
    expected = {k: v for k, v in SwinEncoder(config).state_dict().items() if k != MASK_TOKEN_KEY}
    check_state_matches(path, state, expected, rebuilt_from_file=True)
    coverage = tensor_coverage(state, expected)
    unexpected = sorted(set(state) - set(expected) - {MASK_TOKEN_KEY})
    loaded = {k: state[k].detach().clone() for k in expected}
    feature_size = int(config.feature_size or 0)
    token = _mask_token(state, feature_size)
    loaded[MASK_TOKEN_KEY] = token if token is not None else torch.zeros(1, feature_size, 1, 1, 1)
    source = {
        "path": str(path.resolve()),
        "sha256": file_sha256(path),
        "layout": found.layout,
        "wrapper": wrapper,
        "prefix": found.prefix or "(none)",
        "coverage": coverage,
        "ignored_tensors": len(found.ignored) + len(unexpected),
        "mask_token": "from the source" if token is not None else "not in the source: zeros (masked pretraining only)",
        "axis_order": "unchecked",
    }
    label = name or path.stem
    meta = encoder_meta(
        method=external_method(label),
        family=family,
        encoder=config,
        steps=0,
        extra={"source": source, "external_name": label, "exported_network": "external"},
    )
    return loaded, meta


def import_external_encoder(path: str | Path, name: str, out_dir: str | Path, family: str = EXTERNAL_FAMILY) -> Path:
    """Convert an external encoder once into a medssl checkpoint ``<out_dir>/<name>-<sha12>.pt``.

    The file name carries the source's hash, so a changed source gives a new checkpoint path and
    with it new fine-tuning run ids (a benchmark never mistakes old results for the new weights);
    a family other than ``external`` is part of the name too (``<name>-supervised-<sha12>.pt``)."""
    path = Path(path)
    payload = safe_torch_load(path)
    state, meta = read_foreign_encoder(payload, path, name=name, family=family)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "external"
    tag = "" if family == EXTERNAL_FAMILY else f"-{family}"
    target = Path(out_dir) / f"{slug}{tag}-{meta['source']['sha256'][:12]}.pt"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"encoder": state, "meta": meta}, target)
    return target
