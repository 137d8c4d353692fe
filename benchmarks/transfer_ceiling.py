"""How much can any encoder initialisation give in a study's few-shot fine-tuning? A supervised ceiling.

For a finished benchmark folder (e.g. `medssl bench configs/transfer.yaml --out transfer`), each seed's
random-init run on the full training pool of a task is a supervised encoder that has seen every labeled
training case of that seed (never one of its test cases). This script fine-tunes the few-shot budget again
from that encoder, with the study's own fine-tuning config (read from the random-init few-shot run's
config.yaml; only the encoder changes), and prints, beside random init and every SSL method of the
study, the mean test Dice per seed and the paired Wilcoxon over (test case, seed) pairs against random
init. If even this supervised encoder does not beat random init by much, no SSL encoder can be expected to
in that recipe: the fine-tuning, not the pretraining, bounds the effect.

    python benchmarks/transfer_ceiling.py transfer --task ct_organs --budget 1

It runs one fine-tuning per seed (about a minute each at the transfer study's size on one CPU core) into
`<out>/ceiling/`, and re-running reuses finished runs.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import stats

from medssl.config import EncoderConfig, FinetuneConfig, load_config
from medssl.models.checkpoint import encoder_meta, load_segmenter, save_encoder
from medssl.runs import BenchDir, RunDir, list_runs
from medssl.train.finetune import run_finetune

CEILING = "supervised-ceiling"


def _runs(bench: BenchDir, task: str) -> dict[tuple[str, str, int], RunDir]:
    """Finished fine-tuning runs of ``task`` by (method, budget, seed)."""
    found = {}
    for run in list_runs(bench.runs):
        info = run.info()
        if info.get("kind") == "finetune" and info.get("task") == task and run.is_finished():
            found[(str(info["method"]), str(info["budget"]), int(info["seed"]))] = run
    return found


def _unit_scores(results: dict) -> dict[tuple[str, int], float]:
    per_case: dict[str, list[float]] = defaultdict(list)
    for row in results["cases"]:
        per_case[row["case"]].append(float(row["dice"]))
    return {(case, int(results["seed"])): float(np.mean(v)) for case, v in per_case.items()}


def supervised_encoder(full_run: RunDir, out: Path) -> Path:
    """The encoder of a full-budget segmenter, saved as an encoder checkpoint with its metadata."""
    if not out.is_file():
        model, meta = load_segmenter(full_run.path / (full_run.results() or {})["model"])
        save_encoder(
            out,
            model.swinViT,
            encoder_meta(
                method=CEILING,
                family="supervised",
                encoder=EncoderConfig.model_validate(meta["encoder"]),
                preprocess=meta["preprocess"],
                crop_size=meta["crop_size"],
                extra={"source_run": full_run.id},
            ),
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="a finished benchmark folder (medssl bench --out)")
    parser.add_argument("--task", default="ct_organs")
    parser.add_argument("--budget", default="1", help="the few-shot budget to rerun from the supervised encoder")
    args = parser.parse_args(argv)
    bench = BenchDir(args.out)
    runs = _runs(bench, args.task)
    seeds = sorted({seed for (method, budget, seed) in runs if method == "none" and budget == args.budget})
    if not seeds:
        print(f"{args.out}: no finished random-init run of {args.task} at budget {args.budget}", file=sys.stderr)
        return 2
    scores: dict[str, dict[tuple[str, int], float]] = defaultdict(dict)
    for (method, budget, _seed), run in runs.items():
        if budget == args.budget:
            scores[method].update(_unit_scores(run.results() or {}))
    work = bench.path / "ceiling"
    work.mkdir(exist_ok=True)
    for seed in seeds:
        full = runs.get(("none", "all", seed))
        if full is None:
            print(f"seed {seed}: no finished random-init run at budget all; skipped", file=sys.stderr)
            continue
        encoder = supervised_encoder(full, work / f"encoder-{args.task}-s{seed}.pt")
        config = load_config(FinetuneConfig, runs[("none", args.budget, seed)].config_path)
        config = config.model_copy(update={"encoder_checkpoint": encoder})
        results = run_finetune(config, work / f"finetune-{args.task}-b{args.budget}-s{seed}")
        scores[CEILING].update(_unit_scores(results))
    base = scores["none"]
    print(
        f"{args.task}, budget {args.budget}: mean test Dice per seed; paired Wilcoxon vs random init over "
        "(test case, seed) pairs"
    )
    print(f"{'encoder':22s} {'mean':>6s}  " + "  ".join(f"s{s:<5d}" for s in seeds) + "   diff      p    n")
    for method in ["none", *sorted(m for m in scores if m not in ("none", CEILING)), CEILING]:
        if method not in scores:
            continue
        mine = scores[method]
        per_seed = [np.mean([v for (c, s), v in mine.items() if s == seed] or [np.nan]) for seed in seeds]
        line = f"{method:22s} {np.mean(list(mine.values())):6.3f}  " + "  ".join(f"{v:6.3f}" for v in per_seed)
        if method != "none":
            keys = sorted(set(mine) & set(base))
            diff = np.array([mine[k] - base[k] for k in keys])
            p = stats.wilcoxon(diff).pvalue if np.any(diff) else 1.0
            line += f"  {diff.mean():+.3f}  {p:.4f}  {len(keys)}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
