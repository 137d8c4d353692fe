"""Choose the transfer study's fine-tuning recipe on its controls, never on an SSL row, on a tuning data seed.

The study (``configs/transfer.yaml``) fine-tunes every encoder with one recipe. This script builds the
study's controls on a *tuning* phantom seed (its own data, never the study's): random init, the
supervised control (trained by the study's own ``supervised`` run on phantoms of the derived anatomy
seed) and the identity-transformer, and fine-tunes them with each candidate recipe on CT organs at
budget 1 and all over the given seeds. It prints, per candidate, what the selection rule reads:

* ``gap``: random init at all cases minus at 1 case (label-limited: >= 0.1);
* ``sup-rand@1``: the positive control's effect at 1 case, its bootstrap CI and paired Wilcoxon p over
  (test case, seed) pairs (the effect the study must be able to see: >= 0.05, p < 0.05);
* ``id-rand@1``: the identity-transformer against random init at 1 case;
* the supervised encoder's drift per Swin stage (a recipe must not erase it) and the CPU seconds per run.

Rule: among candidates whose encoder learning rate is at most 1e-3 (``lr x encoder_lr_scale``) with layer
decay, a frozen warm-up and cosine decay, and that are label-limited, take the one with the largest
positive-control effect at p < 0.05; a tie goes to the cheaper one. No SSL method is run.

    python benchmarks/transfer_recipe.py --out tune --data-seed 0 --seeds 0 1 2 --workers 2

Every run is a run directory under ``<out>/recipes/<candidate>/`` (re-running reuses finished ones), so
a candidate added later costs only its own runs. ``--check`` runs only the chosen recipe (the config's
own ``finetune`` section) on another data seed: the control's effect on data nobody tuned for.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from pathlib import Path
from typing import Any

import numpy as np

from medssl.analysis.stats import bootstrap_ci
from medssl.analysis.transfer import wilcoxon_p
from medssl.bench.engine import load_bench, prepare_data
from medssl.bench.executors.dispatch import execute_run
from medssl.bench.plan import expand_plan
from medssl.config import IDENTITY_TRANSFORMER, RANDOM_INIT, SUPERVISED, FinetuneConfig, deep_merge, validate_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "transfer.yaml"
ROWS = (RANDOM_INIT, SUPERVISED, IDENTITY_TRANSFORMER)

# name -> FinetuneConfig fields over the study's `finetune` section ("study": the section as it stands).
# Every candidate keeps the encoder (encoder lr <= 1e-3 with layer decay, a frozen warm-up, cosine decay).
CANDIDATES: dict[str, dict[str, Any]] = {
    "study": {},
    # label-limited? the study's 60 steps leave random init at 1 case above all cases
    "steps_200": {"schedule": {"steps": 200, "checkpoint_every": 200}, "val_every": 50, "freeze_encoder_steps": 30},
    # the encoder at 3e-4: keeps more of a pretrained encoder, learns less of a random one
    "encoder_lr_3e-4": {"encoder_lr_scale": 0.03},
}


def _unit_scores(results: dict[str, Any]) -> dict[tuple[str, int], float]:
    per_case: dict[str, list[float]] = {}
    for row in results.get("cases", []):
        per_case.setdefault(row["case"], []).append(float(row["dice"]))
    return {(case, int(results["seed"])): float(np.mean(v)) for case, v in per_case.items()}


def _run(job: tuple[dict[str, Any], str]) -> dict[str, Any]:
    import torch

    from medssl.train.finetune import run_finetune

    torch.set_num_threads(1)
    config, run_dir = job
    return run_finetune(FinetuneConfig.model_validate(config), run_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--data-seed", type=int, default=0, help="the tuning phantom seed (data.synth.seed)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--task", default="ct_organs")
    parser.add_argument("--budgets", nargs="+", default=["1", "all"])
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES))
    parser.add_argument("--rows", nargs="+", default=list(ROWS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--check", action="store_true", help="only the config's own recipe (verification)")
    args = parser.parse_args(argv)

    overrides = [f"data.synth.seed={args.data_seed}", f"seeds={args.seeds}", "methods=[none]", "probe.enabled=false"]
    bench = load_bench(args.config, overrides)
    out = args.out.resolve()
    prepare_data(bench, out, args.config)
    plan = expand_plan(bench, out, args.config)
    for control in plan.stage("supervised"):
        outcome = execute_run(control, out)
        print(f"supervised control: {outcome.status if outcome else 'held elsewhere'} ({control.run_id})", flush=True)
    candidates = ["study"] if args.check else args.candidates
    jobs, where = [], {}
    for name in candidates:
        for run in plan.stage("finetune"):
            labels = run.labels
            if labels["task"] != args.task or labels["budget"] not in args.budgets or labels["method"] not in args.rows:
                continue
            data = deep_merge(run.config.model_dump(mode="json"), CANDIDATES[name])
            config = validate_config(FinetuneConfig, data, f"candidate {name}")
            run_dir = out / "recipes" / name / f"{labels['method']}-b{labels['budget']}-s{labels['seed']}"
            jobs.append((config.model_dump(mode="json"), str(run_dir)))
            where[str(run_dir)] = (name, labels["method"], labels["budget"])
    print(f"{len(jobs)} fine-tuning runs ({len(candidates)} candidates) with {args.workers} workers", flush=True)
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        finished = pool.map(_run, jobs, chunksize=1)

    scores: dict[tuple[str, str, str], dict[tuple[str, int], float]] = {}
    drift: dict[str, list[dict[str, float]]] = {}
    seconds: dict[str, list[float]] = {}
    for (_, run_dir), results in zip(jobs, finished, strict=True):
        name, method, budget = where[run_dir]
        scores.setdefault((name, method, budget), {}).update(_unit_scores(results))
        seconds.setdefault(name, []).append(float(results.get("wall_seconds", np.nan)))
        if method == SUPERVISED:
            drift.setdefault(name, []).append(results.get("encoder_drift") or {})

    def mean(name: str, method: str, budget: str) -> float:
        values = scores.get((name, method, budget), {})
        return float(np.mean(list(values.values()))) if values else float("nan")

    def effect(name: str, method: str, budget: str) -> str:
        mine, base = scores.get((name, method, budget), {}), scores.get((name, RANDOM_INIT, budget), {})
        keys = sorted(set(mine) & set(base))
        if not keys:
            return "-"
        diff = np.array([mine[k] - base[k] for k in keys])
        m, lo, hi = bootstrap_ci(diff)
        return f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}] p {wilcoxon_p(diff):.4f} (n {len(keys)})"

    print(f"\n{args.task}, data seed {args.data_seed}, seeds {args.seeds}: mean test Dice over (case, seed) pairs")
    for name in candidates:
        gap = mean(name, RANDOM_INIT, "all") - mean(name, RANDOM_INIT, "1")
        print(f"\n[{name}] {CANDIDATES[name] or '(the config as it stands)'}")
        for method in args.rows:
            cells = "  ".join(f"b{b} {mean(name, method, b):.3f}" for b in args.budgets)
            print(f"  {method:22s} {cells}")
        print(f"  gap random all - 1: {gap:+.3f} ({'label-limited' if gap >= 0.1 else 'NOT label-limited'})")
        print(f"  supervised - random @1: {effect(name, SUPERVISED, '1')}")
        print(f"  identity - random @1:   {effect(name, IDENTITY_TRANSFORMER, '1')}")
        stages = ("patch_embed", "stage1", "stage2", "stage3", "stage4")
        if drift.get(name):
            shown = ", ".join(f"{s} {np.mean([d.get(s) or np.nan for d in drift[name]]):.3f}" for s in stages)
            print(f"  supervised encoder drift: {shown}")
        print(f"  wall seconds per run: {np.nanmean(seconds[name]):.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
