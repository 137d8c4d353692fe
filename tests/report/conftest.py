"""A fake benchmark output written through ``RunDir``: no training, only the files runs leave behind."""

from __future__ import annotations

import time
import types
import zlib
from pathlib import Path

import numpy as np
import pytest

from medssl.config import MethodConfig, PretrainConfig, ScheduleConfig
from medssl.methods.recipe import operating_point
from medssl.methods.verdict import health_verdict
from medssl.runs import RunDir

METHODS = {"none": "none", "simmim": "mim", "dino": "self_distillation"}
# Method effect on Dice, so the ranking is known: simmim > dino > none.
METHOD_SKILL = {"none": 0.0, "simmim": 0.2, "dino": 0.1}
TASKS = {"ct_organs": "ct", "mri_brain": "mri"}
STRUCTURES = {1: "liver", 2: "spleen"}
LAYERS = ["patch_embed", "stage1", "stage2", "stage3", "stage4"]


def _finish(run: RunDir, info: dict, results: dict, metrics: list[dict]) -> None:
    run.prepare("fake: true\n", info)
    for record in metrics:
        run.append_metrics(record)
    run.write_results(results)
    run.set_status("finished")


def write_finetune_run(
    runs: Path,
    method: str,
    task: str,
    budget: int | str,
    seed: int = 0,
    n_cases: int = 3,
    finished: bool = True,
    skill: float | None = None,
) -> RunDir:
    family = METHODS.get(method, "mim")
    modality = TASKS.get(task, "ct")
    run_id = f"finetune-ft-{method}-{task}-b{budget}-s{seed}-000000000000"
    run = RunDir(runs / run_id)
    n_train = 12 if budget == "all" else int(budget)
    skill = METHOD_SKILL.get(method, 0.0) if skill is None else skill
    # Deterministic values: more labels help, the better method helps more with few labels.
    level = 0.55 + skill * (1.5 if budget != "all" else 1.0) + (0.15 if budget == "all" else 0.0)
    rng = np.random.default_rng(zlib.crc32(f"{method}/{task}/{budget}/{seed}".encode()))
    cases = []
    for c in range(n_cases):
        for label, structure in STRUCTURES.items():
            dice = float(np.clip(level + 0.02 * c - 0.03 * label + rng.normal(0, 0.01), 0, 1))
            cases.append(
                {
                    "case": f"case_{c:03d}",
                    "label": label,
                    "structure": structure,
                    "dice": dice,
                    "hd95": 10 * (1 - dice),
                    "nsd": min(1.0, dice + 0.05),
                }
            )
    steps = [25, 50, 75, 100]
    val = [round(level * (1 - np.exp(-(s / 25) * (1 + skill * 5))), 4) for s in steps]
    curve = [{"step": s, "epoch": s / n_train, "val_dice": v} for s, v in zip(steps, val, strict=True)]
    info = {
        "kind": "finetune",
        "run_id": run_id,
        "config_hash": f"{zlib.crc32(run_id.encode()):012x}",
        "created": time.time(),
        "code_version": "0.1.0",
        "method": method,
        "family": family,
        "encoder_checkpoint": None if method == "none" else f"/x/{method}/encoder.pt",
        "task": task,
        "task_path": f"/data/{task}",
        "modality": modality,
        "budget": budget,
        "n_train": n_train,
        "seed": seed,
        "preset": "tiny",
        "crop_size": 32,
        "steps": 100,
    }
    results = {
        "kind": "finetune",
        "method": method,
        "family": family,
        "task": task,
        "modality": modality,
        "budget": budget,
        "n_train": n_train,
        "seed": seed,
        "labels": {str(k): v for k, v in STRUCTURES.items()},
        "cases": cases,
        "val_curve": curve,
        "best_step": 100,
        "best_val_dice": val[-1],
        "model": "checkpoints/best.pt",
        "wall_seconds": 10.0,
        "step_seconds": 0.1,
        "steps": 100,
    }
    metrics = [{"step": s, "loss": 1.0 - v, "lr": 1e-4} for s, v in zip(steps, val, strict=True)]
    metrics += [{"step": p["step"], "val_dice": p["val_dice"], "val_dice_per_structure": {}} for p in curve]
    if finished:
        _finish(run, info, results, metrics)
    else:
        run.prepare("fake: true\n", info)
        run.set_status("running")
    return run


def write_pretrain_run(runs: Path, method: str, collapsed: bool = False) -> RunDir:
    """A finished pretraining run whose results come from the real health verdict and optimiser record
    (published recipe at batch 8); a collapsed run logs constant embeddings (spread 0)."""
    run_id = f"pretrain-{method}-000000000000"
    run = RunDir(runs / run_id)
    spread = 0.0 if collapsed else 0.5
    family = {**METHODS, "simclr": "contrastive"}[method]
    info = {
        "kind": "pretrain",
        "run_id": run_id,
        "config_hash": "a" * 12,
        "created": time.time(),
        "code_version": "0.1.0",
        "method": method,
        "family": family,
        "preset": "tiny",
        "crop_size": 32,
        "steps": 40,
    }
    metrics = [
        {
            "step": s,
            "loss": 2.0 / s,
            "lr": 1e-4,
            "health/embedding_std_scaled": spread,
            "health/embedding_rank": 1.0 if collapsed else 3.0,
            "health/feature_std_scaled": 0.1,
        }
        for s in range(1, 41, 5)
    ]
    config = PretrainConfig(
        method=MethodConfig(name=method), recipe="published", schedule=ScheduleConfig(steps=40, batch_size=8)
    )
    results = {
        "kind": "pretrain",
        "method": method,
        "family": family,
        "encoder": "checkpoints/encoder.pt",
        "steps": 40,
        "final_loss": metrics[-1]["loss"],
        "wall_seconds": 20.0,
        "step_seconds": 0.5,
        "health": health_verdict(metrics),
        "optimiser": operating_point(config),
        "cost": {
            "flops_per_step": 1e9 * (2 if method == "dino" else 1),
            "total_flops": 40e9 * (2 if method == "dino" else 1),
            "steps": 40,
            "wall_seconds": 20.0,
            "devices": 1,
            "device_kind": "cpu",
            "device_hours": 20.0 / 3600,
            "peak_memory_bytes": 2**30,
            "peak_memory_kind": "cpu_peak_rss",
        },
    }
    _finish(run, info, results, metrics)
    return run


def write_cka_run(runs: Path, method: str = "simmim", task: str = "ct_organs") -> RunDir:
    run_id = f"cka-{method}-{task}-000000000000"
    run = RunDir(runs / run_id)
    idx = np.arange(5)
    matrix = (1.0 / (1.0 + np.abs(idx[:, None] - idx[None, :]))).tolist()
    info = {
        "kind": "cka",
        "run_id": run_id,
        "config_hash": "b" * 12,
        "created": time.time(),
        "code_version": "0.1.0",
        "method": method,
        "task": task,
        "comparison": "pretrained_vs_finetuned",
        "model_a": "a.pt",
        "model_b": "b.pt",
    }
    results = {
        "kind": "cka",
        "method": method,
        "task": task,
        "comparison": "pretrained_vs_finetuned",
        "layers": LAYERS,
        "linear_cka": matrix,
        "minibatch_cka": matrix,
        "reuse": {name: matrix[i][i] - 0.1 * i for i, name in enumerate(LAYERS)},
        "model_a": "a.pt",
        "model_b": "b.pt",
        "n_crops": 16,
        "wall_seconds": 3.0,
    }
    _finish(run, info, results, [])
    return run


def write_benchmark(
    out: Path,
    n_cases: int = 3,
    methods=tuple(METHODS),
    tasks=tuple(TASKS),
    budgets=(2, "all"),
    pretrain=True,
    cka=True,
) -> Path:
    """The fixture the brief describes: methods × tasks × budgets × 1 seed, pretrain runs (one collapsed),
    one CKA run. Returns the ``runs`` folder."""
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    for method in methods:
        for task in tasks:
            for budget in budgets:
                write_finetune_run(runs, method, task, budget, n_cases=n_cases)
    if pretrain:
        write_pretrain_run(runs, "simmim")
        write_pretrain_run(runs, "dino", collapsed=True)
    if cka:
        write_cka_run(runs)
    return runs


@pytest.fixture
def fake_runs(tmp_path: Path) -> Path:
    return write_benchmark(tmp_path / "bench")


@pytest.fixture(scope="session")
def fake() -> types.SimpleNamespace:
    """The writers and constants above, for tests that build their own folders."""
    return types.SimpleNamespace(
        write_benchmark=write_benchmark,
        write_finetune_run=write_finetune_run,
        write_pretrain_run=write_pretrain_run,
        write_cka_run=write_cka_run,
        METHODS=METHODS,
        TASKS=TASKS,
        STRUCTURES=STRUCTURES,
        LAYERS=LAYERS,
    )
