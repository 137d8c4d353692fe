"""Encoders from outside medssl: MONAI ``SwinUNETR`` state dicts and research-contributions' Swin weights.

Accepted layouts (all read with ``torch.load(weights_only=True)``):

- a MONAI ``SwinUNETR`` (or ``SwinTransformer``) state dict saved with ``torch.save(net.state_dict())``,
  keys ``swinViT.patch_embed.proj.weight`` ... (decoder keys are ignored), optionally with DDP's
  ``module.`` prefix and inside a ``state_dict``/``model``/``net``/``network`` wrapper;
- research-contributions' self-supervised ``model_swinvit.pt`` (``SwinUNETR/BTCV/main.py`` loads it
  as ``torch.load(...)["state_dict"]`` with keys ``module.patch_embed.proj.weight``,
  ``module.layers1.0.blocks.0.mlp.fc1.weight`` ...; MONAI's ``SwinUNETR.load_from`` reads the same
  keys): the ``module.`` prefix is stripped and the MLP's old ``fc1``/``fc2`` names become MONAI's
  current ``linear1``/``linear2``;
- the whole ``SSLHead`` of ``SwinUNETR/Pretrain/models/ssl_head.py`` (``swinViT.`` encoder plus
  rotation/contrastive heads and a reconstruction ``conv``): the heads are ignored and counted.

The encoder config (feature size, depths, heads, window, patch size, input channels) is rebuilt
from the tensors' shapes; every tensor of that encoder must then be present with its shape, or
loading fails naming the first missing ones. The only encoder tensor no foreign checkpoint has is
medssl's ``mask_token`` (masked pretraining only, frozen in the segmenter): it is set to zeros.
The result is labelled ``method: external-<name>``, ``family: external``, with its source file
(path, sha256, layout, coverage) in the metadata, so a fine-tuning run from it is its own row.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from medssl.config import ENCODER_PRESETS, EncoderConfig
from medssl.errors import MedsslInputError
from medssl.fileio import file_sha256
from medssl.models.encoder import MASK_TOKEN_KEY, SwinEncoder

EXTERNAL_FAMILY = "external"
EXTERNAL_PREFIX = "external-"
WRAPPER_KEYS = ("state_dict", "model", "net", "network", "model_state_dict")
ANCHOR = "patch_embed.proj.weight"
# research-contributions' weights predate MONAI's MLPBlock renaming fc1/fc2 -> linear1/linear2
OLD_MLP_NAMES = ((".mlp.fc1.", ".mlp.linear1."), (".mlp.fc2.", ".mlp.linear2."))
ENCODER_PREFIXES = ("swinViT.", "swin_vit.", "")  # the name of the encoder inside the source network


def external_method(name: str) -> str:
    """The method label of an external encoder (its row in every table)."""
    return f"{EXTERNAL_PREFIX}{name}"


def _is_state(obj: Any) -> bool:
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
                    if _is_state(inner.get(key2)):
                        return inner[key2], f"{key}.{key2}"
    raise MedsslInputError(
        path,
        "not a medssl encoder checkpoint (needs 'encoder' and 'meta' entries), nor a state dict of tensors "
        f"(plain or under {'/'.join(WRAPPER_KEYS)}) such as a MONAI SwinUNETR or model_swinvit.pt",
    )


def _strip_module(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module.") :]
    return key


def encoder_tensors(state: dict[str, Tensor], path: str | Path) -> tuple[dict[str, Tensor], str, list[str]]:
    """The encoder's tensors under MONAI ``SwinTransformer`` names, the prefix they had, and the
    source keys left out (decoder, SSL heads)."""
    keys = {_strip_module(k): v for k, v in state.items()}
    prefixes = [p for p in ENCODER_PREFIXES if p + ANCHOR in keys]
    if not prefixes:
        others = sorted({k[: -len(ANCHOR)] for k in keys if k.endswith(ANCHOR)})
        hint = f" (found it under {', '.join(repr(o) for o in others)})" if others else ""
        raise MedsslInputError(
            path,
            f"not an encoder checkpoint: no Swin encoder in this state dict: no '{ANCHOR}' "
            f"tensor under 'swinViT.', 'swin_vit.' or at the top level{hint}",
        )
    prefix = prefixes[0]
    encoder, ignored = {}, []
    for key, value in keys.items():
        if not key.startswith(prefix) or (prefix == "" and key.split(".", 1)[0] not in _ENCODER_MODULES):
            ignored.append(key)
            continue
        name = key[len(prefix) :]
        for old, new in OLD_MLP_NAMES:
            name = name.replace(old, new)
        encoder[name] = value
    v2 = sorted({k.split(".", 1)[0] for k in encoder if re.fullmatch(r"layers\dc", k.split(".", 1)[0])})
    if v2:
        raise MedsslInputError(
            path,
            f"a SwinUNETR v2 encoder (residual conv blocks {', '.join(v2)}): the medssl "
            "encoder is MONAI's SwinTransformer without use_v2, so these weights do not fit",
        )
    return encoder, prefix, ignored


_ENCODER_MODULES = {"patch_embed", "layers1", "layers2", "layers3", "layers4", "pos_drop", MASK_TOKEN_KEY}


def infer_encoder_config(state: dict[str, Tensor], path: str | Path) -> EncoderConfig:
    """Feature size, input channels and patch size from the patch embedding; depths from the blocks
    of each stage; heads and window size from each stage's relative-position bias table."""
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
    fields = dict(feature_size=feature_size, depths=tuple(depths), num_heads=tuple(heads), window_size=windows[0])
    preset = next(
        (n for n, p in ENCODER_PRESETS.items() if all(p[k] == v for k, v in fields.items())),
        next((n for n, p in ENCODER_PRESETS.items() if p["feature_size"] == feature_size), "base"),
    )
    try:
        return EncoderConfig(preset=preset, in_channels=in_channels, patch_size=patch, **fields)
    except ValueError as err:
        raise MedsslInputError(path, f"the encoder these tensors describe is not supported: {err}") from None


def read_foreign_encoder(payload: Any, path: str | Path, name: str | None = None) -> tuple[dict[str, Tensor], dict]:
    """``(state, meta)`` of an external encoder as :func:`medssl.models.checkpoint.read_encoder_checkpoint`
    returns them; fails (exit 2) when an encoder tensor is missing or has the wrong shape."""
    from medssl.models.checkpoint import encoder_meta

    path = Path(path)
    raw, wrapper = unwrap_state(payload, path)
    state, prefix, ignored = encoder_tensors(raw, path)
    config = infer_encoder_config(state, path)
    expected = {k: v for k, v in SwinEncoder(config).state_dict().items() if k != MASK_TOKEN_KEY}
    missing = sorted(set(expected) - set(state))
    coverage = f"{len(expected) - len(missing)}/{len(expected)} encoder tensors"
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise MedsslInputError(
            path, f"external encoder is missing {len(missing)} encoder tensors ({coverage} present): {shown}"
        )
    wrong = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        raise MedsslInputError(
            path,
            f"encoder tensor '{k}' has shape {tuple(state[k].shape)}, the encoder rebuilt "
            f"from this file expects {tuple(expected[k].shape)}",
        )
    unexpected = sorted(set(state) - set(expected) - {MASK_TOKEN_KEY})
    loaded = {k: state[k].detach().clone() for k in expected}
    token = state.get(MASK_TOKEN_KEY)
    has_token = token is not None and tuple(token.shape) == (1, config.feature_size, 1, 1, 1)
    loaded[MASK_TOKEN_KEY] = token.detach().clone() if has_token else torch.zeros(1, config.feature_size, 1, 1, 1)
    layout = "research-contributions model_swinvit" if prefix == "" else "MONAI SwinUNETR"
    source = {
        "path": str(path.resolve()),
        "sha256": file_sha256(path),
        "layout": layout,
        "wrapper": wrapper,
        "prefix": prefix or "(none)",
        "coverage": coverage,
        "ignored_tensors": len(ignored) + len(unexpected),
        "mask_token": "from the source" if has_token else "not in the source: zeros (masked pretraining only)",
    }
    label = name or path.stem
    meta = encoder_meta(
        method=external_method(label),
        family=EXTERNAL_FAMILY,
        encoder=config,
        steps=0,
        extra={"source": source, "external_name": label, "exported_network": "external"},
    )
    return loaded, meta


def import_external_encoder(path: str | Path, name: str, out_dir: str | Path) -> Path:
    """Convert an external encoder once into a medssl checkpoint ``<out_dir>/<name>-<sha12>.pt``.

    The file name carries the source's hash, so a changed source gives a new checkpoint path and
    with it new fine-tuning run ids (a benchmark never mistakes old results for the new weights)."""
    from medssl.models.checkpoint import atomic_torch_save, safe_torch_load

    path = Path(path)
    payload = safe_torch_load(path)
    state, meta = read_foreign_encoder(payload, path, name=name)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "external"
    target = Path(out_dir) / f"{slug}-{meta['source']['sha256'][:12]}.pt"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"encoder": state, "meta": meta}, target)
    return target
