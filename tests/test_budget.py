"""The label budget as one value type: parse, label, order, equality, and unchanged YAML and hashes."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from medssl.budget import Budget
from medssl.config import BenchConfig, FinetuneConfig, config_hash, dump_yaml
from medssl.data.splits import make_splits, train_cases


def test_parse_label_and_json() -> None:
    for value in (5, "5", 5.0, " 5 ", np.int64(5), Budget(5)):
        assert Budget.parse(value) == Budget(5) and Budget.parse(value).label == "5"
    assert Budget.parse("all").is_all and Budget.parse("all").label == "all" and Budget.all().cases is None
    assert Budget(5).to_json() == 5 and Budget.all().to_json() == "all" and str(Budget(5)) == "5"
    for bad in (0, -1, 2.5, True, "many", None, float("nan"), "5 cases"):
        with pytest.raises(ValueError, match="unknown label budget"):
            Budget.parse(bad)


def test_order_equality_and_hash() -> None:
    assert sorted([Budget.all(), Budget(10), Budget(2)]) == [Budget(2), Budget(10), Budget.all()]
    assert Budget(2) < Budget(10) < Budget.all() and max(Budget(3), Budget.all()).is_all
    assert Budget(5) == 5 and Budget.all() == "all" and Budget(5) != "5" and Budget(1) != True  # noqa: E712
    assert len({Budget(5), Budget.parse("5"), 5}) == 1 and {Budget.all(): 1}["all"] == 1
    assert pickle.loads(pickle.dumps(Budget(7))) == Budget(7)
    with pytest.raises(AttributeError):
        Budget(5)._cases = 6  # type: ignore[misc]


def test_configs_hold_the_plain_value() -> None:
    """YAML, JSON and config hashes are what they were when budgets were ``int | "all"``."""
    config = FinetuneConfig(budget="5")
    assert config.budget == Budget(5) and config.model_dump(mode="json")["budget"] == 5
    assert "budget: 5\n" in dump_yaml(config) and "budget: all\n" in dump_yaml(FinetuneConfig())
    assert config_hash(config) == config_hash(FinetuneConfig(budget=5))
    bench = BenchConfig.model_validate({"tasks": [{"path": "synth:ct_organs"}], "budgets": [10, "all", 2]})
    assert sorted(bench.budgets) == [2, 10, "all"] and bench.model_dump(mode="json")["budgets"] == [10, "all", 2]
    with pytest.raises(ValueError, match="listed twice"):
        BenchConfig.model_validate({"tasks": [{"path": "synth:ct_organs"}], "budgets": [5, "5"]})


def test_splits_take_budgets_of_any_form() -> None:
    split = make_splits([f"c{i}" for i in range(10)], seed=0, budgets=[Budget(2), "all", 4], n_test=2, n_val=1)
    assert set(split["budgets"]) == {"2", "4", "all"}
    assert train_cases(split, Budget(2)) == train_cases(split, 2) == split["train_order"][:2]
    assert train_cases(split, Budget.all()) == split["train_order"]
