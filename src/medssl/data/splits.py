"""Label-budget splits: per task and seed, a test set, a validation set and nested training subsets.

For one seed the sorted case ids are shuffled once; the first ``n_test`` are the test cases (the
same for every budget, so every budget is scored on the same cases), the next ``n_val`` the
validation cases, the rest the training pool in that shuffled order. Budget ``b`` is the first
``b`` cases of the pool, so the 5-case subset lies inside the 10-case subset inside ``all``.

The splits file of a task holds every seed and a seed, once written, never changes: adding a
seed, a budget or a method reuses it. It is updated under an ``flock`` on a sibling lock file and
written atomically, so concurrent runs of a benchmark agree on one split.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medssl.budget import Budget
from medssl.errors import MedsslInputError
from medssl.fileio import atomic_write_json, file_lock

SPLITS_VERSION = 1
BudgetLike = Budget | int | str  # a Budget, or what YAML and JSON hold: 5, "5", "all"


def _check_budget(budget: BudgetLike, pool_size: int, source: str | Path) -> Budget:
    try:
        parsed = Budget.parse(budget)
    except ValueError:
        raise MedsslInputError(source, f"label budget {budget!r} must be a positive integer or 'all'") from None
    if parsed.cases is not None and parsed.cases > pool_size:
        raise MedsslInputError(source, f"label budget {parsed} exceeds the training pool of {pool_size} cases")
    return parsed


def _with_budgets(split: dict[str, Any], budgets: Sequence[BudgetLike], source: str | Path) -> dict[str, Any]:
    pool = split["train_order"]
    parsed = [_check_budget(b, len(pool), source) for b in budgets]
    return {**split, "budgets": {b.label: b.take(pool) for b in parsed}}


def make_splits(
    case_ids: Sequence[str],
    seed: int,
    budgets: Sequence[BudgetLike],
    n_test: int,
    n_val: int,
    source: str | Path = "splits",
) -> dict[str, Any]:
    """One seed's split: ``{"seed", "test", "val", "train_order", "budgets": {"5": [...], ...}}``."""
    ids = sorted(str(c) for c in case_ids)
    if len(set(ids)) != len(ids):
        raise MedsslInputError(source, "case ids are not unique")
    if n_test < 0 or n_val < 0:
        raise MedsslInputError(source, "n_test and n_val must be >= 0")
    if n_test + n_val >= len(ids):
        raise MedsslInputError(
            source,
            f"{len(ids)} cases leave no training case after n_test={n_test} test and n_val={n_val} validation "
            f"cases; lower them (e.g. the overrides n_test=1 n_val=1, or finetune: {{n_test: 1, n_val: 1}} in a "
            "benchmark YAML) or add cases",
        )
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    split = {
        "seed": int(seed),
        "test": order[:n_test],
        "val": order[n_test : n_test + n_val],
        "train_order": order[n_test + n_val :],
    }
    return _with_budgets(split, budgets, source)


def train_cases(split: dict[str, Any], budget: BudgetLike) -> list[str]:
    """The training cases of ``budget`` (a prefix of the seeded training order)."""
    pool = list(split["train_order"])
    return _check_budget(budget, len(pool), "splits").take(pool)


def _read_splits_file(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise MedsslInputError(path, f"unreadable splits file ({err})") from None
    if (
        not isinstance(data, dict)
        or data.get("version") != SPLITS_VERSION
        or not isinstance(data.get("case_ids"), list)
        or not isinstance(data.get("seeds"), dict)
    ):
        raise MedsslInputError(path, f"not a medssl splits file (version {SPLITS_VERSION} expected)")
    return data


def load_or_create_splits(
    path: str | Path,
    case_ids: Sequence[str],
    seed: int,
    budgets: Sequence[BudgetLike],
    n_test: int,
    n_val: int,
) -> dict[str, Any]:
    """The split of ``seed`` from ``path``, created (and added to the file) on first use."""
    path = Path(path)
    ids = sorted(str(c) for c in case_ids)
    with file_lock(path.with_name(path.name + ".lock")):
        data = _read_splits_file(path) or {"version": SPLITS_VERSION, "case_ids": ids, "seeds": {}}
        if data["case_ids"] != ids:
            added = sorted(set(ids) - set(data["case_ids"]))
            removed = sorted(set(data["case_ids"]) - set(ids))
            raise MedsslInputError(
                path,
                f"the task's cases changed since the splits were written (added {added[:5]}, removed "
                f"{removed[:5]}); splits never change once written: delete the file to re-split",
            )
        stored = data["seeds"].get(str(seed))
        if stored is None:
            made = make_splits(ids, seed, budgets, n_test, n_val, source=path)
            data["seeds"][str(seed)] = {k: made[k] for k in ("test", "val", "train_order")}
            atomic_write_json(path, data)
            return made
    parts = [stored.get(k) if isinstance(stored, dict) else None for k in ("test", "val", "train_order")]
    lists = [p for p in parts if isinstance(p, list)]
    if len(lists) != len(parts) or sorted(sum(lists, [])) != ids:
        raise MedsslInputError(path, f"seed {seed}: test/val/train_order do not partition the case ids")
    if (len(stored["test"]), len(stored["val"])) != (n_test, n_val):
        raise MedsslInputError(
            path,
            f"seed {seed} was split with {len(stored['test'])} test and {len(stored['val'])} validation "
            f"cases, now asked for {n_test} and {n_val}; splits never change once written",
        )
    return _with_budgets({"seed": int(seed), **stored}, budgets, path)


def run_split(config: Any, case_ids: Sequence[str], default_path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """The split and training cases of a run on a task (fine-tuning or probe): ``config``'s seed, budget,
    ``n_test`` and ``n_val``, from ``config.splits_path`` (a benchmark's shared file) or ``default_path``."""
    split = load_or_create_splits(
        config.splits_path or default_path, case_ids, config.seed, [config.budget], config.n_test, config.n_val
    )
    return split, train_cases(split, config.budget)
