"""Cost of a plan before running it, from step times: measured by finished runs of the same kind,
preset and crop size in ``<out>/runs`` when there are any, else timed now on random input."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medssl.config import FinetuneConfig, PretrainConfig, ScheduleConfig
from medssl.errors import describe_error
from medssl.runs import RunDir, list_runs

from .plan import Plan, PlannedRun, runs_root

StepKey = tuple[Any, ...]


@dataclass
class RunEstimate:
    run_id: str
    kind: str
    steps: int | None
    step_seconds: float | None
    source: str  # "finished" | "from N finished runs" | "measured now (cpu)" | "not estimated: ..."

    @property
    def seconds(self) -> float | None:
        if self.source == "finished":
            return 0.0
        if self.steps is None or self.step_seconds is None:
            return None
        return self.steps * self.step_seconds


def step_key(kind: str, method: str | None, preset: str, crop_size: int) -> StepKey:
    """Runs that cost the same per step: pretraining differs by method, fine-tuning does not."""
    return (kind, method if kind == "pretrain" else None, preset, int(crop_size))


def planned_step_key(run: PlannedRun) -> StepKey | None:
    config = run.config
    if isinstance(config, PretrainConfig):
        return step_key("pretrain", config.method.name, config.encoder.preset, config.crop_size)
    if isinstance(config, FinetuneConfig):
        return step_key("finetune", None, config.encoder.preset, config.crop_size)
    return None


def finished_step_times(root: str | Path) -> dict[StepKey, list[float]]:
    """``step_seconds`` of every finished run under ``root``, grouped by :func:`step_key`."""
    times: dict[StepKey, list[float]] = defaultdict(list)
    for run in list_runs(root):
        if not run.is_finished():
            continue
        info, results = run.info(), run.results() or {}
        seconds = results.get("step_seconds")
        if info.get("kind") not in ("pretrain", "finetune") or not isinstance(seconds, int | float):
            continue
        if info.get("preset") is None or info.get("crop_size") is None:
            continue
        times[step_key(info["kind"], info.get("method"), info["preset"], info["crop_size"])].append(float(seconds))
    return dict(times)


def _device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _mean_step_seconds(module: Any, batch: dict[str, Any], schedule: ScheduleConfig, steps: int, device: Any) -> float:
    """Mean seconds of the training loop's own step (:func:`medssl.train.step.train_step`: the run's
    schedule, autocast, backward, gradient cancelling, clipping, optimiser, EMA) on ``batch``."""
    from medssl.train.step import build_optimisation, time_train_steps

    module.to(device).train()
    opt = build_optimisation(module, schedule, schedule.steps, device)
    times = time_train_steps(opt, batch, max(steps, 1), warmup=1)
    return sum(times) / len(times)


def time_pretrain_step(config: PretrainConfig, steps: int = 2, device: Any = None) -> float:
    """Seconds per optimiser step of ``config``'s method on random regions (views built outside the timing)."""
    import numpy as np
    import torch
    from torch.utils.data import default_collate

    from medssl.methods import build_method
    from medssl.models.encoder import SwinEncoder

    device = device or _device()
    torch.manual_seed(0)
    encoder = config.encoder
    model = build_method(config.method, SwinEncoder(encoder), config.crop_size, total_steps=config.schedule.steps)
    rng = np.random.default_rng(0)
    side = model.region_size(config.crop_size)
    samples = [
        model.make_views(torch.rand(encoder.in_channels, side, side, side), rng)
        for _ in range(config.schedule.batch_size)
    ]
    batch = {k: v.to(device) for k, v in default_collate(samples).items()}
    return _mean_step_seconds(model, batch, config.schedule, steps, device)


def time_finetune_step(config: FinetuneConfig, out_channels: int = 2, steps: int = 2, device: Any = None) -> float:
    """Seconds per optimiser step of the fine-tuning module (segmenter + its loss) on random crops."""
    import torch

    from medssl.models.segmenter import SwinSegmenter
    from medssl.train.finetune import SegmentationModule

    device = device or _device()
    torch.manual_seed(0)
    encoder, crop, batch_size = config.encoder, config.crop_size, config.schedule.batch_size
    module = SegmentationModule(SwinSegmenter(encoder, out_channels, crop_size=crop, norm=config.norm), config.loss)
    batch = {
        "image": torch.rand(batch_size, encoder.in_channels, crop, crop, crop, device=device),
        "label": torch.randint(0, out_channels, (batch_size, 1, crop, crop, crop), device=device),
    }
    return _mean_step_seconds(module, batch, config.schedule, steps, device)


def _n_classes(task: Path | None) -> int:
    if task is None or not Path(task).exists():
        return 2
    try:
        from medssl.data.tasks import load_task

        return load_task(task).n_classes
    except Exception:  # noqa: BLE001 - only an estimate: a broken task fails properly when it runs
        return 2


def estimate_plan(plan: Plan, out: str | Path, measure: bool = True, measure_steps: int = 1) -> list[RunEstimate]:
    """Per run: steps x seconds per step, with where the step time came from."""
    known = finished_step_times(runs_root(out))
    measured: dict[StepKey, float | str] = {}
    device = _device() if measure else None
    estimates = []
    for run in plan.runs:
        key = planned_step_key(run)
        steps = run.config.schedule.steps if isinstance(run.config, PretrainConfig | FinetuneConfig) else None
        if RunDir(run.run_dir(out)).is_finished():
            estimates.append(RunEstimate(run.run_id, run.kind, steps, None, "finished"))
        elif key is None:
            estimates.append(RunEstimate(run.run_id, run.kind, None, None, "not estimated: analysis run (short)"))
        elif key in known:
            seconds = sum(known[key]) / len(known[key])
            estimates.append(RunEstimate(run.run_id, run.kind, steps, seconds, f"from {len(known[key])} finished runs"))
        elif not measure:
            estimates.append(RunEstimate(run.run_id, run.kind, steps, None, "not estimated"))
        else:
            if key not in measured:
                measured[key] = _measure(run, measure_steps)
            value = measured[key]
            if isinstance(value, str):
                estimates.append(RunEstimate(run.run_id, run.kind, steps, None, f"not estimated: {value}"))
            else:
                where = getattr(device, "type", "cpu")
                estimates.append(RunEstimate(run.run_id, run.kind, steps, value, f"measured now ({where})"))
    return estimates


# On a CPU, time only configurations up to the tiny preset at 64^3, batch 2 (seconds per step):
# a paper-scale step (smit, 96^3, batch 8) takes minutes and tens of GB there, and says nothing
# about the GPUs it will run on.
CPU_TIMING_LIMIT = 12 * 2 * 64**3  # feature_size x batch x crop voxels
TOO_LARGE_FOR_CPU = "too large to time on this CPU"


def _too_large_for_cpu(config: PretrainConfig | FinetuneConfig) -> bool:
    return (config.encoder.feature_size or 0) * config.schedule.batch_size * config.crop_size**3 > CPU_TIMING_LIMIT


def _measure(run: PlannedRun, steps: int) -> float | str:
    """Step time of a run's configuration, or the reason it could not be measured."""
    config = run.config
    assert isinstance(config, PretrainConfig | FinetuneConfig)
    if _device().type == "cpu" and _too_large_for_cpu(config):
        return TOO_LARGE_FOR_CPU
    try:
        if isinstance(config, PretrainConfig):
            return time_pretrain_step(config, steps=steps)
        return time_finetune_step(config, out_channels=_n_classes(config.task), steps=steps)
    except Exception as err:  # noqa: BLE001 - an estimate must not stop the dry run
        return describe_error(err, limit=160)
