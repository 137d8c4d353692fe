"""The run lifecycle (``medssl.runs.perform_run``): its steps in order, a refused start that binds
nothing, and every kind (pretrain, finetune, cka) going through it."""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from pathlib import Path

import pytest

import medssl.runs
from medssl import cli
from medssl.config import StrictModel
from medssl.data.synth import synth_corpus, synth_task
from medssl.errors import ConfigError, MedsslInputError
from medssl.limits import set_limits
from medssl.runs import RunDir, RunWork, perform_run


class ToyConfig(StrictModel):
    value: int = 0


def toy_work(calls: list[str], results: dict | None = None, fail: BaseException | None = None) -> RunWork:
    def body(started: float) -> dict:
        calls.append("body")
        if fail is not None:
            raise fail
        return results if results is not None else {"kind": "toy", "answer": 42}

    calls.append("open")
    return RunWork("toy", {"method": "m"}, body)


def test_a_run_goes_through_every_step_and_is_then_returned_as_stored(tmp_path: Path) -> None:
    run, calls = RunDir(tmp_path / "r"), []
    assert perform_run(run, ToyConfig(value=1), lambda: toy_work(calls)) == {"kind": "toy", "answer": 42}
    assert calls == ["open", "body"]
    info = run.info()
    assert info["kind"] == "toy" and info["method"] == "m" and info["run_id"] == "r" and len(info["config_hash"]) == 12
    assert info["hardware"]["world_size"] == 1 and info["hardware"]["cpu_count"] >= 1 and "code_version" in info
    assert run.config_path.read_text() == "value: 1\n" and run.status() == "finished"
    log = run.log_path.read_text()
    assert "start toy" in log and log.rstrip().endswith("finished")
    # finished: the stored results, without opening the inputs again
    assert perform_run(run, ToyConfig(value=1), lambda: toy_work(calls, {"other": 1})) == {"kind": "toy", "answer": 42}
    assert calls == ["open", "body"]


def test_another_config_is_refused_before_its_inputs_are_opened(tmp_path: Path) -> None:
    run, calls = RunDir(tmp_path / "r"), []
    perform_run(run, ToyConfig(value=1), lambda: toy_work(calls))
    with pytest.raises(ConfigError, match=r"differs in: value"):
        perform_run(run, ToyConfig(value=2), lambda: toy_work(calls))
    assert calls == ["open", "body"]


def test_a_refused_start_binds_nothing(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "r")

    def refuse() -> RunWork:
        raise MedsslInputError(tmp_path / "corpus", "not an ingested corpus")

    with pytest.raises(MedsslInputError):
        perform_run(run, ToyConfig(value=1), refuse, identity={"encoder_sha256": "a" * 64})
    assert not run.path.exists()  # refused while its inputs were opened: nothing written
    calls: list[str] = []  # the corrected start, another config into the same folder
    perform_run(run, ToyConfig(value=2), lambda: toy_work(calls), identity={"encoder_sha256": "b" * 64})
    assert run.is_finished() and run.config_path.read_text() == "value: 2\n"
    assert run.info()["encoder_sha256"] == "b" * 64


def test_an_input_refused_inside_the_work_unbinds_only_a_run_without_progress(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "r")
    bad_input = MedsslInputError(tmp_path / "a.pt", "not an encoder checkpoint")
    with pytest.raises(MedsslInputError):
        perform_run(run, ToyConfig(value=1), lambda: toy_work([], fail=bad_input), identity={"encoder_sha256": "a"})
    assert run.status() == "failed" and "not an encoder checkpoint" in json.loads(run.status_path.read_text())["error"]
    assert not run.config_path.exists() and not run.info_path.exists()  # the refusal is recorded, nothing bound
    perform_run(run, ToyConfig(value=2), lambda: toy_work([]), identity={"encoder_sha256": "b"})
    assert run.is_finished() and run.config_path.read_text() == "value: 2\n"

    def fail_after_a_checkpoint(started: float) -> dict:
        (other.checkpoint_dir / "last.pt").write_bytes(b"state")
        raise bad_input

    other = RunDir(tmp_path / "other")
    with pytest.raises(MedsslInputError):
        perform_run(other, ToyConfig(value=1), lambda: RunWork("toy", {}, fail_after_a_checkpoint))
    assert other.config_path.exists()  # it made progress: bound, so another config cannot resume it
    with pytest.raises(ConfigError, match="differs in: value"):
        perform_run(other, ToyConfig(value=2), lambda: toy_work([]))


def test_a_failure_is_recorded_and_an_interrupt_leaves_the_run_to_resume(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "r")
    with pytest.raises(RuntimeError, match="boom"):
        perform_run(run, ToyConfig(), lambda: toy_work([], fail=RuntimeError("boom")))
    assert run.status() == "failed" and json.loads(run.status_path.read_text())["error"] == "RuntimeError: boom"
    assert run.config_path.exists()  # the work started: the run is bound to its config
    with pytest.raises(KeyboardInterrupt):
        perform_run(run, ToyConfig(), lambda: toy_work([], fail=KeyboardInterrupt()))
    assert run.status() == "pending"


def test_a_full_disk_still_records_the_original_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = RunDir(tmp_path / "r")

    def fill_the_disk() -> dict:
        def no_space(*args: object, **kwargs: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(medssl.runs, "atomic_write_json", no_space)  # status.json can no longer be replaced
        raise OSError(errno.ENOSPC, "No space left on device", "last.pt")

    with pytest.raises(OSError, match="No space left"):
        perform_run(run, ToyConfig(), lambda: RunWork("toy", {}, lambda started: fill_the_disk()))
    status = json.loads(run.status_path.read_text())
    assert status["status"] == "failed" and "No space left on device" in status["error"]


def test_stale_temporaries_of_a_killed_run_are_swept(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "r")
    old = time.time() - 3600
    stale = [run.checkpoint_dir / ".last.pt.abc.tmp", run.path / ".status.json.def.tmp"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * 100)
        os.utime(path, (old, old))
    fresh = run.path / ".metrics.jsonl.new.tmp"  # another writer's, younger than a minute: kept
    fresh.write_bytes(b"x")
    perform_run(run, ToyConfig(), lambda: toy_work([]))
    assert not any(p.exists() for p in stale) and fresh.exists()


def test_no_kind_keeps_a_lifecycle_of_its_own() -> None:
    """The lifecycle's steps live in runs.py alone: no entry point locks, marks status or writes results."""
    src = Path(medssl.runs.__file__).parent
    for module in ("train/pretrain.py", "train/finetune.py", "analysis/cka_run.py"):
        text = (src / module).read_text(encoding="utf-8")
        assert "perform_run(" in text or "perform_training_run(" in text, module
        for step in (".lock(", ".set_status(", ".write_results(", ".prepare(", "check_identity("):
            assert step not in text, (module, step)
    assert not (src / "train" / "session.py").exists()


# --------------------------------------------------------------------------- CKA through the lifecycle


@pytest.fixture(scope="module")
def cka_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    from medssl.config import EncoderConfig
    from medssl.models.checkpoint import encoder_meta, save_encoder
    from medssl.models.encoder import SwinEncoder

    root = tmp_path_factory.mktemp("cka")
    task = synth_task(root / "task", "ct_organs", 2, seed=0, shape=(32, 32, 32))
    tiny = EncoderConfig(preset="tiny", window_size=4)
    paths = []
    for seed in (0, 1):
        import torch

        torch.manual_seed(seed)
        path = root / f"enc{seed}.pt"
        save_encoder(path, SwinEncoder(tiny), encoder_meta(method="simmim", family="mim", encoder=tiny))
        paths.append(path)
    return paths[0], paths[1], task


def cka_config(a: Path, b: Path, task: Path, **options: object):
    from medssl.config import CKARunConfig

    settings: dict = {"n_crops": 2, "crop_size": 32, "batch_size": 2, "max_tokens": 8, **options}
    return CKARunConfig(model_a=a, model_b=b, task=task, **settings)


def test_a_cka_run_checks_identity_sweeps_temporaries_and_survives_a_full_disk(
    cka_inputs: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import medssl.analysis.cka_run
    from medssl.analysis.cka_run import run_cka

    a, b, task = cka_inputs
    run = RunDir(tmp_path / "cka")
    stale = run.checkpoint_dir / ".x.pt.abc.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"\0")
    os.utime(stale, (time.time() - 3600,) * 2)
    run_cka(cka_config(a, b, task), run.path)
    assert run.is_finished() and not stale.exists()  # the stale temporary of a killed run is gone
    assert run.info()["hardware"]["world_size"] == 1
    # another config into the same folder is refused, the finished run untouched
    results = run.results_path.read_bytes()
    with pytest.raises(ConfigError, match=r"differs in: n_crops"):
        run_cka(cka_config(a, b, task, n_crops=3), run.path)
    assert run.results_path.read_bytes() == results

    def fill_the_disk(*args: object, **kwargs: object) -> None:
        def no_space(*a: object, **k: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(medssl.runs, "atomic_write_json", no_space)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(medssl.analysis.cka_run, "cka_matrices", fill_the_disk)
    full = RunDir(tmp_path / "cka-full")
    with pytest.raises(OSError, match="No space left"):
        run_cka(cka_config(a, b, task), full.path)
    status = json.loads(full.status_path.read_text())
    assert status["status"] == "failed" and "No space left on device" in status["error"]


# --------------------------------------------------------------------------- a refused start through the CLI

FAST_FINETUNE = [
    "crop_size=32",
    "schedule.steps=1",
    "schedule.warmup_steps=0",
    "val_every=1",
    "n_test=1",
    "n_val=1",
    "encoder.window_size=4",
    "preprocess.spacing=[4,4,4]",
    "sw_batch_size=1",
]


@pytest.fixture(autouse=True)
def default_limits():
    set_limits(None)
    yield
    set_limits(None)


def run_cli(args: list, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["medssl", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    _, err = capsys.readouterr()
    return int(exit_info.value.code or 0), err


def test_a_refused_pretrain_start_leaves_out_free_for_the_corrected_command(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = synth_corpus(tmp_path / "scans", 1, seed=0, shape=(32, 32, 32))[0].parent  # scans, not ingested
    out = tmp_path / "pre"
    args = ["pretrain", "--method", "simmim", "--out", out, "encoder.window_size=4", "crop_size=32"]
    args += ["schedule.steps=1", "schedule.batch_size=1", "schedule.warmup_steps=0"]
    code, err = run_cli([*args, "--corpus", raw], capsys, monkeypatch)
    assert code == 2 and str(raw) in err
    ingested = tmp_path / "corpus"
    assert run_cli(["data", "ingest", raw, "--out", ingested, "--set", "spacing=[4,4,4]"], capsys, monkeypatch)[0] == 0
    code, err = run_cli([*args, "--corpus", ingested], capsys, monkeypatch)
    assert code == 0, err
    assert RunDir(out).is_finished()


def test_a_refused_finetune_or_cka_start_leaves_out_free_for_the_corrected_command(
    cka_inputs: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, _ = cka_inputs
    task = synth_task(tmp_path / "task", "ct_organs", 4, seed=1, shape=(32, 32, 32))
    out = tmp_path / "ft"
    code, err = run_cli(
        ["finetune", "--task", task, "--encoder", tmp_path / "missing.pt", "--out", out, *FAST_FINETUNE],
        capsys,
        monkeypatch,
    )
    assert code == 2 and "missing.pt" in err
    code, err = run_cli(["finetune", "--task", task, "--encoder", a, "--out", out, *FAST_FINETUNE], capsys, monkeypatch)
    assert code == 0, err
    assert RunDir(out).is_finished() and RunDir(out).info()["encoder_checkpoint"] == str(a)

    cka_out = tmp_path / "cka"
    code, err = run_cli(["cka", a, tmp_path / "missing.pt", "--task", task, "--out", cka_out], capsys, monkeypatch)
    assert code == 2 and "missing.pt" in err
    code, err = run_cli(["cka", a, b, "--task", task, "--out", cka_out], capsys, monkeypatch)
    assert code == 0, err
    assert RunDir(cka_out).is_finished()
