"""Cost of a plan before running it, from step times: measured by finished runs of the same kind,
preset and crop size in ``<out>/runs`` when there are any, else timed now on random input.

Timed now means: the training loop's own step (:func:`medssl.train.step.train_step`, the run's schedule,
optimiser, autocast) on random regions of the run's crop size and batch, one untimed warm-up step, then
the mean of ``measure_steps`` timed steps, on this process's device. A CKA run is costed as its encoder
forwards (two models x ceil(n_crops / batch) batches, no gradient), timed the same way.

On a CPU, configurations larger than :data:`CPU_TIMING_LIMIT` (a paper-scale step takes minutes and tens
of GB there) are timed at a proxy: batch 1 and the largest crop in (64, 32) under the limit, same method,
preset and schedule, then scaled by batch x voxels. Swin's window attention, its MLPs and the decoder's
convolutions all grow linearly in the number of voxels, so the work does too; the proxy's fixed per-step
overhead makes the scaled figure err high (benchmarks/estimate_accuracy.py --proxy measures by how much).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
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
    labels: dict[str, Any] = field(default_factory=dict)  # the planned run's labels (method, task, budget...)

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

        return load_task(task).n_outputs  # output channels: classes, or regions
    except Exception:  # noqa: BLE001 - only an estimate: a broken task fails properly when it runs
        return 2


# A measurement: (seconds per step, how it was obtained) or the reason there is none.
Measurement = tuple[float, str] | str
Timer = Callable[[PlannedRun, Plan, int], Measurement]


def estimate_plan(
    plan: Plan, out: str | Path, measure: bool = True, measure_steps: int = 1, timer: Timer | None = None
) -> list[RunEstimate]:
    """Per run: steps x seconds per step, with where the step time came from.

    ``timer(run, plan, measure_steps)`` times a configuration nobody has finished yet (default
    :func:`measure_run`); runs of one configuration (:func:`planned_step_key`) share one measurement.
    """
    timer = timer or measure_run
    known = finished_step_times(runs_root(out))
    measured: dict[StepKey, Measurement] = {}
    estimates = []
    for run in plan.runs:
        key = planned_step_key(run) if run.kind != "cka" else cka_step_key(run, plan)
        steps = planned_steps(run) if key is not None else None
        labels = dict(run.labels)
        if RunDir(run.run_dir(out)).is_finished():
            estimates.append(RunEstimate(run.run_id, run.kind, steps, None, "finished", labels))
        elif key is None:
            estimates.append(RunEstimate(run.run_id, run.kind, None, None, "not estimated: no encoder known", labels))
        elif key in known:
            seconds = sum(known[key]) / len(known[key])
            source = f"from {len(known[key])} finished runs"
            estimates.append(RunEstimate(run.run_id, run.kind, steps, seconds, source, labels))
        elif not measure:
            estimates.append(RunEstimate(run.run_id, run.kind, steps, None, "not estimated", labels))
        else:
            if key not in measured:
                measured[key] = timer(run, plan, measure_steps)
            value = measured[key]
            if isinstance(value, str):
                estimates.append(RunEstimate(run.run_id, run.kind, steps, None, f"not estimated: {value}", labels))
            else:
                estimates.append(RunEstimate(run.run_id, run.kind, steps, value[0], value[1], labels))
    return estimates


def planned_steps(run: PlannedRun) -> int:
    """Optimiser steps of a training run; encoder forward batches of a CKA run (two models)."""
    config: Any = run.config
    if run.kind == "cka":
        return 2 * math.ceil(config.n_crops / config.batch_size)
    return int(config.schedule.steps)


def _cka_encoder(run: PlannedRun, plan: Plan) -> Any:
    """The encoder config of the runs a CKA run compares (their checkpoints do not exist yet)."""
    by_id = plan.by_id()
    for dep in run.depends_on:
        encoder = getattr(by_id[dep].config, "encoder", None) if dep in by_id else None
        if encoder is not None:
            return encoder
    return None


def cka_step_key(run: PlannedRun, plan: Plan) -> StepKey | None:
    encoder = _cka_encoder(run, plan)
    if encoder is None:
        return None
    config: Any = run.config
    return ("cka", None, encoder.preset, int(config.crop_size), int(config.batch_size))


def time_encoder_forward(encoder_config: Any, crop: int, batch_size: int, steps: int = 2, device: Any = None) -> float:
    """Mean seconds of one no-gradient fp32 encoder forward (what CKA runs per batch), one warm-up excluded."""
    import time

    import torch

    from medssl.models.encoder import SwinEncoder
    from medssl.train.step import synchronize

    device = device or _device()
    torch.manual_seed(0)
    encoder = SwinEncoder(encoder_config).to(device).eval()
    x = torch.rand(batch_size, encoder_config.in_channels, crop, crop, crop, device=device)
    times = []
    with torch.no_grad():
        for i in range(1 + max(steps, 1)):
            synchronize(device)
            t0 = time.perf_counter()
            encoder(x)
            synchronize(device)
            if i >= 1:
                times.append(time.perf_counter() - t0)
    return sum(times) / len(times)


# On a CPU, time only configurations up to the tiny preset at 64^3, batch 2 (seconds per step):
# a paper-scale step (smit, 96^3, batch 8) takes minutes and tens of GB there. Larger ones are timed
# at a proxy (:func:`cpu_proxy`) and scaled.
CPU_TIMING_LIMIT = 12 * 2 * 64**3  # feature_size x batch x crop voxels
# Batch 2: the projectors' BatchNorm needs two samples. Crops in order of preference; fine-tuning starts at
# 64^3 (instance norm of the 1-voxel bottleneck of a 32^3 crop fails), as does a method refusing 32^3.
PROXY_BATCH = 2
PROXY_CROPS = (32, 64)


def cpu_proxy_crops(feature_size: int, batch_size: int, crop: int, kind: str) -> list[int]:
    """Crops to try (batch :data:`PROXY_BATCH`) instead on a CPU; empty when the configuration is small enough."""
    if feature_size * batch_size * crop**3 <= CPU_TIMING_LIMIT:
        return []
    smallest = 64 if kind == "finetune" else 32
    return [c for c in PROXY_CROPS if smallest <= c < crop] or [crop]


def device_description(device: Any = None) -> str:
    """The device step times are measured on, in words: ``cuda (NVIDIA H200)``, ``cpu (2 threads)``."""
    import torch

    device = device or _device()
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def measure_run(run: PlannedRun, plan: Plan, steps: int) -> Measurement:
    """Step time of a run's configuration measured now, with how; or the reason it could not be measured."""
    device = _device()
    config: Any = run.config
    if run.kind == "cka":
        encoder = _cka_encoder(run, plan)
        batch, crop = config.batch_size, config.crop_size
    else:
        encoder, batch, crop = config.encoder, config.schedule.batch_size, config.crop_size
    proxies = cpu_proxy_crops(encoder.feature_size or 0, batch, crop, run.kind) if device.type == "cpu" else []
    error = ""
    for proxy_crop in proxies or [crop]:
        proxy_batch = PROXY_BATCH if proxies else batch
        try:
            seconds = _time_config(run, config, encoder, proxy_batch, proxy_crop, steps, device)
        except Exception as err:  # noqa: BLE001 - an estimate must not stop the dry run
            error = describe_error(err, limit=160)
            continue
        if not proxies:
            return seconds, f"measured now ({device.type})"
        scale = work_scale(batch, crop, proxy_batch, proxy_crop)
        return seconds * scale, f"measured now ({device.type}, {proxy_batch} x {proxy_crop}^3 proxy x {scale:.0f})"
    return error


def _time_config(run: PlannedRun, config: Any, encoder: Any, batch: int, crop: int, steps: int, device: Any) -> float:
    if run.kind == "cka":
        return time_encoder_forward(encoder, crop, batch, steps=steps, device=device)
    sized = config.model_copy(update={"crop_size": crop, "schedule": _with_batch(config.schedule, batch)})
    if isinstance(config, PretrainConfig):
        return time_pretrain_step(sized, steps=steps, device=device)
    return time_finetune_step(sized, out_channels=_n_classes(config.task), steps=steps, device=device)


def _with_batch(schedule: ScheduleConfig, batch_size: int) -> ScheduleConfig:
    return schedule.model_copy(update={"batch_size": batch_size})


def work_scale(batch: int, crop: int, proxy_batch: int, proxy_crop: int) -> float:
    """Work of the real step over that of the proxy: batch x voxels."""
    return batch * crop**3 / (proxy_batch * proxy_crop**3)


def short_source(source: str) -> str:
    """A table cell: the reason a run was not estimated is printed below the table."""
    return "not estimated (see below)" if source.startswith("not estimated: ") else source


# --------------------------------------------------------------------------- per-stage totals


@dataclass
class StageRow:
    """Runs of one stage that share a label (a method's pretraining, a task x budget's fine-tuning)."""

    stage: str
    label: str
    runs: int
    steps: int  # summed over the runs still to do
    seconds: float  # summed over the runs still to do (those with an estimate)
    step_seconds: list[float]
    unknown: int  # unfinished runs without an estimate
    sources: list[str]

    @property
    def device_hours(self) -> float:
        return self.seconds / 3600.0


def stage_label(estimate: RunEstimate) -> str:
    """Pretraining per method, fine-tuning per task x budget (over seeds and encoders), CKA per comparison."""
    labels = estimate.labels
    if estimate.kind == "pretrain":
        return str(labels.get("method", "?"))
    if estimate.kind == "finetune":
        return f"{labels.get('task', '?')} budget {labels.get('budget', '?')}"
    return str(labels.get("comparison", estimate.kind))


def stage_rows(estimates: list[RunEstimate], stages: tuple[str, ...]) -> list[StageRow]:
    """:class:`StageRow` per (stage, label), in stage then plan order; finished runs cost nothing."""
    rows: dict[tuple[str, str], StageRow] = {}
    for est in estimates:
        key = (est.kind, stage_label(est))
        row = rows.setdefault(key, StageRow(est.kind, key[1], 0, 0, 0.0, [], 0, []))
        row.runs += 1
        if est.source == "finished":
            continue
        if est.seconds is None:
            row.unknown += 1
        else:
            row.steps += est.steps or 0
            row.seconds += est.seconds
            if est.step_seconds is not None and est.step_seconds not in row.step_seconds:
                row.step_seconds.append(est.step_seconds)
        if est.source not in row.sources:
            row.sources.append(est.source)
    order = {kind: i for i, kind in enumerate(stages)}
    return sorted(rows.values(), key=lambda r: order.get(r.stage, len(order)))
