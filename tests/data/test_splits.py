"""Label-budget splits: nested, deterministic, fixed test set, never rewritten."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest

from medssl.data.splits import load_or_create_splits, make_splits, train_cases
from medssl.errors import MedsslInputError

CASES = [f"case_{i:03d}" for i in range(20)]


def test_budgets_are_nested_and_disjoint_from_test_and_val() -> None:
    split = make_splits(CASES, seed=0, budgets=[2, 5, 10, "all"], n_test=4, n_val=2)
    assert len(split["test"]) == 4 and len(split["val"]) == 2 and len(split["train_order"]) == 14
    assert sorted(split["test"] + split["val"] + split["train_order"]) == CASES
    b2, b5, b10, everything = (split["budgets"][k] for k in ("2", "5", "10", "all"))
    assert set(b2) < set(b5) < set(b10) < set(everything) and len(everything) == 14
    held_out = set(split["test"]) | set(split["val"])
    assert not held_out & set(everything)
    assert train_cases(split, 5) == b5 and train_cases(split, "all") == everything


def test_deterministic_per_seed_and_independent_of_input_order() -> None:
    a = make_splits(CASES, seed=3, budgets=[5], n_test=4, n_val=2)
    b = make_splits(list(reversed(CASES)), seed=3, budgets=[5], n_test=4, n_val=2)
    assert a == b
    c = make_splits(CASES, seed=4, budgets=[5], n_test=4, n_val=2)
    assert c["test"] != a["test"] or c["train_order"] != a["train_order"]


def test_test_set_is_the_same_for_every_budget() -> None:
    few = make_splits(CASES, seed=1, budgets=[2], n_test=4, n_val=2)
    many = make_splits(CASES, seed=1, budgets=[10, "all"], n_test=4, n_val=2)
    assert few["test"] == many["test"] and few["val"] == many["val"]


def test_budget_larger_than_pool_names_both_numbers() -> None:
    with pytest.raises(MedsslInputError, match=r"budget 15 exceeds the training pool of 14"):
        make_splits(CASES, seed=0, budgets=[15], n_test=4, n_val=2)
    with pytest.raises(MedsslInputError, match="no training case"):
        make_splits(CASES[:6], seed=0, budgets=["all"], n_test=4, n_val=2)


def test_file_keeps_each_seed_once_written(tmp_path: Path) -> None:
    path = tmp_path / "splits" / "task.json"
    first = load_or_create_splits(path, CASES, seed=0, budgets=[5], n_test=4, n_val=2)
    written = json.loads(path.read_text())
    assert written["version"] == 1 and written["case_ids"] == CASES
    assert set(written["seeds"]["0"]) == {"test", "val", "train_order"}

    # Adding a seed and a budget leaves seed 0 exactly as it was.
    load_or_create_splits(path, CASES, seed=1, budgets=[5], n_test=4, n_val=2)
    again = load_or_create_splits(path, CASES, seed=0, budgets=[5, 10, "all"], n_test=4, n_val=2)
    assert again["test"] == first["test"] and again["train_order"] == first["train_order"]
    assert again["budgets"]["5"] == first["budgets"]["5"]
    assert json.loads(path.read_text())["seeds"]["0"] == written["seeds"]["0"]
    assert set(json.loads(path.read_text())["seeds"]) == {"0", "1"}

    # The file wins over the generator: a hand-written (or older) split is returned as stored.
    data = json.loads(path.read_text())
    data["seeds"]["0"]["train_order"] = list(reversed(data["seeds"]["0"]["train_order"]))
    path.write_text(json.dumps(data))
    stored = load_or_create_splits(path, CASES, seed=0, budgets=[5], n_test=4, n_val=2)
    assert stored["train_order"] == data["seeds"]["0"]["train_order"]


def test_changed_case_list_or_sizes_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "task.json"
    load_or_create_splits(path, CASES, seed=0, budgets=[5], n_test=4, n_val=2)
    with pytest.raises(MedsslInputError, match=r"task\.json: the task's cases changed.*case_020"):
        load_or_create_splits(path, [*CASES, "case_020"], seed=0, budgets=[5], n_test=4, n_val=2)
    with pytest.raises(MedsslInputError, match="3 and 2"):
        load_or_create_splits(path, CASES, seed=0, budgets=[5], n_test=3, n_val=2)
    path.write_text("{not json")
    with pytest.raises(MedsslInputError, match="unreadable splits file"):
        load_or_create_splits(path, CASES, seed=0, budgets=[5], n_test=4, n_val=2)


def _create(path: str, seed: int, queue) -> None:
    split = load_or_create_splits(path, CASES, seed=seed, budgets=["all"], n_test=4, n_val=2)
    queue.put((seed, split["test"]))


def test_concurrent_creation_keeps_every_seed(tmp_path: Path) -> None:
    path = tmp_path / "task.json"
    context = mp.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=_create, args=(str(path), seed, queue)) for seed in range(4)]
    for w in workers:
        w.start()
    results = dict(queue.get(timeout=60) for _ in workers)
    for w in workers:
        w.join(timeout=30)
    stored = json.loads(path.read_text())["seeds"]
    assert sorted(stored) == ["0", "1", "2", "3"]
    assert all(stored[str(seed)]["test"] == test for seed, test in results.items())
