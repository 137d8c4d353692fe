"""Pretraining step time and peak memory of every SSL method, against a plain encoder step.

    python benchmarks/pretrain_step.py                       # 64^3 tiny and 96^3 base, every method
    python benchmarks/pretrain_step.py --configs 64:tiny --methods simmim dino --steps 3
    python benchmarks/pretrain_step.py --device cuda --amp bf16

For each (crop size, preset) it first times one plain encoder forward + backward + AdamW step on a
batch of single crops (the baseline), then each method's full step (all its views, heads, teacher,
loss, EMA update) on the same batch size, all in this one run. The ratio method/baseline is the
method's overhead over a single-view encoder. Both are timed through the training loop's own
step (``medssl.train.step.train_step``: autocast, backward, gradient cancelling, clipping, AdamW,
EMA). Views are built on the CPU as in training (data workers); their time per batch is printed
separately and not counted in the step.
Peak memory: CUDA max allocated on GPU; on CPU the rise in the process's peak RSS during that
method's steps (each configuration runs in a fresh subprocess so peaks do not mask each other).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time

import numpy as np
import torch


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class EncoderOnly(torch.nn.Module):
    """The baseline as a training module: one plain encoder forward on single crops, mean of its outputs."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, batch: dict, step: int) -> dict:
        return {"loss": sum(o.float().mean() for o in self.encoder(batch["image"]))}


def measure(
    method_name: str, crop: int, preset: str, batch: int, steps: int, device: str, amp: str, window: int | None
) -> dict:
    """One configuration, in a fresh process: returns timings and memory as a dict. Every step is the
    training loop's own (``medssl.train.step.train_step``, pretraining schedule defaults, ``amp``)."""
    from medssl.config import EncoderConfig, MethodConfig, PretrainConfig
    from medssl.methods import REGISTRY, build_method
    from medssl.models import SwinEncoder
    from medssl.train.step import build_optimisation, time_train_steps

    torch.manual_seed(0)
    dev = torch.device(device)
    cfg = EncoderConfig(preset=preset, window_size=window)
    schedule = PretrainConfig().schedule.model_copy(update={"amp": amp, "steps": 1000})
    rng = np.random.default_rng(0)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rss0 = _rss_mb()

    if method_name == "baseline":
        module = EncoderOnly(SwinEncoder(cfg)).to(dev)
        batch_views = {"image": torch.randn(batch, 1, crop, crop, crop, device=dev)}
        view_seconds = 0.0
    else:
        module = build_method(MethodConfig(name=method_name), SwinEncoder(cfg), crop_size=crop, total_steps=1000)
        module = module.to(dev)
        region = module.region_size(crop)
        t0 = time.perf_counter()
        samples = [module.make_views(torch.rand(1, region, region, region), rng) for _ in range(batch)]
        view_seconds = time.perf_counter() - t0
        batch_views = torch.utils.data.default_collate(samples)
        batch_views = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch_views.items()}

    module.train()
    opt = build_optimisation(module, schedule, schedule.steps, dev)
    times = time_train_steps(opt, batch_views, steps, warmup=1)  # the first step pays allocation
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else _rss_mb() - rss0
    n_params = sum(p.numel() for p in module.parameters())
    return {
        "method": method_name,
        "family": "-" if method_name == "baseline" else REGISTRY[method_name].family,
        "step_s": statistics.median(times),
        "views_s": view_seconds,
        "peak_mb": peak,
        "params_m": n_params / 1e6,
    }


def _child(queue, args) -> None:
    torch.set_num_threads(args[-1])
    try:
        queue.put(measure(*args[:-1]))
    except Exception as err:  # noqa: BLE001 - report and keep benchmarking the other methods
        queue.put({"method": args[0], "error": f"{type(err).__name__}: {err}"})


def run_isolated(*args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, args))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    from medssl.methods import REGISTRY

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["64:tiny", "96:base"], help="crop:preset pairs")
    parser.add_argument("--methods", nargs="+", default=[m for m in sorted(REGISTRY) if REGISTRY[m].trains])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--window", type=int, default=None, help="override the preset's window size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()

    rows = []
    for spec in args.configs:
        crop, preset = spec.split(":")
        crop = int(crop)
        base = run_isolated(
            "baseline", crop, preset, args.batch, args.steps, args.device, args.amp, args.window, args.threads
        )
        if "error" in base:
            print(f"{spec}: baseline failed: {base['error']}")
            continue
        print(
            f"\n{crop}^3, preset {preset}, batch {args.batch}, device {args.device}, amp {args.amp}, "
            f"threads {args.threads}"
        )
        print(
            f"  {'method':14s} {'family':18s} {'step ms':>9s} {'x baseline':>10s} {'views ms':>9s} "
            f"{'peak MB':>9s} {'params M':>9s}"
        )
        print(
            f"  {'encoder only':14s} {'-':18s} {base['step_s'] * 1e3:9.1f} {1.0:10.2f} {0.0:9.1f} "
            f"{base['peak_mb']:9.0f} {base['params_m']:9.2f}"
        )
        for name in args.methods:
            r = run_isolated(
                name, crop, preset, args.batch, args.steps, args.device, args.amp, args.window, args.threads
            )
            if "error" in r:
                print(f"  {name:14s} failed: {r['error']}")
                continue
            r.update(crop=crop, preset=preset, ratio=r["step_s"] / base["step_s"], baseline_s=base["step_s"])
            rows.append(r)
            print(
                f"  {name:14s} {r['family']:18s} {r['step_s'] * 1e3:9.1f} {r['ratio']:10.2f} "
                f"{r['views_s'] * 1e3:9.1f} {r['peak_mb']:9.0f} {r['params_m']:9.2f}"
            )
            sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
