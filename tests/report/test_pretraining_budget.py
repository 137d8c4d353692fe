"""The sentence at the top of a report: each encoder's pretraining budget and whether its loss fell."""

import pandas as pd

from medssl.report.build import _pretraining_budget, loss_trend


def _curve(method, run_id, losses):
    return [{"method": method, "run_id": run_id, "step": 10 * (i + 1), "loss": v} for i, v in enumerate(losses)]


def test_budget_sentence_counts_runs_whose_loss_fell():
    curves = pd.DataFrame(
        _curve("simmim", "a", [0.5, 0.4, 0.3, 0.2, 0.2, 0.1]) + _curve("dino", "b", [6.0, 6.2, 6.5, 6.8, 6.9, 7.0])
    )
    trend = loss_trend(curves).set_index("run_id")
    assert abs(trend.loc["a", "loss_first"] - 0.4) < 1e-12 and abs(trend.loc["a", "loss_last"] - 0.5 / 3) < 1e-12
    pretrain = pd.DataFrame({"method": ["simmim", "dino"], "steps": [40, 40], "run_id": ["a", "b"]})
    text = _pretraining_budget(pretrain, curves)
    assert text.startswith("Pretraining budget: 40 steps per method (2 pretraining runs)")
    assert "went down in 1 of 2 runs (not for dino" in text
    assert _pretraining_budget(pretrain.iloc[0:0], curves.iloc[0:0]) is None
