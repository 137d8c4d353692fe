"""Cost beside accuracy: the pretraining cost each run measured, in results, the report's table and plot."""

from __future__ import annotations

import pytest

from medssl.report import build_report
from medssl.report.tables import cost_summary
from medssl.results import pretrain_table, results_table


def test_cost_summary_sets_measured_cost_beside_mean_dice(fake, tmp_path):
    runs = fake.write_benchmark(tmp_path / "bench", cka=False)
    pretrain = pretrain_table(runs)
    assert set(pretrain["flops_per_step"]) == {1e9, 2e9} and set(pretrain["peak_memory_kind"]) == {"cpu_peak_rss"}
    summary = cost_summary(results_table(runs), pretrain).set_index("method")
    assert summary.loc["dino", "total_flops"] == 80e9 and summary.loc["simmim", "total_flops"] == 40e9
    assert summary.loc["none", "total_flops"] == 0.0 and summary.loc["none", "pretrain_runs"] == 0
    assert summary.loc["simmim", "peak_memory_gib"] == pytest.approx(1.0)
    results = results_table(runs)
    cells = results[results["method"] == "simmim"].groupby(["task", "budget"])["dice"].mean()
    assert summary.loc["simmim", "mean_dice"] == pytest.approx(cells.mean())
    assert summary.loc["simmim", "n_task_budgets"] == 4  # 2 tasks x 2 budgets


def test_report_has_the_cost_table_and_the_dice_vs_compute_plot(fake, tmp_path):
    runs = fake.write_benchmark(tmp_path / "bench", cka=False)
    fake.write_finetune_run(runs, "external-published", "ct_organs", "all")  # pretrained elsewhere: no cost
    index = build_report(runs, tmp_path / "report")
    assert (index.parent / "figures" / "cost.png").stat().st_size > 1000
    markdown = (index.parent / "report.md").read_text(encoding="utf-8")
    section = markdown.split("## Cost beside accuracy", 1)[1].split("\n## ", 1)[0]
    assert "flops_per_step" in section and "cost.png" in section
    assert "No measured pretraining cost for external-published" in section
    assert "simmim" in section and "device_hours" in section
