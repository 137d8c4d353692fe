"""benchmarks/gpu_suite.py runs its whole code path on a CPU at tiny size (methods and fine-tuning)."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peak_table_and_override():
    suite = _load()
    assert suite.peak_tflops(torch.device("cpu"), None) is None
    assert suite.peak_tflops(torch.device("cpu"), 123.0) == 123.0
    assert suite.PEAK_BF16_TFLOPS["H200"] > suite.PEAK_BF16_TFLOPS["A100"]


@pytest.mark.slow
def test_tiny_cpu_suite_times_counts_and_checks_numerics():
    suite = _load()
    lines: list[str] = []
    rows = suite.run_suite(
        torch.device("cpu"),
        tiny=True,
        steps=1,
        compile_too=False,
        peak=1.0,
        budget_s=0.0,
        methods=["simmim"],
        print_fn=lines.append,
    )
    assert [r["module"] for r in rows] == ["simmim", "finetune"]
    for row in rows:
        assert row["step_s"] > 0 and row["flops"] > 1e8 and math.isfinite(row["mfu_pct"]) and row["mfu_pct"] > 0
        for dloss, dgrad in row["numerics"].values():
            assert math.isfinite(dloss) and dloss < 0.05
            assert math.isfinite(dgrad) and dgrad < 0.5
    assert any(line.startswith("finetune") for line in lines)
