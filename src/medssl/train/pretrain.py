"""Pretraining: one SSL method on one corpus, ending in an encoder checkpoint with metadata."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from medssl.config import PretrainConfig, config_hash, dump_yaml
from medssl.data.corpus import Corpus
from medssl.data.datasets import PretrainRegionDataset
from medssl.errors import ConfigError
from medssl.methods import build_method
from medssl.methods.base import COLLAPSE_THRESHOLD, SSLMethod
from medssl.models.checkpoint import encoder_meta, save_encoder
from medssl.models.encoder import SwinEncoder
from medssl.runs import RunDir
from medssl.train.distributed import DistInfo, barrier, init_distributed
from medssl.train.loop import train
from medssl.train.session import AlreadyFinished, finish, run_session


def collapse_verdict(records: list[dict[str, Any]], tail: int = 3) -> dict[str, Any]:
    """Judge collapse from the last logged ``embedding_std`` values (normalised: ~1 healthy)."""
    stds = [r["embedding_std"] for r in records if isinstance(r.get("embedding_std"), int | float)]
    entropies = [r["teacher_entropy"] for r in records if isinstance(r.get("teacher_entropy"), int | float)]
    verdict: dict[str, Any] = {"collapsed": False, "reason": None, "embedding_std": None,
                               "threshold": COLLAPSE_THRESHOLD,
                               "teacher_entropy": entropies[-1] if entropies else None}
    if not stds:
        return verdict
    recent = stds[-tail:]
    value = float(sum(recent) / len(recent))
    verdict["embedding_std"] = value
    if not math.isfinite(value) or value < COLLAPSE_THRESHOLD:
        verdict["collapsed"] = True
        verdict["reason"] = (f"embedding std {value:.4f} < {COLLAPSE_THRESHOLD} over the last {len(recent)} logs: "
                             "embeddings collapsed to (nearly) one point")
    return verdict


def pretrain_info(config: PretrainConfig, cls: type[SSLMethod]) -> dict[str, Any]:
    return {"kind": "pretrain", "method": config.method.name, "family": cls.family,
            "config_hash": config_hash(config), "preset": config.encoder.preset,
            "crop_size": config.crop_size, "steps": config.schedule.steps}


def run_pretrain(config: PretrainConfig, run_dir: str | Path, info: DistInfo | None = None) -> dict[str, Any]:
    """Pretrain ``config.method`` into ``run_dir``; resume if interrupted; no-op when finished."""
    from medssl.methods import REGISTRY

    run = RunDir(run_dir)
    if run.is_finished():
        return run.results() or {}
    if config.method.name not in REGISTRY:
        known = ", ".join(sorted(REGISTRY))
        raise ConfigError("method.name", f"unknown method '{config.method.name}' (known: {known})")
    cls = REGISTRY[config.method.name]
    info = info or init_distributed()
    try:
        with run_session(run, info, dump_yaml(config), pretrain_info(config, cls)) as started:
            torch.manual_seed(config.schedule.seed)
            encoder = SwinEncoder(config.encoder)
            method = build_method(config.method, encoder, config.crop_size, config.schedule.steps)
            preprocess = config.preprocess.model_dump(mode="json")
            result = None
            if method.trains and config.schedule.steps > 0:
                if config.corpus is None:
                    raise ConfigError("corpus", f"method '{cls.name}' needs a corpus to pretrain on")
                corpus = Corpus.open(config.corpus)
                preprocess = corpus.preprocess.model_dump(mode="json")
                dataset = PretrainRegionDataset(corpus, method.region_size(config.crop_size), method.make_views,
                                                seed=config.schedule.seed)
                if info.is_main:
                    n_params = sum(p.numel() for p in method.parameters() if p.requires_grad)
                    run.log(f"{cls.name}: {len(corpus)} volumes, crop {config.crop_size}, {n_params / 1e6:.2f} M "
                            f"trainable parameters, {config.schedule.steps} steps")
                result = train(method, dataset, config.schedule, run, info, description=f"pretrain {cls.name}")
            steps = config.schedule.steps if method.trains else 0
            meta = encoder_meta(method=cls.name, family=cls.family, encoder=config.encoder, preprocess=preprocess,
                                crop_size=config.crop_size, steps=steps, config_hash=config_hash(config),
                                extra={"run_id": run.id})
            if info.is_main:
                save_encoder(run.encoder_path, method.encoder, meta)
            barrier(info)
            records = run.read_metrics()
            losses = [r["loss"] for r in records if "loss" in r]
            results: dict[str, Any] = {
                "kind": "pretrain", "method": cls.name, "family": cls.family,
                "encoder": str(run.encoder_path.relative_to(run.path)), "steps": steps,
                "final_loss": losses[-1] if losses else None,
                "wall_seconds": time.time() - started,
                "step_seconds": result.step_seconds if result else None,
                "data_wait_share": result.data_wait_share if result else None,
                "collapse": collapse_verdict(records),
            }
            if results["collapse"]["collapsed"] and info.is_main:
                run.log(f"WARNING collapse: {results['collapse']['reason']}")
            finish(run, info, results)
    except AlreadyFinished:
        return run.results() or {}
    return results
