"""Pretraining loss and representation-health curves of every method on the demo's phantom corpus.

    python benchmarks/pretrain_curves.py --short          # 30 steps, batch 2, 32^3 (a few minutes per method)
    python benchmarks/pretrain_curves.py --steps 200      # longer curves
    python benchmarks/pretrain_curves.py --methods dino ibot --out /tmp/curves

Each method of ``configs/demo.yaml`` (its options: the demo's narrower heads) is pretrained through
``medssl.train.pretrain.run_pretrain`` (the ``medssl pretrain`` path: views from the data pipeline, the
loop's step, the health verdict) on the demo's synthetic CT corpus (``data.synth``: phantoms of that shape
and spacing, ingested with the demo's preprocessing), with the demo's pretraining section (crop size, lr,
warm-up, weight decay), overriding only the number of steps and the batch (``--steps``, ``--batch``), and
logging every step. The curves are read back from each run directory's ``metrics.jsonl``.

Writes ``<figures>/pretrain_loss_curves.png`` (loss against step, one panel per method, raw and a
5-step running mean) and ``<figures>/pretrain_health_curves.png`` (per method: embedding spread, the
window effective rank ratio, and for teacher-student methods the batch-mean teacher entropy / log K), and
prints a table: mean loss of the first 5 and the last 5 steps, their ratio, and the health verdict.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from medssl.config import PretrainConfig, load_bench_config, validate_config  # noqa: E402
from medssl.data.corpus import ingest_corpus  # noqa: E402
from medssl.data.synth import synth_corpus  # noqa: E402
from medssl.methods.verdict import health_verdict  # noqa: E402
from medssl.runs import RunDir  # noqa: E402
from medssl.train.pretrain import run_pretrain  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEALTH_KEYS = (
    ("health/embedding_std_scaled", "embedding spread (x sqrt d)"),
    ("health/embedding_window_rank_ratio", "window rank / bound"),
    ("health/feature_window_rank_ratio", "window rank / bound (features)"),
    ("health/teacher_batch_entropy_ratio", "batch-mean teacher entropy / log K"),
)
EDGE = 5  # steps averaged at each end of the loss curve


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, int | float) and math.isfinite(v) and "step" in r:
            steps.append(int(r["step"]))
            values.append(float(v))
    return steps, values


def _running_mean(values: list[float], width: int = 5) -> list[float]:
    return [
        sum(values[max(0, i - width + 1) : i + 1]) / len(values[max(0, i - width + 1) : i + 1])
        for i in range(len(values))
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=None, help="default: the config's pretraining batch")
    parser.add_argument("--methods", nargs="+", default=None, help="default: every method of the config")
    parser.add_argument("--out", type=Path, default=Path("/tmp/medssl-pretrain-curves"))
    parser.add_argument("--figures", type=Path, default=ROOT / "benchmarks" / "figures")
    parser.add_argument("--short", action="store_true", help="30 steps at batch 2")
    parser.add_argument(
        "--plot-only",
        action="store_true",
        help="train nothing: plot and tabulate what the run directories under --out have logged so far "
        "(runs still going or cut short included; the table gives each one's logged steps)",
    )
    args = parser.parse_args()
    if args.short:
        args.steps, args.batch = 30, args.batch or 2

    bench = load_bench_config(args.config)
    synth = bench.data.synth
    scans, corpus = args.out / "scans", args.out / "corpus"
    synth_corpus(scans, synth.corpus_cases, seed=synth.seed, shape=synth.shape, spacing=synth.spacing)
    if not (corpus / "manifest.json").is_file():
        ingest_corpus(scans, corpus, bench.preprocess)
    methods = [m for m in bench.method_configs() if m.name != "none"]
    if args.methods:
        methods = [m for m in methods if m.name in args.methods]

    schedule = {"steps": args.steps, "log_every": 1, "checkpoint_every": args.steps}
    if args.batch:
        schedule["batch_size"] = args.batch
    results: dict[str, dict] = {}
    curves: dict[str, list[dict]] = {}
    for method in methods:
        data = {
            **bench.pretrain.model_dump(mode="json"),
            "recipe": bench.method_recipe(method.name),  # the config's recipe for this method
            "method": method.model_dump(mode="json"),
            "encoder": bench.encoder.model_dump(mode="json"),
            "corpus": str(corpus),
            "preprocess": bench.preprocess.model_dump(mode="json"),
        }
        data["schedule"] = {**data["schedule"], **schedule}
        config = validate_config(PretrainConfig, data, args.config)
        run_dir = args.out / "runs" / f"{method.name}-{args.steps}"
        t0 = time.perf_counter()
        if not args.plot_only:
            run_pretrain(config, run_dir)
        records = [r for r in RunDir(run_dir).read_metrics() if "loss" in r]
        _, loss = _series(records, "loss")
        if not loss:
            print(f"{method.name}: nothing logged in {run_dir}")
            continue
        curves[method.name] = records
        # The verdict of this code on the logged metrics (run_pretrain records the same in results.json;
        # recomputed so that a finished run directory is re-assessed after a threshold change).
        health = health_verdict(records)
        first = sum(loss[:EDGE]) / max(len(loss[:EDGE]), 1)
        last = sum(loss[-EDGE:]) / max(len(loss[-EDGE:]), 1)
        results[method.name] = {
            "steps": len(loss),
            "first_loss": first,
            "last_loss": last,
            "last_over_first": last / first if first else float("nan"),
            "collapsed": health.get("collapsed"),
            "reasons": health.get("reasons", []),
            "warnings": health.get("warnings", []),
            "final_health": {k: health["final"].get(k) for k, _ in HEALTH_KEYS},
            "seconds": time.perf_counter() - t0,
        }
        print(f"{method.name}: {results[method.name]['seconds']:.0f} s", flush=True)

    _plot_loss(curves, args.figures / "pretrain_loss_curves.png", args.steps, config.schedule.batch_size)
    _plot_health(curves, args.figures / "pretrain_health_curves.png")
    (args.out / "pretrain_curves.json").write_text(json.dumps(results, indent=2))

    batch = config.schedule.batch_size
    print(f"\nplanned {args.steps} steps, batch {batch}, crop {config.crop_size}^3, {args.config.name}")
    header = f"{'method':14s} {'steps':>5s} {'first5 loss':>11s} {'last5 loss':>10s} {'last/first':>10s}"
    print(f"{header} {'verdict':9s} notes")
    for name, r in results.items():
        verdict = "collapsed" if r["collapsed"] else "healthy"
        notes = "; ".join(r["reasons"] + r["warnings"])
        losses = f"{r['first_loss']:11.4f} {r['last_loss']:10.4f} {r['last_over_first']:10.3f}"
        print(f"{name:14s} {r['steps']:5d} {losses} {verdict:9s} {notes}")
    print(f"written {args.figures / 'pretrain_loss_curves.png'}, {args.figures / 'pretrain_health_curves.png'}")


def _grid(n: int) -> tuple[int, int]:
    cols = min(3, n)
    return math.ceil(n / cols), cols


def _plot_loss(curves: dict[str, list[dict]], path: Path, steps: int, batch: int) -> None:
    rows, cols = _grid(len(curves))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, (name, records) in zip(axes.flat, curves.items(), strict=False):
        x, y = _series(records, "loss")
        ax.plot(x, y, color="0.75", lw=1, label="loss")
        ax.plot(x, _running_mean(y), color="C0", lw=1.5, label="5-step mean")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(curves) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"pretraining loss on the phantom corpus ({steps} steps, batch {batch})", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _plot_health(curves: dict[str, list[dict]], path: Path) -> None:
    rows, cols = _grid(len(curves))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, (name, records) in zip(axes.flat, curves.items(), strict=False):
        for i, (key, label) in enumerate(HEALTH_KEYS):
            x, y = _series(records, key)
            if x:
                ax.plot(x, y, color=f"C{i}", lw=1.2, label=label)
        ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="lower left")
    for ax in list(axes.flat)[len(curves) :]:
        ax.axis("off")
    fig.suptitle("representation health (methods/health.py), per step", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
