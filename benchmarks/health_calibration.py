"""Representation health of every method at demo scale, under a shared and under its own recipe: the figures
the collapse verdict of ``medssl.methods.health`` is calibrated on.

    python benchmarks/health_calibration.py                          # every method, shared and published
    python benchmarks/health_calibration.py --recipes shared --methods dino ibot smit
    python benchmarks/health_calibration.py --recipes declared --methods dino ibot smit   # the demo's lr_scale 0.1
    python benchmarks/health_calibration.py --no-train               # verdicts again from the run directories
    python benchmarks/health_calibration.py --short                  # 6 steps of simclr and dino (a smoke check)

Each method of ``configs/demo.yaml`` (its options: the demo's narrower heads) is pretrained through
``medssl.train.pretrain.run_pretrain`` on the demo's synthetic CT corpus (``data.synth``; the real head CT is left
out so the corpus is the same on every machine) with the demo's pretraining section (40 steps, batch 4, 32^3 crops,
tiny preset, window 4), logging every step, one loader process in the main process, under each recipe asked for:
``shared`` (the demo's schedule for every method: lr 5e-4, 5 warm-up steps) and ``published`` (each method's own
recipe, ``configs/methods/<name>.yaml``, its learning rate scaled to batch 4 by the one linear rule), and
``declared`` (the config's own operating point per method: its ``recipe`` and ``lr_scale``, as ``medssl bench``
plans it). It prints per method and recipe the embedding spread (``health/embedding_std_scaled``, std of the
L2-normalised head outputs x sqrt(d)) at the first three steps and the last three, the fall between them, the
teacher's entropy / log K and the teacher-student KL over the last three steps, the lowest window rank, and the
verdict; the step-1 values are the randomly initialised networks (the forward before the first update), whose
verdict is printed too. Everything is written to ``<out>/health_calibration.json``.
CPU timings on a shared machine are not the point here; run it under ``nice`` with ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from medssl.bench.plan import shared_schedule_scaled
from medssl.config import PretrainConfig, load_bench_config, validate_config
from medssl.data.corpus import ingest_corpus
from medssl.data.synth import synth_corpus
from medssl.methods.verdict import HEALTH_WINDOW, health_verdict
from medssl.runs import RunDir
from medssl.train.pretrain import run_pretrain

ROOT = Path(__file__).resolve().parents[1]
SPREAD = "health/embedding_std_scaled"


FIXTURE_KEYS = (
    "step",
    "loss",
    SPREAD,
    "health/embedding_std_scaled_start",
    "health/embedding_window_rank",
    "health/feature_std_scaled",
    "health/feature_window_rank",
    "health/teacher_entropy_ratio",
    "health/teacher_batch_entropy_ratio",
    "health/teacher_student_kl",
)


def _rounded(value: Any) -> Any:
    return round(value, 6) if isinstance(value, float) else value


def _values(records: list[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in records if isinstance(r.get(key), int | float) and math.isfinite(r[key])]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Start/end spread, its fall, the teacher's tail, the verdict (and the verdict at random init)."""
    spread = _values(records, SPREAD)
    start, end = _mean(spread[:HEALTH_WINDOW]), _mean(spread[-HEALTH_WINDOW:])
    verdict = health_verdict(records)
    init = health_verdict(records[:1])
    ranks = _values(records, "health/embedding_window_rank") or _values(records, "health/feature_window_rank")
    return {
        "steps": len(records),
        "spread_start": start,
        "spread_end": end,
        "spread_min": min(spread) if spread else None,
        "spread_fall": start / end if start and end else None,
        "teacher_entropy_end": _mean(_values(records, "health/teacher_entropy_ratio")[-HEALTH_WINDOW:]),
        "teacher_entropy_min": min(_values(records, "health/teacher_entropy_ratio"), default=None),
        "kl_end": _mean(_values(records, "health/teacher_student_kl")[-HEALTH_WINDOW:]),
        "kl_max": max(_values(records, "health/teacher_student_kl"), default=None),
        "window_rank_min": min(ranks) if ranks else None,
        "loss_start": _mean(_values(records, "loss")[:HEALTH_WINDOW]),
        "loss_end": _mean(_values(records, "loss")[-HEALTH_WINDOW:]),
        "collapsed": verdict["collapsed"],
        "reasons": verdict["reasons"],
        "warnings": verdict["warnings"],
        "uninformative_distillation": verdict["uninformative_distillation"],
        "random_init_collapsed": init["collapsed"],
    }


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--methods", nargs="+", default=None, help="default: every method of the config")
    parser.add_argument(
        "--recipes",
        nargs="+",
        default=["shared", "published"],
        choices=["shared", "published", "declared"],
        help="declared: each method at the config's own operating point (its recipe and lr_scale)",
    )
    parser.add_argument("--steps", type=int, default=None, help="default: the config's pretraining steps")
    parser.add_argument("--out", type=Path, default=Path("/tmp/medssl-health-calibration"))
    parser.add_argument("--no-train", action="store_true", help="read what the run directories logged")
    parser.add_argument("--short", action="store_true", help="6 steps of simclr and dino")
    parser.add_argument(
        "--fixture",
        type=Path,
        default=None,
        help="also write the health series of every run (FIXTURE_KEYS per step) to this JSON file: the recorded "
        "runs tests/methods/test_health_calibrated.py checks the verdict on",
    )
    args = parser.parse_args()
    if args.short:
        args.steps, args.methods = 6, args.methods or ["simclr", "dino"]

    bench = load_bench_config(args.config)
    synth = bench.data.synth
    assert synth is not None, "the calibration uses the config's synthetic corpus"
    scans, corpus = args.out / "scans", args.out / "corpus"
    if not (corpus / "manifest.json").is_file():
        synth_corpus(scans, synth.corpus_cases, seed=synth.seed, shape=synth.shape, spacing=synth.spacing)
        ingest_corpus(scans, corpus, bench.preprocess)
    methods = [m for m in bench.method_configs() if m.name != "none"]
    if args.methods:
        methods = [m for m in methods if m.name in args.methods]

    summary: dict[str, dict[str, Any]] = {}
    series: dict[str, dict[str, Any]] = {}
    header = "method / recipe          lr        spread start -> end (fall)   teacher/logK  KL    rank  verdict"
    print(header, flush=True)
    for recipe in args.recipes:
        for method in methods:
            data = {**bench.pretrain.model_dump(mode="json"), "recipe": recipe}
            if recipe == "declared":
                data["recipe"] = bench.method_recipe(method.name)
                data.update(shared_schedule_scaled(bench, method.name))
            data = {
                **data,
                "method": method.model_dump(mode="json"),
                "encoder": bench.encoder.model_dump(mode="json"),
                "corpus": str(corpus),
                "preprocess": bench.preprocess.model_dump(mode="json"),
            }
            steps = args.steps or bench.pretrain.schedule.steps
            data["schedule"] = {
                **data["schedule"],
                "steps": steps,
                "log_every": 1,
                "checkpoint_every": steps,
                "num_workers": 0,
            }
            config = validate_config(PretrainConfig, data, args.config)
            run_dir = args.out / "runs" / f"{method.name}-{recipe}-{steps}"
            if not args.no_train:
                run_pretrain(config, run_dir)
            records = [r for r in RunDir(run_dir).read_metrics() if "loss" in r]
            if not records:
                print(f"{method.name} / {recipe}: nothing logged in {run_dir}", flush=True)
                continue
            series[f"{method.name}/{recipe}"] = {
                "keys": list(FIXTURE_KEYS),
                "rows": [[_rounded(r.get(k)) for k in FIXTURE_KEYS] for r in records],
            }
            row = {"lr": config.schedule.lr, "warmup_steps": config.schedule.warmup_steps, **summarise(records)}
            summary[f"{method.name}/{recipe}"] = row
            verdict = "COLLAPSED: " + "; ".join(row["reasons"]) if row["collapsed"] else "healthy"
            print(
                f"{method.name + ' / ' + recipe:24s} {row['lr']:.2e}  {_fmt(row['spread_start'])} -> "
                f"{_fmt(row['spread_end'])} ({_fmt(row['spread_fall'])}x)   {_fmt(row['teacher_entropy_end'], 4)}  "
                f"{_fmt(row['kl_end'])}  {_fmt(row['window_rank_min'])}  {verdict}"
                + ("  [random init flagged]" if row["random_init_collapsed"] else ""),
                flush=True,
            )
    out = args.out / "health_calibration.json"
    out.write_text(json.dumps(summary, indent=2))
    print(f"written {out}")
    if args.fixture is not None:
        args.fixture.write_text(json.dumps(series, separators=(",", ":")) + "\n")
        print(f"written {args.fixture}")


if __name__ == "__main__":
    main()
