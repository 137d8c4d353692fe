"""The GPU path end to end: every method's training step and fine-tuning at 96^3, timed, counted, checked.

    python benchmarks/gpu_suite.py                         # CUDA: smit preset, 96^3, bf16, eager and compiled
    python benchmarks/gpu_suite.py --peak-tflops 989       # override the device's peak bf16 TFLOP/s
    python benchmarks/gpu_suite.py --device cpu --tiny     # same code path at 32^3, tiny preset, 1 step, no compile

For each registered method that trains (``methods.build_method``, views from the method's own
``make_views``) and for fine-tuning (``train.finetune.SegmentationModule`` around the segmenter) it
prints the step time (median), samples/s, peak memory, and MFU: model FLOPs of one step counted by
``torch.utils.flop_counter.FlopCounterMode`` over the step time, against the device's peak dense
bf16 TFLOP/s (table below, matched on ``torch.cuda.get_device_name``; ``--peak-tflops`` overrides).
With and without ``torch.compile`` (the module's forward compiled; compile time is reported
separately and not in the step time); compiled runs are skipped, and said so, once ``--budget-s``
is spent, so the whole suite stays under 8 minutes.

Numerics: for each module one step (forward, backward) runs in fp32 and under bf16 and fp16
autocast from the same weights, batch and seed; the table gives |loss_amp - loss_fp32| / |loss_fp32|
and ||grad_amp - grad_fp32|| / ||grad_fp32|| over all parameters.

The step is the training loop's own :func:`medssl.train.step.train_step` (autocast, backward, the
module's ``cancel_gradients``, clipping or the module's ``clip_gradients``, optimizer step,
``on_after_step``) at a constant lr of 1e-5 and global-norm clip 1.0.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from medssl.config import EncoderConfig, MethodConfig
from medssl.methods import REGISTRY, build_method
from medssl.models import SwinEncoder, SwinSegmenter
from medssl.train.finetune import SegmentationModule

# Peak dense bf16 tensor-core TFLOP/s (no sparsity), from the vendors' data sheets.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 756.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A40": 150.0,
    "A10G": 125.0,
    "A10": 125.0,
    "A6000": 155.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "V100": 125.0,
    "T4": 65.0,
}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # "H100 SXM" before "H100"
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


Tensor = torch.Tensor


def build_case(name: str, config: EncoderConfig, crop: int, batch: int, device: torch.device) -> tuple[nn.Module, dict]:
    """A training module and one batch on ``device``: a method's views, or a segmentation crop."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    if name == "finetune":
        classes = 6
        module = SegmentationModule(SwinSegmenter(config, classes, crop_size=crop))
        data = {
            "image": torch.randn(batch, config.in_channels, crop, crop, crop),
            "label": torch.randint(0, classes, (batch, 1, crop, crop, crop)),
        }
    else:
        module = build_method(MethodConfig(name=name), SwinEncoder(config), crop_size=crop, total_steps=1000)
        region = module.region_size(crop)
        samples = [module.make_views(torch.rand(config.in_channels, region, region, region), rng) for _ in range(batch)]
        data = torch.utils.data.default_collate(samples)
    data = {k: v.to(device) if torch.is_tensor(v) else v for k, v in data.items()}
    return module.to(device), data


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_flops(module: nn.Module, data: dict, amp_dtype: torch.dtype | None) -> int:
    """FLOPs of one forward + backward, counted on a copy (the step itself stays untouched)."""
    probe = copy.deepcopy(module)
    device_type = next(probe.parameters()).device.type
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = probe(data, 0)["loss"]
        loss.backward()
    return counter.get_total_flops()


def time_module(
    module: nn.Module,
    data: dict,
    steps: int,
    amp_dtype: torch.dtype | None,
    compiled: bool,
    device: torch.device,
    warmup_step: bool = True,
) -> dict[str, float]:
    from medssl.config import ScheduleConfig
    from medssl.train.step import build_optimisation, train_step

    forward = torch.compile(module) if compiled else None
    schedule = ScheduleConfig(steps=steps + 1, lr=1e-5, min_lr=1e-5, warmup_steps=0, grad_clip=1.0)
    opt = build_optimisation(module, schedule, steps + 1, device)
    opt.amp_dtype = amp_dtype  # the dtype under test, whatever the device supports by default
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    if warmup_step:  # kernel selection, allocator growth and compilation
        train_step(opt, data, 0, forward)
    _sync(device)
    warmup = time.perf_counter() - t0
    times = []
    for i in range(1, steps + 1):
        _sync(device)
        t0 = time.perf_counter()
        train_step(opt, data, i, forward)
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"step_s": statistics.median(times), "warmup_s": warmup, "peak_gib": peak}


def numerics(module: nn.Module, data: dict, dtypes: list[torch.dtype]) -> dict[str, tuple[float, float]]:
    """Relative loss and gradient difference of one autocast step against fp32, from the same state."""

    def one(dtype: torch.dtype | None) -> tuple[float, Tensor]:
        probe = copy.deepcopy(module)
        torch.manual_seed(1)
        device_type = next(probe.parameters()).device.type
        with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            loss = probe(data, 0)["loss"]
        loss.float().backward()
        grads = [p.grad.float().flatten() for p in probe.parameters() if p.grad is not None]
        return float(loss.detach()), torch.cat(grads) if grads else torch.zeros(1)

    ref_loss, ref_grad = one(None)
    out = {}
    for dtype in dtypes:
        loss, grad = one(dtype)
        out[str(dtype).removeprefix("torch.")] = (
            abs(loss - ref_loss) / max(abs(ref_loss), 1e-12),
            float((grad - ref_grad).norm() / ref_grad.norm().clamp_min(1e-12)),
        )
    return out


def run_suite(
    device: torch.device,
    tiny: bool,
    steps: int,
    compile_too: bool,
    peak: float | None,
    budget_s: float,
    methods: list[str] | None = None,
    print_fn: Callable[[str], None] = print,
) -> list[dict]:
    crop, preset, batch = (32, "tiny", 1) if tiny else (96, "smit", 2)
    config = EncoderConfig(preset=preset)
    amp_dtype = torch.bfloat16
    names = methods or [m for m in sorted(REGISTRY) if REGISTRY[m].trains]
    names = [*names, "finetune"]
    skipped = sorted(m for m in REGISTRY if not REGISTRY[m].trains)
    start = time.perf_counter()
    print_fn(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
        f"preset {preset}, {crop}^3, batch {batch}, bf16 autocast, {steps} timed steps, peak "
        f"{peak if peak else 'unknown'} TFLOP/s; no training step (nothing to time): {', '.join(skipped)}"
    )
    print_fn(
        f"{'module':<14} {'compile':>7} | {'step s':>7} {'samples/s':>9} {'peak GiB':>8} {'GFLOP':>9} "
        f"{'MFU %':>6} {'warm s':>7} | {'bf16 dloss':>10} {'bf16 dgrad':>10} {'fp16 dloss':>10} "
        f"{'fp16 dgrad':>10}"
    )
    rows = []
    for name in names:
        module, data = build_case(name, config, crop, batch, device)
        flops = step_flops(module, data, amp_dtype)
        check = numerics(module, data, [torch.bfloat16, torch.float16])
        for compiled in [False, True] if compile_too else [False]:
            if compiled and time.perf_counter() - start > budget_s:
                print_fn(f"{name:<14} {'yes':>7} | skipped: the {budget_s:.0f} s budget is spent")
                continue
            timing = time_module(copy.deepcopy(module), data, steps, amp_dtype, compiled, device, not tiny)
            achieved = flops / timing["step_s"] / 1e12
            mfu = 100.0 * achieved / peak if peak else float("nan")
            row = {
                "module": name,
                "compiled": compiled,
                "flops": flops,
                "mfu_pct": mfu,
                "samples_per_s": batch / timing["step_s"],
                **timing,
                "numerics": check,
            }
            rows.append(row)
            b, f = check["bfloat16"], check["float16"]
            print_fn(
                f"{name:<14} {'yes' if compiled else 'no':>7} | {timing['step_s']:7.3f} "
                f"{row['samples_per_s']:9.2f} {timing['peak_gib']:8.2f} {flops / 1e9:9.1f} {mfu:6.1f} "
                f"{timing['warmup_s']:7.1f} | {b[0]:10.2e} {b[1]:10.2e} {f[0]:10.2e} {f[1]:10.2e}"
            )
    print_fn(f"total {time.perf_counter() - start:.0f} s")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="32^3, tiny preset, batch 1, 1 step without warm-up, no compile (the CPU test)",
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak bf16 TFLOP/s")
    parser.add_argument("--budget-s", type=float, default=360.0, help="skip compiled runs after this many seconds")
    parser.add_argument("--methods", nargs="+", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    steps = 1 if args.tiny else args.steps
    compile_too = not (args.tiny or args.no_compile)
    run_suite(device, args.tiny, steps, compile_too, peak_tflops(device, args.peak_tflops), args.budget_s, args.methods)


if __name__ == "__main__":
    main()
