"""``medssl export --format monai``: an encoder as the ``swinViT.*`` state dict MONAI's ``SwinUNETR`` loads,
with the constructor call that builds a network it fits.

The encoder is rebuilt from its metadata (or, for a foreign file, from its tensors) and every tensor loaded
into it first, so a missing, mis-shaped, non-finite or non-float tensor fails here instead of exporting a
file that MONAI's ``strict=False`` load would take silently short. ``--out`` may not be the input, a folder,
a special file or a path in a folder that does not exist (exit 2, one line).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medssl.config import EncoderConfig
from medssl.errors import MedsslInputError
from medssl.export.paths import check_file_target, write_file_atomically
from medssl.models.load import load_encoder, monai_state_dict
from medssl.models.segmenter import swin_unetr_kwargs

OUT_CHANNELS_PLACEHOLDER = 14  # the snippet's number of classes: the encoder fixes everything else


@dataclass(frozen=True)
class StateDictExport:
    tensors: int
    encoder: EncoderConfig

    def constructor(self, out_channels: int = OUT_CHANNELS_PLACEHOLDER) -> str:
        """``SwinUNETR(...)`` with the arguments whose ``swinViT`` takes every exported tensor."""
        return swin_unetr_call(self.encoder, out_channels)


def swin_unetr_call(encoder: EncoderConfig, out_channels: int = OUT_CHANNELS_PLACEHOLDER) -> str:
    kwargs: dict[str, Any] = swin_unetr_kwargs(encoder, out_channels, "instance")
    kwargs.pop("norm_name")  # the decoder's normalisation is the user's choice; the encoder has none
    kwargs.pop("spatial_dims")
    if not kwargs["use_v2"]:
        kwargs.pop("use_v2")
    return "SwinUNETR(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"


def export_monai(path: str | Path, out: str | Path) -> StateDictExport:
    """Write the MONAI-layout state dict of the encoder in ``path`` to ``out``."""
    path, out = Path(path), Path(out)
    check_file_target(out)
    if out.exists() and path.exists() and out.resolve() == path.resolve():
        raise MedsslInputError(out, "--out is the input checkpoint; exporting would overwrite it")
    encoder, _ = load_encoder(path)  # validates every tensor against the encoder the metadata describes
    state = monai_state_dict(encoder)
    write_file_atomically(out, lambda tmp: torch.save(state, tmp))
    return StateDictExport(tensors=len(state), encoder=encoder.config)
