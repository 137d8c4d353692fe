"""Lesion-wise detection: connected components matched one to one at an overlap threshold, per-case counts and
rates with NaN where undefined, carried into results.json, results.csv and the report for lesion tasks."""

import json
import math

import numpy as np
import pytest

from medssl.config import FinetuneConfig, LesionMetricsConfig, PreprocessConfig, ScheduleConfig
from medssl.data.synth import synth_task
from medssl.evaluate import lesion_detection
from medssl.results import RESULT_COLUMNS, lesion_table, results_table


def _cube(volume: np.ndarray, corner: tuple[int, int, int], size: int, value: int = 1) -> None:
    x, y, z = corner
    volume[x : x + size, y : y + size, z : z + size] = value


def test_counts_rates_and_the_overlap_threshold():
    truth = np.zeros((32, 32, 32), dtype=np.int64)
    pred = np.zeros_like(truth)
    for corner in ((2, 2, 2), (20, 2, 2), (2, 20, 20)):
        _cube(truth, corner, 4)  # three true lesions of 64 voxels
    _cube(pred, (2, 2, 2), 4)  # found exactly
    _cube(pred, (20, 2, 2), 4)
    pred[20:24, 2:6, 2:5] = 0  # the second one only a quarter covered: IoU 16/64 = 0.25
    _cube(pred, (12, 12, 12), 2)  # a false positive
    found = lesion_detection(pred, truth, 1)
    assert (found["n_true_lesions"], found["n_pred_lesions"]) == (3, 3)
    assert (found["lesion_tp"], found["lesion_fp"], found["lesion_fn"]) == (2, 1, 1)
    assert found["lesion_recall"] == pytest.approx(2 / 3) and found["lesion_precision"] == pytest.approx(2 / 3)
    assert found["lesion_f1"] == pytest.approx(4 / 6)
    strict = lesion_detection(pred, truth, 1, LesionMetricsConfig(threshold=0.3))  # 0.25 IoU no longer counts
    assert (strict["lesion_tp"], strict["lesion_fp"], strict["lesion_fn"]) == (1, 2, 2)
    dice = lesion_detection(pred, truth, 1, LesionMetricsConfig(overlap="dice", threshold=0.3))  # Dice 0.4
    assert dice["lesion_tp"] == 2


def test_each_lesion_is_matched_once_and_connectivity_decides_what_a_lesion_is():
    truth = np.zeros((16, 16, 16), dtype=np.int64)
    _cube(truth, (2, 2, 2), 3)
    _cube(truth, (8, 2, 2), 3)
    pred = np.zeros_like(truth)
    pred[2:11, 2:5, 2:5] = 1  # one prediction spanning both: one match, the other lesion missed
    found = lesion_detection(pred, truth, 1)
    assert (found["lesion_tp"], found["lesion_fp"], found["lesion_fn"]) == (1, 0, 1)
    corners = np.zeros((8, 8, 8), dtype=np.int64)
    corners[1, 1, 1] = corners[2, 2, 2] = 1  # touching at a corner only
    assert lesion_detection(corners, corners, 1)["n_true_lesions"] == 1  # 26-connected (default)
    assert lesion_detection(corners, corners, 1, LesionMetricsConfig(connectivity=1))["n_true_lesions"] == 2


def test_undefined_rates_are_none_never_zero_or_one():
    empty = np.zeros((8, 8, 8), dtype=np.int64)
    speck = empty.copy()
    speck[3, 3, 3] = 1
    nothing = lesion_detection(empty, empty, 1)
    assert nothing["lesion_recall"] is None and nothing["lesion_precision"] is None and nothing["lesion_f1"] is None
    false_alarm = lesion_detection(speck, empty, 1)  # no true lesion: recall undefined, precision 0
    assert (
        false_alarm["lesion_recall"] is None and false_alarm["lesion_precision"] == 0 and false_alarm["lesion_f1"] == 0
    )
    missed = lesion_detection(empty, speck, 1)  # no prediction: precision undefined, recall 0
    assert missed["lesion_precision"] is None and missed["lesion_recall"] == 0


def test_lesion_structures_are_declared_by_name_or_explicitly():
    structures = {1: "liver", 2: "liver_tumour", 3: "kidney cyst"}
    assert LesionMetricsConfig().lesion_structures(structures) == {2: "liver_tumour", 3: "kidney cyst"}
    assert LesionMetricsConfig(labels=["liver"]).lesion_structures(structures) == {1: "liver"}
    assert LesionMetricsConfig(labels=[]).lesion_structures(structures) == {}


@pytest.mark.slow
def test_a_lesion_task_carries_lesion_metrics_into_results_json_csv_and_the_report(tmp_path):
    from medssl.report.build import build_report
    from medssl.train.finetune import run_finetune

    task = synth_task(tmp_path / "task", "ct_lesions", 4, seed=4, shape=(32, 32, 32))
    config = FinetuneConfig(
        task=task,
        budget=1,
        crop_size=32,
        n_test=2,
        n_val=1,
        val_every=2,
        preprocess=PreprocessConfig(spacing=(4.0, 4.0, 4.0)),
        schedule=ScheduleConfig(steps=2, batch_size=1, warmup_steps=0, log_every=1),
    )
    results = run_finetune(config, tmp_path / "runs" / "ft")
    assert results["lesion_detection"]["structures"] == ["lesion"] and results["lesion_detection"]["threshold"] == 0.1
    rows = results["lesions"]
    assert len(rows) == 2 and {r["case"] for r in rows} == {r["case"] for r in results["cases"]}
    for row in rows:
        assert {"lesion_recall", "lesion_precision", "lesion_f1", "lesion_tp", "lesion_fp", "lesion_fn"} <= set(row)
        assert row["lesion_tp"] + row["lesion_fn"] == row["n_true_lesions"]
    stored = json.loads((tmp_path / "runs" / "ft" / "results.json").read_text())
    assert stored["lesions"] == rows
    table = results_table(tmp_path / "runs")
    assert list(table.columns) == RESULT_COLUMNS
    lesion_rows = table[table["structure"] == "lesion"]
    assert len(lesion_rows) and lesion_rows["lesion_tp"].notna().all()
    for _, row in lesion_rows.iterrows():
        source = next(r for r in rows if r["case"] == row["case"])
        expected = source["lesion_recall"]
        assert (math.isnan(row["lesion_recall"]) and expected is None) or row["lesion_recall"] == pytest.approx(
            expected
        )
    assert len(lesion_table(tmp_path / "runs")) == 2
    report = build_report(tmp_path / "runs", tmp_path / "report")
    text = (
        (report.parent / "report.md").read_text(encoding="utf-8")
        if report.is_file()
        else (report / "report.md").read_text(encoding="utf-8")
    )
    assert "lesion-wise detection" in text and "TP/FP/FN" in text
    assert "lesion_recall" in (tmp_path / "report" / "results.csv").read_text(encoding="utf-8").splitlines()[0]


def test_region_tasks_score_lesions_on_region_masks():
    """nnU-Net regions (whole tumour = labels 1, 2; core = 2): a lesion is a component of the region's mask."""
    from medssl.data.regions import Regions
    from medssl.evaluate import lesion_rows

    regions = Regions(names=("whole tumor", "tumor core"), labels=((1, 2), (2,)), class_order=(1, 2))
    truth = np.zeros((16, 16, 16), dtype=np.int64)
    truth[2:6, 2:6, 2:6] = 1
    truth[3:5, 3:5, 3:5] = 2  # a core inside the first tumour
    truth[10:13, 10:13, 10:13] = 1  # a second tumour, no core
    pred = truth.copy()
    pred[10:13, 10:13, 10:13] = 0  # the second tumour missed
    rows = lesion_rows(pred, truth, {1: "whole tumor", 2: "tumor core"}, LesionMetricsConfig(), "c", regions)
    whole, core = rows
    assert (whole["n_true_lesions"], whole["lesion_tp"], whole["lesion_fn"]) == (2, 1, 1)
    assert (core["n_true_lesions"], core["lesion_tp"], core["lesion_fn"]) == (1, 1, 0)
