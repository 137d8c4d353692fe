"""The transfer study's controls end to end on tiny phantoms: the identity-transformer segmenter, the encoder
drift every fine-tuning run records, the supervised control's run (its encoder exported with metadata), the
``probe`` run kind and its CLI, and the online probe during pretraining."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from medssl.analysis.probe_run import run_probe
from medssl.cli import app
from medssl.config import (
    IDENTITY_TRANSFORMER,
    SUPERVISED,
    EncoderConfig,
    FinetuneConfig,
    MethodConfig,
    OnlineProbeConfig,
    PreprocessConfig,
    PretrainConfig,
    ProbeConfig,
    ProbeRunConfig,
    ScheduleConfig,
)
from medssl.data.corpus import ingest_corpus
from medssl.data.synth import synth_corpus, synth_task
from medssl.errors import ConfigError
from medssl.models import SwinSegmenter, load_encoder
from medssl.models.checkpoint import load_segmenter
from medssl.runs import RunDir
from medssl.train.drift import ENCODER_PARTS, encoder_drift, encoder_snapshot
from medssl.train.finetune import run_finetune
from medssl.train.pretrain import run_pretrain
from medssl.train.supervised import run_supervised

TINY = EncoderConfig(preset="tiny", window_size=4)
PRE = PreprocessConfig(spacing=(4.0, 4.0, 4.0))
HEAD = ProbeConfig(steps=20, points_per_class=50)


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    return synth_task(tmp_path_factory.mktemp("task") / "ct_organs", "ct_organs", 5, seed=5, shape=(32, 32, 32))


def _finetune(task: Path, **changes) -> FinetuneConfig:
    fields = {
        "task": task,
        "encoder": TINY,
        "budget": 2,
        "crop_size": 32,
        "preprocess": PRE,
        "n_test": 2,
        "n_val": 1,
        "val_every": 2,
        "schedule": ScheduleConfig(steps=2, batch_size=1, lr=1e-2, warmup_steps=0, log_every=1),
    }
    return FinetuneConfig(**{**fields, **changes})


def test_identity_transformer_has_no_swin_blocks_and_keeps_everything_else() -> None:
    swin, identity = (SwinSegmenter(TINY, 3, crop_size=32, transformer=t) for t in ("swin", "identity"))
    kept = set(identity.state_dict())
    assert not any(".blocks." in k for k in kept)
    assert kept == {k for k in swin.state_dict() if ".blocks." not in k}  # patch embedding, mergings, decoder
    assert any(k.startswith("swinViT.layers4.0.downsample") for k in kept)
    x = torch.rand(1, 1, 32, 32, 32)
    assert identity(x).shape == swin(x).shape == (1, 3, 32, 32, 32)
    with pytest.raises(ValueError):
        SwinSegmenter(TINY, 3, crop_size=32, transformer="mlp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="identity"):
        FinetuneConfig(transformer="identity", encoder_checkpoint=Path("enc.pt"))


def test_encoder_drift_is_relative_change_per_stage() -> None:
    encoder = SwinSegmenter(TINY, 3, crop_size=32).swinViT
    start = encoder_snapshot(encoder)
    assert all(v == 0.0 for v in encoder_drift(start, encoder).values())
    with torch.no_grad():
        for p in encoder.layers4.parameters():
            p.mul_(2.0)  # stage 4 moves by exactly its own norm
    drift = encoder_drift(start, encoder)
    assert drift["stage4"] == pytest.approx(1.0)
    assert all(drift[p] == 0.0 for p in ENCODER_PARTS if p != "stage4")
    assert 0.0 < drift["encoder"] < 1.0


def test_finetune_records_drift_and_the_identity_row(task: Path, tmp_path: Path) -> None:
    results = run_finetune(_finetune(task), tmp_path / "swin")
    assert set(results["encoder_drift"]) == {*ENCODER_PARTS, "encoder"}
    assert results["encoder_drift"]["stage4"] > 0 and results["transformer"] == "swin"

    identity = run_finetune(_finetune(task, transformer="identity"), tmp_path / "identity")
    assert (identity["method"], identity["family"], identity["transformer"]) == (
        IDENTITY_TRANSFORMER,
        "control",
        "identity",
    )
    assert identity["encoder_drift"]["stage1"] > 0  # its patch mergings train
    model, meta = load_segmenter(tmp_path / "identity" / identity["model"])  # rebuilt without blocks, strictly
    assert meta["transformer"] == "identity" and not any(".blocks." in k for k in model.state_dict())


def test_supervised_control_exports_its_encoder_as_a_row(task: Path, tmp_path: Path) -> None:
    results = run_supervised(_finetune(task, budget="all"), tmp_path / "control")
    run = RunDir(tmp_path / "control")
    assert run.info()["kind"] == results["kind"] == SUPERVISED  # never counted as a fine-tuning result
    encoder, meta = load_encoder(run.encoder_path)
    assert (meta["method"], meta["family"], meta["spacing"]) == (SUPERVISED, SUPERVISED, [4.0, 4.0, 4.0])
    assert results["encoder"] == "checkpoints/encoder.pt" and meta["run_id"] == run.id
    best, _ = load_segmenter(run.path / results["model"])
    assert torch.equal(encoder.patch_embed.proj.weight, best.swinViT.patch_embed.proj.weight)  # the tested one

    downstream = run_finetune(_finetune(task, encoder_checkpoint=run.encoder_path), tmp_path / "ft")
    assert (downstream["method"], downstream["family"]) == (SUPERVISED, SUPERVISED)


def test_probe_run_and_cli(task: Path, tmp_path: Path) -> None:
    splits = tmp_path / "splits.json"
    run_finetune(_finetune(task, splits_path=splits), tmp_path / "ft")  # the fine-tuning run writes the split
    config = ProbeRunConfig(
        task=task, encoder=TINY, budget=2, seed=0, preprocess=PRE, n_test=2, n_val=1, splits_path=splits, probe=HEAD
    )
    results = run_probe(config, tmp_path / "probe")
    tested = json.loads(splits.read_text())["seeds"]["0"]["test"]
    assert {r["case"] for r in results["cases"]} == set(tested)  # the fine-tuning runs' test cases
    assert results["kind"] == RunDir(tmp_path / "probe").info()["kind"] == "probe"
    assert results["method"] == "none" and math.isfinite(results["mean_dice"]) and results["n_train"] == 2
    assert run_probe(config, tmp_path / "probe") == results  # finished: returned as stored

    out = tmp_path / "cli"
    args = ["probe", "none", "--task", str(task), "--budget", "1", "--seed", "1", "--out", str(out)]
    extra = ["n_test=2", "n_val=1", "probe.steps=10", "probe.points_per_class=30", "preprocess.spacing=[4,4,4]"]
    result = CliRunner().invoke(app, args + extra)
    assert result.exit_code == 0, result.output
    assert "probe test Dice" in result.output
    stored = json.loads((out / "results.json").read_text())
    assert (stored["budget"], stored["seed"], stored["n_train"]) == ("1", 1, 1)


def test_online_probe_logs_probe_dice(task: Path, tmp_path: Path) -> None:
    root = tmp_path / "c"
    synth_corpus(root / "scans", 2, seed=3, shape=(32, 32, 32))
    corpus = ingest_corpus(root / "scans", root / "corpus", PRE).root
    config = PretrainConfig(
        method=MethodConfig(name="simmim"),
        encoder=TINY,
        corpus=corpus,
        crop_size=32,
        preprocess=PRE,
        schedule=ScheduleConfig(steps=2, batch_size=2, lr=5e-4, warmup_steps=0, log_every=1),
        probe=OnlineProbeConfig(every=2, task=task, n_train=1, n_test=1, steps=10, points_per_class=30),
    )
    run_pretrain(config, tmp_path / "pre")
    probes = [r for r in RunDir(tmp_path / "pre").read_metrics() if "probe" in r]
    assert [r["step"] for r in probes] == [0, 2]  # before the first step, then every 2 steps
    assert all(0.0 <= r["probe"]["dice"] <= 1.0 for r in probes)
    events = list((tmp_path / "pre" / "tensorboard").glob("events.*"))
    assert events  # probe/dice beside the losses

    with pytest.raises(ConfigError, match="probe.task"):
        run_pretrain(config.model_copy(update={"probe": OnlineProbeConfig(every=2)}), tmp_path / "refused")
