"""What a kind of run is: its config model, its entry point ``fn(config, run_dir)`` and whether it runs
under torchrun. The training kinds are here, where ``medssl.train.launch`` (every torchrun rank) reads
them; ``medssl.bench.kinds.RUN_KINDS`` adds the analysis kinds (CKA) for the benchmark."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from medssl.config import FinetuneConfig, PretrainConfig, StrictModel, load_config

ConfigT = TypeVar("ConfigT", bound=StrictModel)
EntryPoint = Callable[[ConfigT, Path], dict[str, Any]]


@dataclass(frozen=True)
class RunKind(Generic[ConfigT]):
    """One kind of run. ``distributed``: every torchrun rank calls the entry point (rank 0 writes);
    otherwise it runs in one process."""

    name: str
    config_model: type[ConfigT]
    entry_point: EntryPoint[ConfigT]
    distributed: bool

    def run(self, config: StrictModel, run_dir: str | Path) -> dict[str, Any]:
        if not isinstance(config, self.config_model):
            raise TypeError(f"a {self.name} run takes a {self.config_model.__name__}, not a {type(config).__name__}")
        return self.entry_point(config, Path(run_dir))

    def load_config(self, path: str | Path) -> ConfigT:
        """The config a run directory's ``config.yaml`` holds (written by ``medssl.config.dump_yaml``)."""
        return load_config(self.config_model, path)


# The entry points import torch and the methods only when a run starts, not when a plan is made.
def _pretrain(config: PretrainConfig, run_dir: Path) -> dict[str, Any]:
    from medssl.train.pretrain import run_pretrain

    return run_pretrain(config, run_dir)


def _finetune(config: FinetuneConfig, run_dir: Path) -> dict[str, Any]:
    from medssl.train.finetune import run_finetune

    return run_finetune(config, run_dir)


def _supervised(config: FinetuneConfig, run_dir: Path) -> dict[str, Any]:
    from medssl.train.supervised import run_supervised

    return run_supervised(config, run_dir)


def by_name(*kinds: RunKind[Any]) -> dict[str, RunKind[Any]]:
    """A table of kinds keyed by each one's own name."""
    return {kind.name: kind for kind in kinds}


TRAINING_KINDS = by_name(
    RunKind("pretrain", PretrainConfig, _pretrain, distributed=True),
    # the positive control's encoder: a segmenter trained on held-out labelled data (medssl.train.supervised)
    RunKind("supervised", FinetuneConfig, _supervised, distributed=False),
    RunKind("finetune", FinetuneConfig, _finetune, distributed=True),
)
