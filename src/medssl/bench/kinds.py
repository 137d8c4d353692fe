"""The one table of run kinds: name -> config model, entry point ``fn(config, run_dir)``, and
whether it runs under torchrun. The plan's stages, the executors' dispatch, the torchrun worker's
``--kind`` and the plan file all read it; the training rows come from ``medssl.train.kinds`` (the
torchrun worker, one layer down, reads them there)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medssl.config import CKARunConfig, FinetuneConfig, PretrainConfig, ProbeRunConfig
from medssl.errors import look_up_option
from medssl.train.kinds import TRAINING_KINDS, RunKind, by_name

RunConfig = PretrainConfig | FinetuneConfig | ProbeRunConfig | CKARunConfig  # what a planned run carries


def _cka(config: CKARunConfig, run_dir: Path) -> dict[str, Any]:
    from medssl.analysis.cka_run import run_cka  # torch and the models load only when a run starts

    return run_cka(config, run_dir)


def _probe(config: ProbeRunConfig, run_dir: Path) -> dict[str, Any]:
    from medssl.analysis.probe_run import run_probe  # the frozen-encoder probe (medssl.evaluate.probe)

    return run_probe(config, run_dir)


# Plan order: a kind's runs may depend on the runs of the kinds before it.
RUN_KINDS: dict[str, RunKind[Any]] = {
    **TRAINING_KINDS,
    **by_name(
        RunKind("probe", ProbeRunConfig, _probe, distributed=False),
        RunKind("cka", CKARunConfig, _cka, distributed=False),
    ),
}
STAGES: tuple[str, ...] = tuple(RUN_KINDS)


def run_kind(name: str) -> RunKind[Any]:
    """The kind called ``name``; ``UnknownNameError`` (a ``ValueError``) naming the known ones otherwise."""
    return look_up_option("run kind", name, RUN_KINDS)
