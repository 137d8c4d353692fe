"""The collapse verdict calibrated both ways at demo scale (40 steps, batch 4, 32^3, tiny preset, window 4, the
demo's heads and phantom corpus).

``data/health_demo_runs.json`` holds the health series every step of those runs logged, recorded by
``benchmarks/health_calibration.py --fixture`` (figures in benchmarks/README.md): each method at the shared
schedule (lr 5e-4, 5 warm-up steps) and DINO, iBOT and SMIT at their own published recipes (lr 7.8e-6 at
batch 4). DINO, iBOT and SMIT collapse at the shared lr (their students' spread falls 22-125x) and must be
flagged, at the demo's logging interval too; the same runs at their own recipes, every other method, and
every randomly initialised network (the first step) must not. One short real DINO run checks the same on a
run made now.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medssl.config import EncoderConfig, MethodConfig, PreprocessConfig, PretrainConfig, ScheduleConfig
from medssl.data.corpus import ingest_corpus
from medssl.data.synth import synth_corpus
from medssl.methods.verdict import SPREAD_FALL_LIMIT, TEACHER_UNINFORMATIVE, health_verdict
from medssl.train.pretrain import run_pretrain

RECORDED = json.loads((Path(__file__).parent / "data" / "health_demo_runs.json").read_text())
COLLAPSING = {"dino/shared", "ibot/shared", "smit/shared"}
DEMO_HEADS = {"out_dim": 1024, "hidden_dim": 512, "bottleneck_dim": 128, "n_local_crops": 2}


def records(run: str, every: int = 1) -> list[dict[str, float]]:
    """The run's logged rows, every ``every``-th step (the demo logs every 5)."""
    keys = RECORDED[run]["keys"]
    rows = [dict(zip(keys, row, strict=True)) for row in RECORDED[run]["rows"]]
    return [{k: v for k, v in row.items() if v is not None} for row in rows if row["step"] % every == 0]


def test_the_recording_has_both_sides() -> None:
    assert set(RECORDED) >= COLLAPSING
    assert {"dino/published", "ibot/published", "smit/published"} <= set(RECORDED)
    assert len(RECORDED) >= 9  # every method at the shared schedule, three at their own recipes


@pytest.mark.parametrize("every", [1, 5])
@pytest.mark.parametrize("run", sorted(RECORDED))
def test_collapsed_runs_are_flagged_and_healthy_ones_not(run: str, every: int) -> None:
    verdict = health_verdict(records(run, every))
    assert verdict["assessed"]
    if run in COLLAPSING:
        assert verdict["collapsed"], verdict["final"]
        assert verdict["spread_fall"] > SPREAD_FALL_LIMIT and "fell" in verdict["reason"]
        assert verdict["uninformative_distillation"].startswith("the distillation was uninformative: the run collapsed")
    else:
        assert not verdict["collapsed"], verdict["reasons"]
        assert verdict["spread_fall"] is None or verdict["spread_fall"] < SPREAD_FALL_LIMIT / 2  # a margin


@pytest.mark.parametrize("run", sorted(RECORDED))
def test_random_init_is_not_flagged(run: str) -> None:
    """The first step's health is the randomly initialised networks' (the forward before the first update)."""
    assert not health_verdict(records(run)[:1])["collapsed"]


def test_uninformative_distillation_is_reported_and_only_for_teacher_student_runs() -> None:
    smit = health_verdict(records("smit/published"))
    second_half = [r["health/teacher_entropy_ratio"] for r in records("smit/published")[20:]]
    assert min(second_half) >= TEACHER_UNINFORMATIVE and not smit["collapsed"]
    assert "teacher stayed at >= 0.99 log K" in smit["uninformative_distillation"]
    for run in ("simclr/shared", "simmim/shared", "rotnet/shared"):
        assert health_verdict(records(run))["uninformative_distillation"] is None


def test_the_start_spread_is_read_once_its_steps_are_in_and_survives_a_resume() -> None:
    def row(step: int, spread: float, start: float) -> dict[str, float]:
        return {"step": step, "health/embedding_std_scaled": spread, "health/embedding_std_scaled_start": start}

    # Logged every step: the first rows average fewer than three steps; the verdict reads step 3's value.
    early = [row(1, 0.3, 0.3), row(2, 0.2, 0.25), row(3, 0.1, 0.2)]
    collapsing = [*early, *(row(s, 0.005, 0.2) for s in range(4, 10))]
    assert health_verdict(collapsing)["spread_fall"] == pytest.approx(0.2 / 0.005)
    # A resumed run logs a new start (its own first steps after the resume); the first run's is kept.
    resumed = [*collapsing[:5], *(row(s, 0.005, 0.005) for s in range(10, 16))]
    assert health_verdict(resumed)["spread_fall"] == pytest.approx(0.2 / 0.005) and health_verdict(resumed)["collapsed"]
    # Logged every 5 steps: the first row already holds the three-step mean.
    assert health_verdict([row(5, 0.1, 0.2), row(10, 0.15, 0.2)])["spread_fall"] == pytest.approx(0.2 / 0.125)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    synth_corpus(root / "scans", 4, seed=0, shape=(48, 48, 48), spacing=(4.0, 4.0, 4.0))
    return ingest_corpus(root / "scans", root / "corpus", PreprocessConfig(spacing=(4.0, 4.0, 4.0))).root


def test_a_short_real_dino_run_at_the_shared_lr_is_flagged(corpus: Path, tmp_path) -> None:
    """12 steps of the demo's DINO made now (batch 4, 32^3, tiny, window 4, its heads) at lr 5e-4 with warm-up:
    its student's spread falls past the limit within the run (its own recipe's run: the recorded series)."""
    config = PretrainConfig(
        method=MethodConfig(name="dino", options=DEMO_HEADS),
        encoder=EncoderConfig(preset="tiny", window_size=4),
        corpus=corpus,
        crop_size=32,
        preprocess=PreprocessConfig(spacing=(4.0, 4.0, 4.0)),
        schedule=ScheduleConfig(
            steps=12, batch_size=4, lr=5e-4, min_lr=1e-5, warmup_steps=3, weight_decay=0.05, log_every=2
        ),
    )
    health = run_pretrain(config, tmp_path / "dino")["health"]
    assert health["collapsed"] and health["spread_fall"] > SPREAD_FALL_LIMIT, health["final"]
