"""Do the data loaders keep up with the step? Two measurements, each in one run.

    python benchmarks/loader_throughput.py                  # views/s per worker at 96^3, every method
    python benchmarks/loader_throughput.py --quick          # 64^3, 3 samples per method
    python benchmarks/loader_throughput.py --dummy-data     # the demo's pretraining: real loader vs constant batch
    python benchmarks/loader_throughput.py --dummy-data --steps 8 --workers 1   # ... with another worker count

1. **Views per second per worker.** For each method, its own view pipeline (``method.make_views`` on
   regions read from the memory-mapped volume cache, exactly as ``PretrainRegionDataset`` does in a
   DataLoader worker) is timed in this process: samples/s is what one worker delivers. Beside it, one
   training step of the method at the same crop size (``--preset``, batch ``--batch``) gives the rate
   the loader must feed; ``workers needed`` = batch / step seconds / samples per second per worker.
2. **nnU-Net's dummy-data comparison** (``--dummy-data``): the demo's pretraining configuration
   (``configs/demo.yaml``: crop, preset, batch, ``num_workers``) trains ``--steps`` steps through the
   real training loop twice, once with the real dataset and once with a dataset that returns one
   constant, precomputed batch (no reading, no augmentation). The wait share is
   ``1 - constant / real`` of the median step time (steps after the first); the target is < 5%. Beside it,
   the ``data_wait_share`` the loop itself logs (time waiting for batches / (waiting + stepping), first step
   excluded) for both runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _corpus(root: Path, crop: int, n: int):
    from medssl.config import PreprocessConfig
    from medssl.data.corpus import ingest_corpus
    from medssl.data.synth import synth_corpus

    # Scans a little larger than SMIT's region (1.33 x the crop), at their own spacing: no resampling.
    side = int(np.ceil(crop * 4 / 3 / 16) * 16) + 16
    synth_corpus(root / "scans", n, seed=0, shape=(side,) * 3, spacing=(1.5, 1.5, 1.5), jitter_spacing=False)
    return ingest_corpus(root / "scans", root / "corpus", PreprocessConfig(spacing=(1.5, 1.5, 1.5)))


def views_per_second(corpus, crop: int, samples: int, preset: str, batch: int, step: bool) -> list[dict]:
    from medssl.config import EncoderConfig, MethodConfig
    from medssl.data.datasets import PretrainRegionDataset
    from medssl.methods import REGISTRY, build_method
    from medssl.models import SwinEncoder

    rows = []
    for name in sorted(REGISTRY):
        if not REGISTRY[name].trains:
            continue
        torch.manual_seed(0)
        method = build_method(
            MethodConfig(name=name), SwinEncoder(EncoderConfig(preset=preset)), crop_size=crop, total_steps=1000
        )
        dataset = PretrainRegionDataset(corpus, method.region_size(crop), method.make_views, seed=0)
        dataset[0]  # first touch maps the cache files
        t0 = time.perf_counter()
        items = [dataset[i] for i in range(1, samples + 1)]
        per_sample = (time.perf_counter() - t0) / samples
        row = {"method": name, "region": method.region_size(crop), "samples_per_s": 1.0 / per_sample}
        if step:
            batch_views = torch.utils.data.default_collate(items[:batch])
            method.train()
            times = []
            for i in range(2):
                t0 = time.perf_counter()
                out = method(batch_views, i)
                out["loss"].backward()
                method.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - t0)
            row["step_s"] = times[-1]
            row["workers_needed"] = batch / times[-1] / row["samples_per_s"]
        rows.append(row)
        print(_row(row), flush=True)
    return rows


def _row(row: dict) -> str:
    text = f"{row['method']:<14} region {row['region']:>4}^3  {row['samples_per_s']:7.2f} samples/s per worker"
    if "step_s" in row:
        text += f"  step {row['step_s']:7.2f} s  workers needed {row['workers_needed']:5.2f}"
    return text


class ConstantBatch(torch.utils.data.Dataset):
    """nnU-Net's dummy data: every index returns one precomputed sample (no I/O, no augmentation)."""

    def __init__(self, sample: dict) -> None:
        self.sample = sample

    def __len__(self) -> int:
        return 10**9

    def __getitem__(self, index: int) -> dict:
        return self.sample


def dummy_data_comparison(workdir: Path, steps: int, methods: list[str], workers: int | None = None) -> None:
    from medssl.config import PretrainConfig, load_bench_config
    from medssl.data.datasets import PretrainRegionDataset
    from medssl.methods import build_method
    from medssl.models import SwinEncoder
    from medssl.runs import RunDir
    from medssl.train.distributed import DistInfo
    from medssl.train.loop import train

    bench = load_bench_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    crop = bench.pretrain.crop_size
    corpus = _corpus(workdir, crop, 6)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    schedule = PretrainConfig().schedule.model_copy(
        update={
            **bench.pretrain.schedule.model_dump(exclude_unset=True),
            "steps": steps,
            "log_every": 1,
            "checkpoint_every": 10**6,
            **({"num_workers": workers} if workers is not None else {}),
        }
    )
    print(
        f"demo pretraining: crop {crop}, preset {bench.encoder.preset}, batch {schedule.batch_size}, "
        f"{schedule.num_workers} DataLoader workers, {steps} steps"
    )
    for method_config in bench.method_configs():
        if methods and method_config.name not in methods:
            continue
        medians: dict[str, float] = {}
        logged: dict[str, float | None] = {}
        for kind in ("real", "constant"):
            torch.manual_seed(0)
            encoder = SwinEncoder(bench.encoder)
            method = build_method(method_config, encoder, crop_size=crop, total_steps=steps)
            if not method.trains:
                break
            dataset = PretrainRegionDataset(corpus, method.region_size(crop), method.make_views, seed=0)
            if kind == "constant":
                dataset = ConstantBatch(dataset[0])
            run = RunDir(workdir / f"{method_config.name}-{kind}")
            times = []
            t_last = [time.perf_counter()]

            original = run.append_metrics

            def timed(record: dict, original=original, times=times, t_last=t_last) -> None:
                now = time.perf_counter()
                times.append(now - t_last[0])  # wall time per logged step: loading, step and logging
                t_last[0] = now
                original(record)

            run.append_metrics = timed  # type: ignore[method-assign]
            result = train(method, dataset, schedule, run, info)
            medians[kind] = statistics.median(times[1:])
            logged[kind] = result.data_wait_share
        if len(medians) == 2:
            share = max(0.0, 1.0 - medians["constant"] / medians["real"])
            print(
                f"{method_config.name:<14} real {medians['real']:6.3f} s/step  constant {medians['constant']:6.3f} "
                f"s/step  data-wait share {100 * share:5.1f} %  logged data_wait_share "
                f"{_percent(logged['real'])} (constant batch: {_percent(logged['constant'])})",
                flush=True,
            )


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:5.1f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--preset", default="tiny", help="encoder preset for the step it must feed")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--no-step", action="store_true", help="only the loader rates")
    parser.add_argument("--quick", action="store_true", help="64^3, 3 samples per method")
    parser.add_argument("--dummy-data", action="store_true", help="real loader vs constant batch, demo config")
    parser.add_argument("--steps", type=int, default=12, help="steps per run for --dummy-data")
    parser.add_argument("--methods", nargs="*", default=[], help="restrict --dummy-data to these methods")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None, help="--dummy-data: DataLoader workers (default: demo's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.dummy_data:
            dummy_data_comparison(Path(tmp), args.steps, args.methods, args.workers)
            return
        crop, samples = (64, 3) if args.quick else (args.crop, args.samples)
        corpus = _corpus(Path(tmp), crop, 4)
        print(
            f"{len(corpus)} cached scans; crops {crop}^3; step: preset {args.preset}, batch {args.batch}, "
            f"{torch.get_num_threads()} threads"
        )
        views_per_second(corpus, crop, samples, args.preset, args.batch, step=not args.no_step)


if __name__ == "__main__":
    main()
