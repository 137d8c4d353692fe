"""Encoder, heads, segmenter and checkpoints."""

from medssl.models.checkpoint import load_encoder_state, save_encoder
from medssl.models.encoder import SwinEncoder, build_encoder
from medssl.models.load import load_encoder, read_encoder_checkpoint
from medssl.models.segmenter import SwinSegmenter

__all__ = [
    "SwinEncoder",
    "SwinSegmenter",
    "build_encoder",
    "load_encoder",
    "load_encoder_state",
    "read_encoder_checkpoint",
    "save_encoder",
]
