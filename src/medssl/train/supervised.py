"""The positive control of a transfer study: a supervised encoder.

A segmenter is trained, from random init, on labelled phantoms whose anatomies no study task has (the
benchmark renders them from another anatomy seed, ``medssl.bench.plan.control_data_seed``), for long
enough to converge; its encoder is then saved as an encoder checkpoint (method ``supervised``, family
``supervised``) and fine-tuned in the study like any pretrained encoder. An encoder trained with the
labels of the very task cannot be a weak one, so if fine-tuning from it does not beat random init at a
few labelled cases, the protocol cannot see transfer, whatever the SSL methods do.

The run is a fine-tuning run of kind ``supervised`` (so no report counts it as a study result) that also
exports its tested segmenter's encoder to ``checkpoints/encoder.pt`` before it is marked finished.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medssl.config import SUPERVISED, FinetuneConfig
from medssl.runs import RunDir
from medssl.train.finetune import EncoderExport, run_finetune


def run_supervised(config: FinetuneConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train the control's segmenter into ``run_dir`` and export its encoder (``RunDir.encoder_path``)."""
    run = RunDir(run_dir)
    export = EncoderExport(path=run.encoder_path, method=SUPERVISED, family=SUPERVISED)
    return run_finetune(config, run_dir, kind=SUPERVISED, export=export)
