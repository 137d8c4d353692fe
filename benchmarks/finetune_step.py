"""Where a fine-tuning step's time goes, on the demo's settings, measured in one run.

    python benchmarks/finetune_step.py                        # the demo's settings, 1 and 2 threads
    python benchmarks/finetune_step.py --threads 1 --steps 3  # short mode
    python benchmarks/finetune_step.py --full-size            # + base preset, window 7, 96^3, one step
    python benchmarks/finetune_step.py --option mkldnn=off    # an alternative timed against the baseline
    python benchmarks/finetune_step.py --layout --steps 8      # 2 runs x 1 thread vs 1 run x 2 threads
    python benchmarks/finetune_step.py --vs-monai --size 64   # medssl's segmenter vs MONAI's SwinUNETR

**Profile** (default). On the demo's phantoms (``configs/demo.yaml``'s ``data.synth``, written to
``--workdir``) and its fine-tuning recipe (tiny preset, window 4, 32^3 crops, batch 2, Dice loss,
class-balanced crops, AdamW with clipping), one step is split into the parts the segmenter runs one
after another: loading the batch (``SegmentationCropDataset``, in the training process as the demo's
fine-tuning does), encoder forward, decoder forward (MONAI's UNETR blocks on the encoder's five feature
maps and the raw image), loss forward, loss backward, decoder backward, encoder backward, and the
optimiser (zero-grad, clipping, AdamW). The split detaches the encoder's outputs and the logits, so each
backward is timed alone; its sum is printed beside the loop's own ``train_step`` timed interleaved with
it (the split's own overhead). Then what a run adds per step: validation (sliding-window inference
on the validation cases and Dice) amortised over ``steps / val_every`` calls, the test evaluation
(sliding-window inference and HD95/NSD per test case) and the checkpoints, amortised over the run.
Every part is the median over ``--steps`` repetitions, interleaved so machine-load drift is shared.
On CPU the clock is the process's CPU time (``--clock auto``), which other jobs on a shared machine
inflate less than wall time; ``--clock wall`` for the wall clock.

**Thread layout** (``--layout``): the bench's local executor runs ``workers`` runs at a time with
``cores // workers`` threads each. On the demo's step (random input of the demo's shape) this times, on
the wall clock, two processes of 1 thread each stepping at the same time against one process of 2 threads
doing their steps one after the other (the same work), alternating ``--repeats`` times; it prints the
steps per second of each and their ratio. Wall time: run it on an otherwise idle machine.

``--option NAME=VALUE`` times the whole step (and validation) again with one setting changed, interleaved
with the baseline, and prints ratio = option / baseline: ``mkldnn=off`` (oneDNN off for the convolutions),
``sw_batch=N`` (windows per sliding-window forward), ``channels_last=decoder`` (the decoder's modules in
channels-last 3D memory format), ``adamw=loop|foreach|fused`` (torch's AdamW implementations; the step
uses ``fused``).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from monai.losses import DiceCELoss, DiceLoss
from monai.networks.nets import SwinUNETR
from torch import Tensor
from torch.utils.data import default_collate

from medssl.config import EncoderConfig, FinetuneConfig, PreprocessConfig, load_bench_config
from medssl.models import SwinSegmenter
from medssl.train.step import build_optimisation, time_train_steps, train_step
from medssl.training_module import TrainingHooks

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"


# --------------------------------------------------------------------------- clocks


def clock(kind: str) -> Callable[[], float]:
    """CPU time of this process (all its threads) or wall time."""
    return time.process_time if kind == "cpu" else time.perf_counter


class Stopwatch:
    """Named intervals: ``with sw("part"): ...`` appends the part's seconds on ``now`` (``parts``) and on the
    wall clock (``wall``)."""

    def __init__(self, now: Callable[[], float]) -> None:
        self.now = now
        self.parts: dict[str, list[float]] = {}
        self.wall: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0, w0 = self.now(), time.perf_counter()
        yield
        self.parts.setdefault(name, []).append(self.now() - t0)
        self.wall.setdefault(name, []).append(time.perf_counter() - w0)

    def median(self, name: str) -> float:
        return statistics.median(self.parts[name])


# --------------------------------------------------------------------------- the split step


def encode(model: SwinSegmenter, x: Tensor) -> list[Tensor]:
    return list(model.swinViT(x, model.normalize))


def decode(model: SwinSegmenter, x: Tensor, hidden: list[Tensor]) -> Tensor:
    """MONAI ``SwinUNETR.forward`` after its encoder call (the same modules in the same order)."""
    enc0 = model.encoder1(x)
    enc1 = model.encoder2(hidden[0])
    enc2 = model.encoder3(hidden[1])
    enc3 = model.encoder4(hidden[2])
    dec4 = model.encoder10(hidden[4])
    dec3 = model.decoder5(dec4, hidden[3])
    dec2 = model.decoder4(dec3, enc3)
    dec1 = model.decoder3(dec2, enc2)
    dec0 = model.decoder2(dec1, enc1)
    return model.out(model.decoder1(dec0, enc0))


def split_step(model: SwinSegmenter, loss_fn: torch.nn.Module, opt: Any, batch: dict, step: int, sw: Stopwatch) -> None:
    """One optimiser step, each part timed alone; the same arithmetic as ``train_step``."""
    x, y = batch["image"], batch["label"]
    opt.optimizer.zero_grad(set_to_none=True)
    with sw("encoder forward"):
        hidden = encode(model, x)
    detached = [h.detach().requires_grad_(True) for h in hidden]
    with sw("decoder forward"):
        logits = decode(model, x, detached)
    logits_in = logits.detach().requires_grad_(True)
    with sw("loss forward"):
        loss = loss_fn(logits_in, y)
    with sw("loss backward"):
        loss.backward()
    with sw("decoder backward"):
        logits.backward(logits_in.grad)
    with sw("encoder backward"):
        torch.autograd.backward(
            [h for h, d in zip(hidden, detached, strict=True) if d.grad is not None],
            [d.grad for d in detached if d.grad is not None],
        )
    with sw("optimiser (clip + AdamW)"):
        torch.nn.utils.clip_grad_norm_(opt.module.parameters(), opt.grad_clip)
        opt.optimizer.step()


class Segmentation(TrainingHooks):
    """A segmenter as a training module (``forward(batch, step) -> {"loss"}``), as ``SegmentationModule``."""

    def __init__(self, model: torch.nn.Module, loss_fn: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict, step: int) -> dict:
        return {"loss": self.loss_fn(self.model(batch["image"]), batch["label"])}


# --------------------------------------------------------------------------- the demo's data


def demo_settings(task: str) -> tuple[Any, FinetuneConfig, PreprocessConfig]:
    """The demo's benchmark config, its fine-tuning config for ``task`` and its preprocessing."""
    bench = load_bench_config(DEMO)
    entry = next(t for t in bench.tasks if t.synth_kind == task)
    merged = bench.finetune.model_dump()
    for key, value in entry.finetune.items():
        merged[key] = {**merged[key], **value} if isinstance(value, dict) else value
    ft = FinetuneConfig.model_validate({**merged, "encoder": bench.encoder, "preprocess": bench.preprocess})
    return bench, ft, bench.preprocess


def demo_volumes(workdir: Path, task: str) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The demo's phantoms of ``task``, cached with its preprocessing; (task, volumes, split of seed 0)."""
    from medssl.data.cache import VolumeCache, cache_task
    from medssl.data.splits import load_or_create_splits
    from medssl.data.synth import synth_task
    from medssl.data.tasks import load_task

    bench, ft, preprocess = demo_settings(task)
    s = bench.data.synth
    folder = synth_task(workdir / task, task, s.cases, seed=s.seed, shape=s.shape, spacing=s.spacing)  # type: ignore[arg-type]
    loaded = load_task(folder)
    volumes = cache_task(loaded, VolumeCache(workdir / "cache"), preprocess)
    split = load_or_create_splits(workdir / f"{task}_splits.json", sorted(volumes), 0, ["all"], ft.n_test, ft.n_val)
    return loaded, volumes, split


# --------------------------------------------------------------------------- options


OPTIONS = ("mkldnn", "sw_batch", "channels_last", "adamw")


def option_variant(option: str | None, module: torch.nn.Module, opt: Any) -> tuple[torch.nn.Module, Any]:
    """The module and optimisation an option trains (a copy where it changes the model or optimiser)."""
    import copy

    name, _, value = (option or "").partition("=")
    if name == "channels_last":  # the decoder's (non-Swin) modules in channels-last 3D memory format
        module = copy.deepcopy(module)
        for child_name, child in module.model.named_children():
            if child_name != "swinViT" and value == "decoder":
                child.to(memory_format=torch.channels_last_3d)
    elif name == "adamw":  # AdamW as torch's per-parameter "loop", "foreach" or "fused" (the step's default)
        module = copy.deepcopy(module)
    else:
        return module, opt
    new = build_optimisation(module, opt.schedule, opt.total, torch.device("cpu"))
    if name == "adamw":
        keep = ("params", "weight_decay", "apply_wd", "lr_scale")
        groups = [{k: g[k] for k in keep} for g in new.optimizer.param_groups]
        schedule = opt.schedule
        flags = {"fused": False, "foreach": False} if value == "loop" else {value: True}
        new.optimizer = torch.optim.AdamW(groups, lr=schedule.lr, betas=schedule.betas, **flags)
    return module, new


@contextlib.contextmanager
def applied(option: str | None) -> Iterator[dict[str, Any]]:
    """Apply ``NAME=VALUE`` for the duration; yields per-call overrides (sliding-window batch)."""
    if option is None:
        yield {}
        return
    name, _, value = option.partition("=")
    if name == "mkldnn":
        with torch.backends.mkldnn.flags(enabled=value not in ("off", "0", "false")):
            yield {}
    elif name == "sw_batch":
        yield {"sw_batch_size": int(value)}
    elif name in OPTIONS:
        yield {}
    else:
        raise SystemExit(f"unknown --option {name!r}; known: {', '.join(OPTIONS)}")


# --------------------------------------------------------------------------- profile


def profile(args: argparse.Namespace, threads: int, workdir: Path) -> None:
    from medssl.data.datasets import SegmentationCropDataset, load_eval_case
    from medssl.data.splits import train_cases
    from medssl.evaluate import case_metrics, mean_dice, predict_volume
    from medssl.models.checkpoint import atomic_torch_save, save_segmenter

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    _, ft, _ = demo_settings(args.task)
    task, volumes, split = demo_volumes(workdir, args.task)
    ids = train_cases(split, "all")
    dataset = SegmentationCropDataset(
        [volumes[c] for c in ids],
        ft.crop_size,
        seed=0,
        augmentation=ft.augment,
        class_balanced=ft.crop_sampling == "class_balanced",
    )
    model = SwinSegmenter(ft.encoder, task.n_classes, crop_size=ft.crop_size, norm=ft.norm)
    loss_fn = (
        DiceLoss(to_onehot_y=True, softmax=True) if ft.loss == "dice" else DiceCELoss(to_onehot_y=True, softmax=True)
    )
    module = Segmentation(model, loss_fn)
    schedule = ft.schedule.model_copy(update={"amp": "off"})
    opt = build_optimisation(module, schedule, schedule.steps, torch.device("cpu"))
    opt.schedule, opt.total = schedule, schedule.steps  # type: ignore[attr-defined]
    option_module, option_opt = option_variant(args.option, module, opt)
    val_cases = [load_eval_case(volumes[c]) for c in split["val"]]
    test_cases = [load_eval_case(volumes[c]) for c in split["test"]]
    sw = Stopwatch(clock(args.clock))
    batch_size = ft.schedule.batch_size

    def load(i: int) -> dict:
        return default_collate([dataset[i * batch_size + j] for j in range(batch_size)])

    def validate(label: str, overrides: dict[str, Any], net: torch.nn.Module) -> None:
        for case in val_cases:
            with sw(f"{label}sliding window (val)"):
                pred = predict_volume(
                    net, case["image"], ft.crop_size, overrides.get("sw_batch_size", ft.sw_batch_size), ft.sw_overlap
                )
            with sw(f"{label}Dice (val)"):
                mean_dice(pred, case["label"][0], task.structures)

    batch = load(0)
    train_step(opt, batch, 0, module)  # warm-up: allocation, oneDNN primitive creation
    for i in range(args.steps):
        with sw("data (batch of crops)"):
            batch = load(i + 1)
        with sw("train_step"):
            train_step(opt, batch, i + 1, module)
        model.train()
        split_step(model, loss_fn, opt, batch, i + 1, sw)
        model.eval()
        validate("", {}, model)
        model.train()
        if args.option:
            with applied(args.option) as overrides:
                with sw("option: train_step"):
                    train_step(option_opt, batch, i + 1, option_module)
                validate("option: ", overrides, option_module.model)
                option_module.train()
    # Per run: the test evaluation (once) and the checkpoints (last.pt every checkpoint_every, best.pt at most
    # once per validation).
    model.eval()
    for case in test_cases:
        with sw("sliding window (test)"):
            pred = predict_volume(model, case["image"], ft.crop_size, ft.sw_batch_size, ft.sw_overlap)
        with sw("HD95 + NSD + Dice (test)"):
            case_metrics(pred, case["label"][0], task.structures, case["spacing"], ft.nsd_tolerance_mm)
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(2):
            with sw("checkpoint last.pt"):
                atomic_torch_save(
                    {"model": module.state_dict(), "optimizer": opt.optimizer.state_dict(), "step": 0},
                    Path(tmp) / "last.pt",
                )
            with sw("checkpoint best.pt"):
                save_segmenter(
                    Path(tmp) / "best.pt", model, {"encoder": {}, "out_channels": 1, "crop_size": 32, "norm": "x"}
                )
    report(args, ft, threads, sw, len(val_cases), len(test_cases))


def report(args: argparse.Namespace, ft: FinetuneConfig, threads: int, sw: Stopwatch, n_val: int, n_test: int) -> None:
    steps = ft.schedule.steps
    n_validations = len(range(ft.val_every, steps + 1, ft.val_every)) + (0 if steps % ft.val_every == 0 else 1)
    n_last = len(range(ft.schedule.checkpoint_every, steps + 1, ft.schedule.checkpoint_every)) + (
        0 if steps % ft.schedule.checkpoint_every == 0 else 1
    )
    med = {k: statistics.median(v) for k, v in sw.parts.items()}
    wall = {k: statistics.median(v) for k, v in sw.wall.items()}
    step_parts = [
        "encoder forward",
        "decoder forward",
        "loss forward",
        "loss backward",
        "decoder backward",
        "encoder backward",
        "optimiser (clip + AdamW)",
    ]
    # per validation call: the sum over the validation cases (each part's median is per case)

    def amortised(m: dict[str, float]) -> dict[str, float]:
        return {
            "data (batch of crops)": m["data (batch of crops)"],
            **{k: m[k] for k in step_parts},
            "validation: sliding window": m["sliding window (val)"] * n_val * n_validations / steps,
            "validation: Dice": m["Dice (val)"] * n_val * n_validations / steps,
            "test: sliding window": m["sliding window (test)"] * n_test / steps,
            "test: HD95 + NSD + Dice": m["HD95 + NSD + Dice (test)"] * n_test / steps,
            "checkpoints (last.pt, best.pt)": (
                m["checkpoint last.pt"] * n_last + m["checkpoint best.pt"] * n_validations
            )
            / steps,
        }

    per_step, per_step_wall = amortised(med), amortised(wall)
    total, total_wall = sum(per_step.values()), sum(per_step_wall.values())
    unit = "CPU" if args.clock == "cpu" else "wall"
    print(
        f"\n{args.task}, tiny preset window {ft.encoder.window_size}, {ft.crop_size}^3 crops, batch "
        f"{ft.schedule.batch_size}, {threads} thread(s), {steps} steps, validation every {ft.val_every} "
        f"({n_val} cases, overlap {ft.sw_overlap}), {n_test} test cases; {unit} ms, median of {args.steps}"
    )
    print(f"| part | {unit} ms per step | share | wall ms per step |")
    print("|---|---|---|---|")
    for name, value in per_step.items():
        print(f"| {name} | {value * 1000:.1f} | {value / total:.1%} | {per_step_wall[name] * 1000:.1f} |")
    print(f"| **total per step** | **{total * 1000:.1f}** | 100% | {total_wall * 1000:.1f} |")
    split_sum = sum(med[k] for k in step_parts)
    print(
        f"split step {split_sum * 1000:.1f} ms vs train_step {med['train_step'] * 1000:.1f} ms (ratio "
        f"{split_sum / med['train_step']:.3f}); train_step wall {wall['train_step'] * 1000:.1f} ms"
    )
    print(
        f"per call: validation {(med['sliding window (val)'] + med['Dice (val)']) * n_val * 1000:.0f} ms "
        f"(= {(med['sliding window (val)'] + med['Dice (val)']) * n_val / med['train_step']:.2f} steps), "
        f"test case {(med['sliding window (test)'] + med['HD95 + NSD + Dice (test)']) * 1000:.0f} ms"
    )
    if args.option:
        base_val = med["sliding window (val)"] + med["Dice (val)"]
        opt_val = med["option: sliding window (val)"] + med["option: Dice (val)"]
        print(
            f"option {args.option}: train_step {med['option: train_step'] * 1000:.1f} ms vs "
            f"{med['train_step'] * 1000:.1f} ms (ratio {med['option: train_step'] / med['train_step']:.3f}); "
            f"validation case {opt_val * 1000:.1f} vs {base_val * 1000:.1f} ms (ratio {opt_val / base_val:.3f})"
        )


def full_size(args: argparse.Namespace, threads: int) -> None:
    """One step of the base preset (window 7) at 96^3, batch 2, random input: the split and train_step."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    enc = EncoderConfig(preset="base")
    model = SwinSegmenter(enc, 6, crop_size=96, norm="auto")
    loss_fn = DiceLoss(to_onehot_y=True, softmax=True)
    module = Segmentation(model, loss_fn)
    schedule = FinetuneConfig().schedule.model_copy(update={"amp": "off", "steps": 3})
    opt = build_optimisation(module, schedule, 3, torch.device("cpu"))
    batch = {"image": torch.randn(2, 1, 96, 96, 96), "label": torch.randint(0, 6, (2, 1, 96, 96, 96))}
    sw = Stopwatch(clock(args.clock))
    t0 = time.perf_counter()
    split_step(model, loss_fn, opt, batch, 0, sw)  # one step: allocation included, as a short run pays it
    with sw("train_step"):
        train_step(opt, batch, 1, module)
    parts = {k: v[0] for k, v in sw.parts.items()}
    split_total = sum(v for k, v in parts.items() if k != "train_step")
    print(f"\nfull size: base preset (feature 48, window 7), 96^3, batch 2, {threads} thread(s), one step each")
    print("| part | s | share |")
    print("|---|---|---|")
    for name, value in parts.items():
        if name != "train_step":
            print(f"| {name} | {value:.2f} | {value / split_total:.1%} |")
    print(
        f"split step {split_total:.2f} s (first step) vs train_step {parts['train_step']:.2f} s; "
        f"wall {time.perf_counter() - t0:.0f} s"
    )


# --------------------------------------------------------------------------- thread layout


def _layout_worker(threads: int, steps: int, start: Any, out: Any) -> None:
    """Build the demo's segmenter, wait for ``start``, time ``steps`` train steps (wall)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    _, ft, _ = demo_settings("ct_organs")
    model = SwinSegmenter(ft.encoder, 6, crop_size=ft.crop_size, norm=ft.norm)
    module = Segmentation(model, DiceLoss(to_onehot_y=True, softmax=True))
    schedule = ft.schedule.model_copy(update={"amp": "off", "steps": steps + 1})
    opt = build_optimisation(module, schedule, steps + 1, torch.device("cpu"))
    b = ft.schedule.batch_size
    batch = {"image": torch.randn(b, 1, 32, 32, 32), "label": torch.randint(0, 6, (b, 1, 32, 32, 32))}
    train_step(opt, batch, 0, module)  # warm-up
    start.wait()
    t0 = time.perf_counter()
    for i in range(steps):
        train_step(opt, batch, i + 1, module)
    out.put(time.perf_counter() - t0)


def _layout_round(ctx: Any, runs: int, threads: int, steps: int) -> float:
    """Steps per second of ``runs`` processes of ``threads`` threads each doing ``steps`` steps at once."""
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_layout_worker, args=(threads, steps, start, out)) for _ in range(runs)]
    for p in procs:
        p.start()
    time.sleep(0.5)
    start.set()
    walls = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return runs * steps / max(walls)


def layout(args: argparse.Namespace) -> None:
    import multiprocessing
    import os

    ctx = multiprocessing.get_context("spawn")
    results: dict[str, list[float]] = {"2 runs x 1 thread": [], "1 run x 2 threads": []}
    for _ in range(args.repeats):
        results["2 runs x 1 thread"].append(_layout_round(ctx, 2, 1, args.steps))
        results["1 run x 2 threads"].append(_layout_round(ctx, 1, 2, 2 * args.steps))
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"demo fine-tuning step, {2 * args.steps} steps per round, {args.repeats} rounds, load {os.getloadavg()}")
    for name, rate in med.items():
        print(f"  {name}: {rate:.3f} steps/s (rounds: {', '.join(f'{r:.3f}' for r in results[name])})")
    print(f"  ratio (2 x 1) / (1 x 2): {med['2 runs x 1 thread'] / med['1 run x 2 threads']:.3f}")


# --------------------------------------------------------------------------- medssl vs MONAI


def vs_monai(args: argparse.Namespace) -> None:
    """medssl's segmenter vs MONAI's own SwinUNETR: same input, DiceCE, the loop's ``train_step``."""
    torch.manual_seed(0)
    cfg = EncoderConfig(preset=args.preset, window_size=args.window)
    dev = torch.device(args.device)
    x = torch.randn(args.batch, 1, args.size, args.size, args.size, device=dev)
    y = torch.randint(0, args.classes, (args.batch, 1, args.size, args.size, args.size), device=dev)
    ours = SwinSegmenter(cfg, args.classes, crop_size=args.size, norm="instance").to(dev)
    monai = SwinUNETR(
        in_channels=1,
        out_channels=args.classes,
        feature_size=cfg.feature_size,
        depths=cfg.depths,
        num_heads=cfg.num_heads,
        window_size=cfg.window_size,
    ).to(dev)

    def time_steps(model: torch.nn.Module) -> list[float]:
        module = Segmentation(model, DiceCELoss(to_onehot_y=True, softmax=True))
        schedule = FinetuneConfig().schedule.model_copy(update={"amp": "off", "steps": 2 + args.steps})
        opt = build_optimisation(module, schedule, schedule.steps, x.device)
        return time_train_steps(opt, {"image": x, "label": y}, args.steps, warmup=2)

    results: dict[str, list[float]] = {}
    for _ in range(2):  # interleave to share any drift in machine load
        results.setdefault("medssl", []).extend(time_steps(ours))
        results.setdefault("monai", []).extend(time_steps(monai))
    med = {k: statistics.median(v) for k, v in results.items()}
    print(
        f"device {dev}, preset {args.preset} (window {cfg.window_size}), input {args.batch}x1x{args.size}^3, "
        f"threads {torch.get_num_threads()}"
    )
    for name, t in med.items():
        print(f"  {name:7s} fine-tuning step: {t * 1000:8.1f} ms (median of {len(results[name])})")
    print(f"  ratio medssl/monai: {med['medssl'] / med['monai']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="ct_organs", choices=("ct_organs", "ct_lesions", "mri_organs"))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=5, help="timed repetitions of every part (medians)")
    parser.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto")
    parser.add_argument("--option", default=None, help=f"NAME=VALUE timed against the baseline; NAME in {OPTIONS}")
    parser.add_argument("--full-size", action="store_true", help="also one step of the base preset at 96^3")
    parser.add_argument("--workdir", type=Path, default=None, help="phantoms and cache (default: a temporary folder)")
    parser.add_argument("--layout", action="store_true", help="2 runs x 1 thread vs 1 run x 2 threads instead")
    parser.add_argument("--repeats", type=int, default=3, help="--layout: alternating rounds")
    parser.add_argument("--vs-monai", action="store_true", help="medssl's segmenter vs MONAI's SwinUNETR instead")
    parser.add_argument("--size", type=int, default=64, help="--vs-monai: crop size")
    parser.add_argument("--preset", default="tiny", help="--vs-monai: encoder preset")
    parser.add_argument("--window", type=int, default=None, help="--vs-monai: window size")
    parser.add_argument("--batch", type=int, default=2, help="--vs-monai: batch size")
    parser.add_argument("--classes", type=int, default=6, help="--vs-monai: output classes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="--vs-monai only")
    args = parser.parse_args()
    if args.vs_monai:
        vs_monai(args)
        return
    if args.layout:
        layout(args)
        return
    if args.clock == "auto":
        args.clock = "cpu"  # this profile runs on the CPU: process time is what a shared machine inflates least
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="medssl-ftstep-")))
        for threads in args.threads:
            profile(args, threads, workdir)
            if args.full_size:
                full_size(args, threads)


if __name__ == "__main__":
    main()
