"""Encoder, heads, segmenter and checkpoints."""

from medssl.models.checkpoint import export_monai, load_encoder, load_encoder_state, save_encoder
from medssl.models.encoder import SwinEncoder, build_encoder
from medssl.models.segmenter import SwinSegmenter

__all__ = [
    "SwinEncoder",
    "SwinSegmenter",
    "build_encoder",
    "export_monai",
    "load_encoder",
    "load_encoder_state",
    "save_encoder",
]
