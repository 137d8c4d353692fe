"""Every metrics record of a run is mirrored as TensorBoard scalars beside ``metrics.jsonl``."""

import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from medssl.runs import RunDir, flatten_scalars


def _scalars(run: RunDir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run.tensorboard_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_flatten_scalars_nests_and_skips_non_finite_and_text():
    record = {"loss": 1.5, "val": {"liver": 0.5, "bad": math.nan}, "ok": True, "name": "x", "inf": math.inf, "n": 3}
    assert dict(flatten_scalars(record)) == {"loss": 1.5, "val/liver": 0.5, "n": 3.0}


def test_metrics_are_written_as_tensorboard_events(tmp_path):
    run = RunDir(tmp_path / "run")
    run.set_status("running")
    run.append_metrics({"step": 1, "loss": 2.0, "lr": 1e-3, "health/effective_rank": 3.5})
    run.append_metrics({"step": 2, "loss": 1.0, "lr": 2e-3, "grad_norm": math.inf})
    run.append_metrics({"step": 2, "val_dice": 0.4, "val_dice_per_structure": {"liver": 0.6, "spleen": 0.2}})
    scalars = _scalars(run)
    assert scalars["loss"] == [(1, 2.0), (2, 1.0)]
    assert scalars["health/effective_rank"] == [(1, 3.5)]
    assert scalars["val_dice"] == [(2, pytest.approx(0.4))]
    assert scalars["val_dice_per_structure/liver"] == [(2, pytest.approx(0.6))]
    assert [s for s, _ in scalars["throughput/steps_per_second"]] == [2]
    assert "grad_norm" not in scalars  # non-finite: left out, not logged as inf
    run.set_status("finished")  # closes the writer
    assert run._tensorboard is None


def test_resume_purges_events_after_the_checkpoint(tmp_path):
    run = RunDir(tmp_path / "run")
    for step in (1, 2, 3):
        run.append_metrics({"step": step, "loss": float(step)})
    run.truncate_metrics_after(1)  # what the loop does when it resumes from the step-1 checkpoint
    for step in (2, 3):
        run.append_metrics({"step": step, "loss": 10.0 * step})
    run.close_tensorboard()
    assert _scalars(RunDir(tmp_path / "run"))["loss"] == [(1, 1.0), (2, 20.0), (3, 30.0)]
