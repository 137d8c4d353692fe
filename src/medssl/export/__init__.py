"""Exports of medssl's networks for MONAI: an encoder as a ``SwinUNETR`` state dict (:mod:`.state_dict`), and
an encoder or a fine-tuned segmenter as a MONAI bundle (:mod:`.bundle`), with every value it writes validated
(:mod:`.values`). A layer above ``models`` and ``runs``: it reads run directories through ``medssl.runs``."""

from medssl.export.bundle import export_bundle, run_command
from medssl.export.state_dict import StateDictExport, export_monai, swin_unetr_call

__all__ = ["StateDictExport", "export_bundle", "export_monai", "run_command", "swin_unetr_call"]
