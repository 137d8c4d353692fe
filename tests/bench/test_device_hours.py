"""The dry run's device-hours per stage: totals are steps x measured step time (timer injected)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from medssl.bench.engine import print_plan
from medssl.bench.estimate import (
    PROXY_BATCH,
    cpu_proxy_crops,
    estimate_plan,
    measure_run,
    stage_rows,
    time_encoder_forward,
    work_scale,
)
from medssl.bench.plan import STAGES, expand_plan
from medssl.config import BenchConfig, EncoderConfig

SECONDS = {"pretrain": 2.0, "finetune": 0.5, "cka": 0.25}


def _bench(**changes) -> BenchConfig:
    data = {
        "data": {"synth": {"cases": 5, "corpus_cases": 2, "shape": [32, 32, 32]}, "corpus": "synth"},
        "tasks": [{"path": "synth:ct_organs"}, {"path": "synth:mri_organs", "finetune": {"schedule": {"steps": 7}}}],
        "methods": ["none", "simmim", "rotnet"],
        "encoder": {"preset": "tiny", "window_size": 4},
        "pretrain": {"crop_size": 32, "schedule": {"steps": 30, "batch_size": 2}},
        "finetune": {"crop_size": 32, "n_test": 2, "n_val": 1, "schedule": {"steps": 5, "batch_size": 2}},
        "cka": {"enabled": True, "n_crops": 6, "crop_size": 32, "batch_size": 4},
        "budgets": [2, "all"],
        "seeds": [0, 1],
    }
    data.update(changes)
    return BenchConfig.model_validate(data)


def fake_timer(run, plan, steps):
    return SECONDS[run.kind], "measured now (fake)"


def test_stage_totals_are_steps_times_step_time(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    plan = expand_plan(_bench(), out)
    estimates = estimate_plan(plan, out, timer=fake_timer)
    rows = {(r.stage, r.label): r for r in stage_rows(estimates, STAGES)}

    # pretraining per method: 30 steps x 2 s
    assert rows[("pretrain", "simmim")].steps == 30 and rows[("pretrain", "simmim")].seconds == 60.0
    # fine-tuning per task x budget, summed over seeds (2) and encoders (none, simmim, rotnet)
    organs = rows[("finetune", "ct_organs budget 2")]
    assert organs.runs == 6 and organs.steps == 6 * 5 and organs.seconds == pytest.approx(6 * 5 * 0.5)
    mri = rows[("finetune", "mri_organs budget all")]  # the task's own schedule
    assert mri.runs == 6 and mri.seconds == pytest.approx(6 * 7 * 0.5)
    # CKA: two models x ceil(6 / 4) forward batches per run
    cka = [r for r in rows.values() if r.stage == "cka"]
    assert cka and all(r.steps == r.runs * 2 * 2 for r in cka)
    assert all(r.seconds == pytest.approx(r.steps * 0.25) for r in cka)

    expected = {kind: sum(SECONDS[kind] * e.steps for e in estimates if e.kind == kind) for kind in STAGES}
    print_plan(plan, out, estimates, measure_steps=3)
    printed = capsys.readouterr().out
    for kind in [k for k in STAGES if any(e.kind == k for e in estimates)]:  # a stage without runs has no line
        line = next(ln for ln in printed.splitlines() if f"{kind} total" in ln)
        hours = float(re.findall(r"\d[\d.e+-]*", line.split("│")[5])[0])
        assert hours == pytest.approx(expected[kind] / 3600, rel=1e-2), line
    total_line = next(ln for ln in printed.splitlines() if ln.split("│")[1:2] and ln.split("│")[1].strip() == "total")

    assert float(total_line.split("│")[5]) == pytest.approx(sum(expected.values()) / 3600, rel=1e-2)
    text = " ".join(printed.split())  # the console wraps long lines
    assert "measured now on cpu" in text or "measured now on cuda" in text
    assert "1 warm-up step (excluded)" in text and "mean of 3 timed" in text


def test_a_failed_measurement_is_named_below_the_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    plan = expand_plan(_bench(cka={"enabled": False}), out)

    def timer(run, plan, steps):
        return "RuntimeError: out of memory" if run.kind == "finetune" else (1.0, "measured now (fake)")

    estimates = estimate_plan(plan, out, timer=timer)
    print_plan(plan, out, estimates)
    printed = " ".join(capsys.readouterr().out.split())
    assert "not estimated: finetune ct_organs budget 2" in printed and "RuntimeError: out of memory" in printed
    assert "+ 24 runs ?" in printed  # every fine-tuning run is counted as unknown, none as free


def test_cpu_proxy_for_paper_sizes() -> None:
    smit = EncoderConfig(preset="smit")
    assert cpu_proxy_crops(12, 2, 32, "pretrain") == []  # small enough: timed as it is
    assert cpu_proxy_crops(smit.feature_size, 8, 96, "pretrain") == [32, 64]
    assert cpu_proxy_crops(smit.feature_size, 4, 96, "finetune") == [64]
    assert work_scale(8, 96, PROXY_BATCH, 32) == pytest.approx(4 * 27)


def test_measure_run_times_small_configurations_directly(tmp_path: Path) -> None:
    plan = expand_plan(_bench(methods=["simmim"], budgets=[2], seeds=[0]), tmp_path / "out")
    cka = plan.stage("cka")[0]
    seconds, source = measure_run(cka, plan, 1)
    assert seconds > 0 and source == f"measured now ({'cuda' if torch.cuda.is_available() else 'cpu'})"
    assert time_encoder_forward(EncoderConfig(preset="tiny", window_size=4), 32, 1, steps=1) > 0
