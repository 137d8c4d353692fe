"""Pretraining: one SSL method on one corpus, ending in an encoder checkpoint with metadata."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from medssl.config import PreprocessConfig, PretrainConfig, config_hash
from medssl.data.corpus import Corpus
from medssl.data.datasets import PretrainRegionDataset
from medssl.errors import ConfigError, look_up_option
from medssl.evaluate.probe import load_probe_set, online_probe
from medssl.methods import build_method
from medssl.methods.base import SSLMethod
from medssl.methods.recipe import operating_point
from medssl.methods.verdict import health_verdict
from medssl.models.checkpoint import encoder_meta, save_encoder
from medssl.models.encoder import SwinEncoder
from medssl.runs import RunDir, RunWork
from medssl.train.cost import reset_peak_memory, run_cost, step_flops
from medssl.train.distributed import DistInfo, barrier
from medssl.train.entry import perform_training_run
from medssl.train.loop import Validator, train


def pretrain_info(config: PretrainConfig, cls: type[SSLMethod]) -> dict[str, Any]:
    """The run.json fields of a pretraining run (the lifecycle adds kind, id, hash and provenance)."""
    return {
        "method": config.method.name,
        "family": cls.family,
        "preset": config.encoder.preset,
        "crop_size": config.crop_size,
        "steps": config.schedule.steps,
    }


def run_pretrain(config: PretrainConfig, run_dir: str | Path, info: DistInfo | None = None) -> dict[str, Any]:
    """Pretrain ``config.method`` into ``run_dir``; resume if interrupted; no-op when finished."""

    def open_work(run: RunDir, dist: DistInfo) -> RunWork:
        from medssl.methods import REGISTRY

        cls = REGISTRY[look_up_option("method", config.method.name, sorted(REGISTRY), source="method.name")]
        trains = cls.trains and config.schedule.steps > 0
        if trains and config.corpus is None:
            raise ConfigError("corpus", f"method '{cls.name}' needs a corpus to pretrain on")
        if config.probe.every is not None and config.probe.task is None:
            raise ConfigError("probe.task", "probe.every needs probe.task: a labelled task held out from every study")
        corpus = Corpus.open(config.corpus) if trains and config.corpus is not None else None
        info = pretrain_info(config, cls)
        return RunWork("pretrain", info, lambda started: pretrain_body(config, cls, corpus, run, dist, started))

    return perform_training_run(config, run_dir, open_work, info)


def pretrain_body(
    config: PretrainConfig, cls: type[SSLMethod], corpus: Corpus | None, run: RunDir, info: DistInfo, started: float
) -> dict[str, Any]:
    """The work of a pretraining run (inside the lifecycle): train, save the encoder, summarise."""
    torch.manual_seed(config.schedule.seed)
    encoder = SwinEncoder(config.encoder)
    # One epoch = one region of every corpus volume at the global batch (epoch-counted recipes).
    epoch = math.ceil(len(corpus) / config.schedule.batch_size) if corpus is not None else None
    method = build_method(config.method, encoder, config.crop_size, config.schedule.steps, epoch)
    preprocess = config.preprocess.model_dump(mode="json")
    result, flops = None, None
    if corpus is not None:
        preprocess = corpus.preprocess.model_dump(mode="json")
        dataset = PretrainRegionDataset(
            corpus, method.region_size(config.crop_size), method.make_views, seed=config.schedule.seed
        )
        if info.is_main:
            n_params = sum(p.numel() for p in method.parameters() if p.requires_grad)
            run.log(
                f"{cls.name}: {len(corpus)} volumes, crop {config.crop_size}, {n_params / 1e6:.2f} M "
                f"trainable parameters, {config.schedule.steps} steps"
            )
        reset_peak_memory(info)
        flops = step_flops(method, dataset, config.schedule.batch_size, info)  # once, leaves no trace
        method.rank_history.clear()  # the FLOP count's forward was no training step
        probe = online_probe_validator(config, method, corpus.preprocess, run, info)
        result = train(
            method,
            dataset,
            config.schedule,
            run,
            info,
            validate=probe,
            val_every=config.probe.every,
            description=f"pretrain {cls.name}",
        )
    steps = config.schedule.steps if method.trains else 0
    meta = encoder_meta(
        method=cls.name,
        family=cls.family,
        encoder=config.encoder,
        preprocess=preprocess,
        crop_size=config.crop_size,
        steps=steps,
        config_hash=config_hash(config),
        exported_network=method.exported_network(),
        extra={"run_id": run.id},
    )
    if info.is_main:
        save_encoder(run.encoder_path, method.encoder_for_export(), meta)
    barrier(info)
    records = run.read_metrics()
    losses = [r["loss"] for r in records if "loss" in r]
    results: dict[str, Any] = {
        "kind": "pretrain",
        "method": cls.name,
        "family": cls.family,
        "encoder": str(run.encoder_path.relative_to(run.path)),
        "steps": steps,
        "final_loss": losses[-1] if losses else None,
        "wall_seconds": time.time() - started,
        "step_seconds": result.step_seconds if result else None,
        "health": health_verdict(records),
        "optimiser": operating_point(config, len(corpus) if corpus is not None else None),
        "pretext": method.pretext(),
        "cost": run_cost(flops, steps, time.time() - started, info),
        "data_wait_share": result.data_wait_share if result else None,
    }
    if results["health"]["collapsed"] and info.is_main:
        run.log(f"WARNING collapse: {results['health']['reason']}")
    return results


def online_probe_validator(
    config: PretrainConfig, method: SSLMethod, preprocess: PreprocessConfig, run: RunDir, info: DistInfo
) -> Validator | None:
    """The online frozen-encoder probe as the loop's validator (every ``probe.every`` steps, rank 0): the
    exported network (the teacher for DINO and iBOT) probed on the held-out probe set, logged as the
    ``probe`` record (``probe/dice`` in TensorBoard). The encoder before the first step is probed here too
    (step 0), once. None when the probe is off."""
    if config.probe.every is None:
        return None
    if not info.is_main:
        return lambda module, step: {}
    probe_set = load_probe_set(config.probe, preprocess, run.path / "cache")
    run.log(
        f"online probe every {config.probe.every} steps on {probe_set.task}: {len(probe_set.train)} training, "
        f"{len(probe_set.test)} test cases"
    )

    def validate(module: torch.nn.Module, step: int) -> dict[str, Any]:
        assert isinstance(module, SSLMethod)  # the loop passes the module it was given
        encoder = module.encoder_for_export()
        seed = config.schedule.seed
        return {"probe": online_probe(encoder, probe_set, config.probe, config.crop_size, seed, info.device)}

    if not any(r.get("step") == 0 and "probe" in r for r in run.read_metrics()):
        run.append_metrics({"step": 0, **validate(method, 0)})
    return validate
