"""Representation health at random init and after a short run, per method, on the phantom corpus.

    python benchmarks/health_calibration.py [--steps 20] [--batch 2] [--crop 32] [--methods simclr,dino]
                                            [--out /tmp/health] [--short]

Pretrains each method through ``run_pretrain`` (tiny preset, small heads) plus the deliberately collapsed
DINO without centring, then prints, per method, the health values logged at step 1 (the forward pass before
the first update: the randomly initialised networks) and the verdict's tail means at the end, and the
verdict. These are the figures the thresholds of ``medssl.methods.health`` are calibrated on. ``--short``
runs 4 steps of three methods (a smoke check). CPU timings on a shared machine are not the point here.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from medssl.config import EncoderConfig, MethodConfig, PreprocessConfig, PretrainConfig, ScheduleConfig
from medssl.data.corpus import ingest_corpus
from medssl.data.synth import synth_corpus
from medssl.methods import REGISTRY
from medssl.runs import RunDir
from medssl.train.pretrain import run_pretrain

SMALL_HEADS = {
    "simclr": {"proj_hidden_dim": 256, "proj_dim": 64},
    "mocov3": {"proj_hidden_dim": 256, "proj_dim": 64, "pred_hidden_dim": 256},
    "byol": {"proj_hidden_dim": 256, "proj_dim": 64, "pred_hidden_dim": 256},
    "dino": {"out_dim": 512, "hidden_dim": 256, "bottleneck_dim": 64, "n_local_crops": 2},
    "ibot": {"out_dim": 512, "hidden_dim": 256, "bottleneck_dim": 64, "n_local_crops": 2},
    "smit": {"out_dim": 512, "hidden_dim": 256, "bottleneck_dim": 64},
    "swinunetr_ssl": {"head_input": "pooled"},
}
SHOWN = (
    "embedding_std_scaled",
    "embedding_rank",
    "embedding_window_rank",
    "feature_std_scaled",
    "feature_rank",
    "feature_window_rank",
    "teacher_entropy_ratio",
    "teacher_batch_entropy_ratio",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--crop", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--methods", default=None, help="comma-separated (default: every training method)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--short", action="store_true", help="4 steps of simclr, simmim, dino")
    args = parser.parse_args()
    names = [n for n, cls in sorted(REGISTRY.items()) if cls.trains]
    if args.short:
        args.steps, names = 4, ["simclr", "simmim", "dino"]
    elif args.methods:
        names = args.methods.split(",")
    out = args.out or Path(tempfile.mkdtemp(prefix="medssl-health-"))
    pre = PreprocessConfig(spacing=(4.0, 4.0, 4.0))
    corpus = out / "corpus"
    if not (corpus / "manifest.json").is_file():
        synth_corpus(out / "scans", 3, seed=3, shape=(40, 40, 40))
        ingest_corpus(out / "scans", corpus, pre)
    cases = [(n, n, {}) for n in names]
    if "dino" in names and "centre" in REGISTRY["dino"].Params.model_fields:
        cases.append(("dino (no centring)", "dino", {"centre": False}))
    summary = {}
    for label, name, extra in cases:
        cfg = PretrainConfig(
            method=MethodConfig(name=name, options={**SMALL_HEADS.get(name, {}), **extra}),
            encoder=EncoderConfig(preset="tiny", window_size=4),
            corpus=corpus,
            crop_size=args.crop,
            preprocess=pre,
            schedule=ScheduleConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, warmup_steps=1, log_every=1),
        )
        run_dir = out / label.replace(" ", "_").replace("(", "").replace(")", "")
        results = run_pretrain(cfg, run_dir)
        first = RunDir(run_dir).read_metrics()[0]
        health = results["health"]
        summary[label] = {
            "init": {k: first.get(f"health/{k}") for k in SHOWN},
            "final": {k: health["final"].get(f"health/{k}") for k in SHOWN},
            "collapsed": health["collapsed"],
            "reason": health["reason"],
            "warnings": health["warnings"],
        }
        row = " ".join(f"{k}={_fmt(summary[label]['init'][k])}->{_fmt(summary[label]['final'][k])}" for k in SHOWN)
        print(f"{label:20s} collapsed={health['collapsed']!s:5s} {row}", flush=True)
    (out / "health_calibration.json").write_text(json.dumps(summary, indent=2))
    print(f"written {out / 'health_calibration.json'}")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


if __name__ == "__main__":
    main()
