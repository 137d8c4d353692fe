"""Pretraining step time and peak memory of every SSL method, against the encoder passes its views require.

    python benchmarks/pretrain_step.py                       # 64^3 tiny and 96^3 base, every method
    python benchmarks/pretrain_step.py --configs 64:tiny --methods simmim dino --steps 3
    python benchmarks/pretrain_step.py --configs 64:tiny --compare-src /tmp/old_ca9189f/src   # before/after
    python benchmarks/pretrain_step.py --configs 64:tiny --methods dino --profile 15           # where it goes
    python benchmarks/pretrain_step.py --device cuda --amp bf16

For each (crop size, preset), all in this one run, each in a fresh subprocess:

* ``bare``: one plain encoder forward + backward + AdamW step on a batch of single ``crop_size`` crops
  (the issue-#10 baseline of the first round);
* ``required``: the encoder passes the method's views require, each at its own crop size and batch, with
  nothing else (no heads, no loss, no EMA): the student views forward + backward, the teacher views
  forward only (no grad), plus the AdamW step of the encoder. Views of one size are one encoder call
  (as the methods batch them: DINO's ``MultiCropWrapper`` concatenates crops of equal resolution). The
  passes per method are :data:`PASSES` (read off each method's ``forward``);
* the method's full step (views, heads, teacher, loss, health, EMA update) on the same batch.

Ratios: ``step / required`` (the issue's target: <= 1.5, or a reason in the ``why`` column) and
``step / bare``. With ``--compare-src DIR`` each method is timed a second time with the ``medssl`` package
of ``DIR`` (e.g. a checkout of the previous commit) on the same views: ``before ms`` and its ratio.
Every step is the training loop's own (``medssl.train.step.train_step``: autocast, backward, gradient
cancelling, clipping, AdamW, EMA), ``--steps`` of them after one warm-up step; ``--clock``: the median
wall time (GPU) or the process's CPU time per step (CPU: on a shared machine, at ``--threads 1``, what
other jobs do not inflate). Views are built on the
CPU as in training (data workers); their time per batch is printed separately and not counted.
Peak memory: CUDA max allocated on GPU; on CPU the rise in the process's peak RSS during that
configuration's steps. ``--profile N`` prints, per method, the N most expensive operations
(``torch.profiler``, CPU self time plus CUDA time on GPU) of one step after the timed ones.
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

from medssl.training_module import TrainingHooks

# (batch key, grad) per encoder call the method's forward needs. A key names a view tensor of shape
# (B, V, C, *S) or (B, C, *S); its samples are one call. "grad": student (forward + backward);
# False: teacher / momentum branch (forward only, no grad).
PASSES: dict[str, list[tuple[str, bool]]] = {
    "simmim": [("image", True)],
    "rotnet": [("image", True)],  # all rotations of a sample, one call
    "simclr": [("view1+view2", True)],
    "swinunetr_ssl": [("view1+view2", True)],
    "mocov3": [("view1+view2", True), ("view1+view2", False)],
    "byol": [("view1+view2", True), ("view1+view2", False)],
    "smit": [("crops", True), ("crops", False)],
    "dino": [("global_crops", True), ("local_crops", True), ("global_crops", False)],
    "ibot": [("global_crops", True), ("local_crops", True), ("global_crops", False)],
}

# Why a method's step cannot come down to 1.5x its encoder passes at these sizes (printed with the row
# when its ratio is above 1.5): work the algorithm itself does besides the encoder.
WHY: dict[str, str] = {
    "dino": "DINO head on every crop (K prototypes, 2048-wide MLP) + its EMA teacher + AdamW/EMA/"
    "per-parameter clipping over the head's parameters",
    "ibot": "as DINO, plus the head on every bottleneck token (patch logits, K' prototypes)",
    "smit": "two DINO heads on every stage-3 token (global + patch, K prototypes) + the L1 decoder",
    "mocov3": "3-layer 4096-wide projector + 2-layer predictor (BatchNorm), their EMA copy",
    "byol": "2-layer 4096-wide projector + predictor, their EMA copy",
    "simclr": "2048-wide projector",
    "swinunetr_ssl": "convolutional reconstruction decoder back to full resolution",
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _view_batch(batch: dict, key: str) -> torch.Tensor:
    """The images of ``key`` (``a+b``: concatenated) flattened to one encoder batch (N, C, *S)."""
    parts = []
    for k in key.split("+"):
        x = batch[k]
        parts.append(x.flatten(0, 1) if x.ndim == 6 else x)
    return torch.cat(parts, dim=0)


class EncoderOnly(TrainingHooks):
    """``bare``: one plain encoder forward on single crops, the mean of its outputs as the loss."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, batch: dict, step: int) -> dict:
        return {"loss": sum(o.float().mean() for o in self.encoder(batch["image"]))}


class RequiredPasses(TrainingHooks):
    """``required``: the student calls (forward + backward) and teacher calls (forward only, a frozen copy)
    of a method's views, nothing else."""

    def __init__(self, encoder: torch.nn.Module, passes: list[tuple[str, bool]]) -> None:
        super().__init__()
        import copy

        self.encoder = encoder
        self.passes = passes
        self.teacher = copy.deepcopy(encoder).requires_grad_(False).eval()

    def forward(self, batch: dict, step: int) -> dict:
        loss = 0.0
        for key, grad in self.passes:
            x = batch[key]
            if grad:
                loss = loss + sum(o.float().mean() for o in self.encoder(x))
            else:
                with torch.no_grad():
                    self.teacher(x)
        return {"loss": loss}


def measure(
    kind: str,
    method_name: str,
    crop: int,
    preset: str,
    batch: int,
    steps: int,
    device: str,
    amp: str,
    window: int | None,
    profile: int,
    clock: str,
) -> dict:
    """One configuration, in a fresh process (``kind``: bare, required or method): timings and memory."""
    from medssl.config import EncoderConfig, MethodConfig, PretrainConfig
    from medssl.methods import REGISTRY, build_method
    from medssl.models import SwinEncoder
    from medssl.train.step import build_optimisation, time_train_steps, train_step

    torch.manual_seed(0)
    dev = torch.device(device)
    cfg = EncoderConfig(preset=preset, window_size=window)
    schedule = PretrainConfig().schedule.model_copy(update={"amp": amp, "steps": 1000})
    rng = np.random.default_rng(0)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rss0 = _rss_mb()

    view_seconds = 0.0
    shapes = ""
    if kind == "bare":
        module: torch.nn.Module = EncoderOnly(SwinEncoder(cfg))
        batch_views = {"image": torch.randn(batch, 1, crop, crop, crop)}
    else:
        method = build_method(MethodConfig(name=method_name), SwinEncoder(cfg), crop_size=crop, total_steps=1000)
        region = method.region_size(crop)
        t0 = time.perf_counter()
        samples = [method.make_views(torch.rand(1, region, region, region), rng) for _ in range(batch)]
        view_seconds = time.perf_counter() - t0
        batch_views = torch.utils.data.default_collate(samples)
        if kind == "required":
            passes = PASSES[method_name]
            batch_views = {key: _view_batch(batch_views, key) for key, _ in passes}
            shapes = " + ".join(
                f"{batch_views[key].shape[0]}x{batch_views[key].shape[-1]}^3{'' if grad else ' fwd'}"
                for key, grad in passes
            )
            module = RequiredPasses(method.encoder, passes)
        else:
            module = method
    module = module.to(dev)
    batch_views = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch_views.items()}
    module.train()
    opt = build_optimisation(module, schedule, schedule.steps, dev)
    time_train_steps(opt, batch_views, 0, warmup=1)  # the first step pays allocation
    cpu0 = time.process_time()
    times = time_train_steps(opt, batch_views, steps, warmup=0, first_step=1)
    cpu_s = (time.process_time() - cpu0) / max(steps, 1)
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else _rss_mb() - rss0
    row = {
        "kind": kind,
        "method": method_name,
        "family": REGISTRY[method_name].family if method_name in REGISTRY else "-",
        "wall_s": statistics.median(times),
        "cpu_s": cpu_s,
        "step_s": cpu_s if clock == "cpu" else statistics.median(times),
        "views_s": view_seconds,
        "peak_mb": peak,
        "params_m": sum(p.numel() for p in module.parameters()) / 1e6,
        "passes": shapes,
    }
    if profile and kind == "method":
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            train_step(opt, batch_views, steps + 1)
        sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        row["profile"] = prof.key_averages().table(sort_by=sort, row_limit=profile)
    return row


def _child(queue, src, threads, args) -> None:
    if src:
        sys.path.insert(0, src)
    torch.set_num_threads(threads)
    try:
        queue.put(measure(*args))
    except Exception as err:  # noqa: BLE001 - report and keep benchmarking the other methods
        queue.put({"method": args[1], "error": f"{type(err).__name__}: {err}"})


def run_isolated(src: str | None, threads: int, *args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, src, threads, args))
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
    parser.add_argument("--compare-src", default=None, help="also time each method with medssl from this src dir")
    parser.add_argument("--profile", type=int, default=0, help="print the N most expensive ops of each method")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument(
        "--clock",
        choices=["auto", "wall", "cpu"],
        default="auto",
        help="what a step's time is: wall clock (median), or the process's CPU time per step (mean); auto: "
        "CPU time on a CPU device (robust to other jobs on a shared machine at --threads 1), wall on GPU",
    )
    args = parser.parse_args()
    clock = args.clock if args.clock != "auto" else ("cpu" if args.device == "cpu" else "wall")

    rows = []
    for spec in args.configs:
        crop_s, preset = spec.split(":")
        crop = int(crop_s)

        def run(kind: str, name: str, src: str | None = None, profile: int = 0, crop=crop, preset=preset) -> dict:
            return run_isolated(
                src,
                args.threads,
                kind,
                name,
                crop,
                preset,
                args.batch,
                args.steps,
                args.device,
                args.amp,
                args.window,
                profile,
                clock,
            )

        bare = run("bare", "-")
        if "error" in bare:
            print(f"{spec}: bare encoder failed: {bare['error']}")
            continue
        print(
            f"\n{crop}^3, preset {preset}, batch {args.batch}, device {args.device}, amp {args.amp}, "
            f"threads {args.threads}, {args.steps} steps after one warm-up, clock: "
            f"{'process CPU time, mean' if clock == 'cpu' else 'wall, median'}"
        )
        print(f"  bare encoder step (fwd+bwd+AdamW, {args.batch}x{crop}^3): {bare['step_s'] * 1e3:.1f} ms")
        before_cols = f" {'before ms':>9s} {'bef/req':>7s}" if args.compare_src else ""
        print(
            f"  {'method':14s} {'required passes (N x side^3)':34s} {'req ms':>8s} {'step ms':>8s} "
            f"{'step/req':>8s} {'step/bare':>9s}{before_cols} {'views ms':>8s} {'peak MB':>8s} {'params M':>8s}  why"
        )
        for name in args.methods:
            req = run("required", name)
            r = run("method", name, profile=args.profile)
            if "error" in req or "error" in r:
                print(f"  {name:14s} failed: {req.get('error') or r.get('error')}")
                continue
            r.update(
                crop=crop,
                preset=preset,
                bare_s=bare["step_s"],
                required_s=req["step_s"],
                required_passes=req["passes"],
                ratio_required=r["step_s"] / req["step_s"],
                ratio_bare=r["step_s"] / bare["step_s"],
            )
            before = ""
            if args.compare_src:
                old = run("method", name, src=args.compare_src)
                if "error" in old:
                    before = f" {'failed':>9s} {'':>7s}"
                else:
                    r.update(before_s=old["step_s"], ratio_required_before=old["step_s"] / req["step_s"])
                    before = f" {old['step_s'] * 1e3:9.1f} {r['ratio_required_before']:7.2f}"
            why = WHY.get(name, "") if r["ratio_required"] > 1.5 else ""
            rows.append(r)
            print(
                f"  {name:14s} {req['passes']:34s} {req['step_s'] * 1e3:8.1f} {r['step_s'] * 1e3:8.1f} "
                f"{r['ratio_required']:8.2f} {r['ratio_bare']:9.2f}{before} {r['views_s'] * 1e3:8.1f} "
                f"{r['peak_mb']:8.0f} {r['params_m']:8.2f}  {why}"
            )
            if "profile" in r:
                print(r.pop("profile"))
            sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
