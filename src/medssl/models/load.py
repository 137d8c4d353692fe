"""Reading any encoder file: a medssl checkpoint, or a foreign layout found from its tensors.

:mod:`medssl.models.checkpoint` knows medssl's format, :mod:`medssl.models.foreign` the published
layouts; this module picks between them, so neither imports the other's reader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from medssl.errors import MedsslInputError
from medssl.models.checkpoint import check_meta, load_encoder_state, safe_torch_load
from medssl.models.encoder import MASK_TOKEN_KEY, SwinEncoder
from medssl.models.foreign import read_foreign_encoder

SWIN_PREFIX = "swinViT."


def read_encoder_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(state, meta)`` of an encoder file: medssl's ``{"encoder", "meta"}`` checkpoint (metadata validated),
    or any layout :func:`medssl.models.foreign.read_foreign_encoder` recognises."""
    payload = safe_torch_load(path)
    if not isinstance(payload, dict) or "encoder" not in payload or "meta" not in payload:
        return read_foreign_encoder(payload, path)
    state, meta = payload["encoder"], payload["meta"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise MedsslInputError(path, "'encoder' entry is not a state dict of tensors")
    check_meta(path, meta)
    return state, meta


def load_encoder(path: str | Path) -> tuple[SwinEncoder, dict[str, Any]]:
    """Rebuild the encoder a checkpoint describes and load every tensor into it."""
    state, meta = read_encoder_checkpoint(path)
    encoder = SwinEncoder(check_meta(path, meta).encoder)
    report = load_encoder_state(encoder, state, source=path)
    meta = dict(meta)
    meta["load_report"] = report.summary()
    return encoder, meta


def monai_state_dict(encoder: SwinEncoder) -> dict[str, Tensor]:
    """The encoder as ``swinViT.*`` keys, for ``monai.networks.nets.SwinUNETR.load_state_dict``."""
    return {SWIN_PREFIX + k: v.detach().clone() for k, v in encoder.state_dict().items() if k != MASK_TOKEN_KEY}
