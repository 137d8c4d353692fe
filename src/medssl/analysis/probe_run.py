"""A probe run (run kind ``probe``, ``medssl probe``): one frozen encoder probed on one task, budget and
seed, scored on the test cases of the same ``splits.json`` the fine-tuning runs of that task use.

The probe itself (features, head, Dice) is ``medssl.evaluate.probe``; this module resolves the encoder
(an encoder checkpoint, a fine-tuned segmenter's encoder, or random init at the seed), the cases and the
split, and writes the run directory.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from medssl.analysis.cka_run import load_model_encoder
from medssl.config import RANDOM_INIT, ProbeRunConfig
from medssl.data.cache import VolumeCache, cache_task
from medssl.data.datasets import load_eval_case
from medssl.data.splits import run_split
from medssl.data.tasks import load_task
from medssl.errors import MedsslInputError
from medssl.evaluate.probe import probe_cases
from medssl.fileio import file_sha256
from medssl.limits import set_limits
from medssl.models.encoder import SwinEncoder
from medssl.runs import RunDir, RunWork, encoder_run_info, perform_run


def probe_encoder(config: ProbeRunConfig) -> tuple[SwinEncoder, dict[str, Any]]:
    """The frozen encoder of a probe run and its row name (``method``) and ``family``."""
    if config.encoder_checkpoint is None:
        torch.manual_seed(config.seed)  # random init differs by seed, as in fine-tuning
        return SwinEncoder(config.encoder), {"method": RANDOM_INIT, "family": "none"}
    encoder, meta = load_model_encoder(config.encoder_checkpoint)
    if encoder.patch_embed.proj.in_channels != 1:
        raise MedsslInputError(config.encoder_checkpoint, "the probe reads single-channel volumes")
    return encoder, {**meta, "method": meta.get("method", "unknown"), "family": meta.get("family", "unknown")}


def run_probe(config: ProbeRunConfig, run_dir: str | Path, device: str | torch.device | None = None) -> dict[str, Any]:
    """Probe ``config``'s frozen encoder into ``run_dir`` through the run lifecycle (``medssl.runs.perform_run``):
    ``config.yaml``, ``run.json``, ``results.json`` (per-case Dice rows in ``cases``, ``mean_dice``); a
    finished run is returned as stored. The run is bound to the encoder file's content hash."""
    run = RunDir(run_dir)
    set_limits(config.limits)
    path = config.encoder_checkpoint
    identity = {"encoder_sha256": file_sha256(path)} if path is not None and Path(path).is_file() else {}
    return perform_run(run, config, lambda: open_probe_work(config, run, device), identity=identity)


def open_probe_work(config: ProbeRunConfig, run: RunDir, device: str | torch.device | None = None) -> RunWork:
    """Open the encoder, the task, its cache and split (a refusal here binds nothing); the work probes."""
    task = load_task(config.task)
    encoder, meta = probe_encoder(config)
    cache = VolumeCache(config.cache_dir if config.cache_dir is not None else run.path / "cache")
    volumes = cache_task(task, cache, config.preprocess)
    split, train_ids = run_split(config, sorted(volumes), run.path / "splits.json")
    info = encoder_run_info(config, task, meta, len(train_ids))

    def body(started: float) -> dict[str, Any]:
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        encoder.to(target)
        outcome = probe_cases(
            encoder,
            [load_eval_case(volumes[c]) for c in train_ids],
            [load_eval_case(volumes[c]) for c in split["test"]],
            task.structures,
            config.probe,
            config.crop_size,
            config.seed,
            target,
        )
        run.log(
            f"probe {meta['method']} on {task.name} budget {config.budget} seed {config.seed}: mean test Dice "
            f"{outcome.mean_dice:.3f} ({len(train_ids)} training cases, {outcome.n_points} voxels, "
            f"{outcome.n_channels} feature channels)"
        )
        return {
            "kind": "probe",
            **info,
            "labels": {str(k): v for k, v in task.structures.items()},
            "cases": outcome.rows,
            "mean_dice": outcome.mean_dice,
            "head_loss": outcome.losses,
            "n_points": outcome.n_points,
            "n_channels": outcome.n_channels,
            "probe": config.probe.model_dump(mode="json"),
            "wall_seconds": round(time.time() - started, 3),
        }

    return RunWork("probe", info, body)
