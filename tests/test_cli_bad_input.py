"""Every bad input reaches the user as exit code 2 and one line naming the file, through the CLI."""

import json
import sys

import nibabel as nib
import numpy as np
import pytest

from medssl import cli
from medssl.data.synth import synth_task


def run_cli(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["medssl", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def one_error_line(err):
    # a warning before the work starts (e.g. resampling far finer than the scans) is not an error line
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return synth_task(tmp_path_factory.mktemp("task") / "ct_organs", "ct_organs", 6, seed=1, shape=(32, 32, 32))


def _copy_task(task, tmp_path):
    import shutil

    dst = tmp_path / "task"
    shutil.copytree(task, dst)
    return dst


def _rewrite(path, fn):
    img = nib.load(path)
    data, affine = fn(np.asarray(img.dataobj).copy(), img.affine.copy())
    nib.save(nib.Nifti1Image(data, affine), path)


def test_data_check_lists_every_problem_one_per_line(task, tmp_path, capsys, monkeypatch):
    t = _copy_task(task, tmp_path)
    images, labels = sorted((t / "imagesTr").iterdir()), sorted((t / "labelsTr").iterdir())
    raw = images[0].read_bytes()
    images[0].write_bytes(raw[: len(raw) // 2])  # truncated
    _rewrite(labels[1], lambda d, a: (d[:-2], a))  # shape mismatch
    _rewrite(labels[2], lambda d, a: (d, a @ np.diag([1.2, 1, 1, 1])))  # spacing mismatch
    _rewrite(labels[3], lambda d, a: (np.where(d == 1, 9, d).astype(np.uint8), a))  # undeclared label 9
    _rewrite(
        images[4], lambda d, a: (np.where(np.arange(d.size).reshape(d.shape) == 5, np.nan, d).astype(np.float32), a)
    )  # NaN voxel
    code, out, err = run_cli(["data", "check", t], capsys, monkeypatch)
    assert code == 2
    lines = out.strip().splitlines()
    assert any(images[0].name in x and ("truncated" in x or "unreadable" in x or "cannot" in x) for x in lines), out
    assert any(labels[1].name in x and "shape" in x for x in lines), out
    assert any(labels[2].name in x and "spacing" in x for x in lines), out
    assert any(labels[3].name in x and "9" in x for x in lines), out
    assert any(images[4].name in x and "NaN" in x for x in lines), out


def test_missing_dataset_json_key(task, tmp_path, capsys, monkeypatch):
    t = _copy_task(task, tmp_path)
    data = json.loads((t / "dataset.json").read_text())
    del data["labels"]
    (t / "dataset.json").write_text(json.dumps(data))
    code, _, err = run_cli(
        ["finetune", "--task", t, "--encoder", "none", "--out", tmp_path / "run"], capsys, monkeypatch
    )
    assert code == 2
    line = one_error_line(err)
    assert "dataset.json" in line and "labels" in line
    assert not (tmp_path / "run" / "results.json").exists()


def test_empty_folders(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, _ = run_cli(["data", "check", empty], capsys, monkeypatch)
    assert code == 2 and str(empty) in out
    code, _, err = run_cli(["data", "ingest", empty, "--out", tmp_path / "corpus"], capsys, monkeypatch)
    assert code == 2 and str(empty) in one_error_line(err)
    code, _, err = run_cli(
        ["pretrain", "--method", "simmim", "--corpus", empty, "--out", tmp_path / "r"], capsys, monkeypatch
    )
    assert code == 2 and str(empty) in one_error_line(err)


def test_config_typo_names_key_and_file(task, tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "ft.yaml"
    cfg.write_text("schedule:\n  stesp: 3\n")
    code, _, err = run_cli(
        ["finetune", "--task", task, "--encoder", "none", "--out", tmp_path / "r", "--config", cfg], capsys, monkeypatch
    )
    assert code == 2
    assert one_error_line(err) == f"error: {cfg}: schedule.stesp: unknown key; did you mean schedule.steps?"
    code, _, err = run_cli(
        ["pretrain", "--method", "simmim", "--corpus", tmp_path, "--out", tmp_path / "r", "schedule.lr=fast"],
        capsys,
        monkeypatch,
    )
    assert code == 2 and "schedule.lr" in one_error_line(err)
    code, _, err = run_cli(
        ["pretrain", "--method", "nosuch", "--corpus", tmp_path, "--out", tmp_path / "r"], capsys, monkeypatch
    )
    assert code == 2 and "nosuch" in one_error_line(err)


def test_bad_input_during_finetune_leaves_no_results(task, tmp_path, capsys, monkeypatch):
    t = _copy_task(task, tmp_path)
    label = sorted((t / "labelsTr").iterdir())[0]
    _rewrite(label, lambda d, a: (d[:, :-3], a))
    code, _, err = run_cli(
        ["finetune", "--task", t, "--encoder", "none", "--out", tmp_path / "run", "crop_size=32", "schedule.steps=1"],
        capsys,
        monkeypatch,
    )
    assert code == 2
    assert label.name in one_error_line(err)
    assert not (tmp_path / "run" / "results.json").exists()


def test_unreadable_checkpoint(tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "enc.pt"
    ckpt.write_bytes(b"\x00garbage")
    code, _, err = run_cli(["export", ckpt, "--out", tmp_path / "x.pt"], capsys, monkeypatch)
    assert code == 2 and str(ckpt) in one_error_line(err)
    code, _, err = run_cli(
        ["finetune", "--task", tmp_path, "--encoder", ckpt, "--out", tmp_path / "r"], capsys, monkeypatch
    )
    assert code == 2


# --------------------------------------------------------------------------- issue 19 item 14, issue 20 item 3


OUT_COMMANDS = [
    ["demo"],
    ["bench", "bench.yaml"],
    ["pretrain", "--method", "simmim", "--corpus", "corpus"],
    ["finetune", "--task", "task", "--encoder", "none"],
    ["report", "."],
    ["cka", "a.pt", "b.pt", "--task", "task"],
    ["data", "synth"],
    ["data", "ingest", "scans"],
    ["data", "convert", "btcv", "src"],
]


@pytest.mark.parametrize("command", OUT_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_out_that_is_an_existing_file_is_exit_2(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    existing = tmp_path / "results.txt"
    existing.write_text("the user's own file\n")
    for out in (existing, existing / "sub"):
        code, _, err = run_cli([*command, "--out", out], capsys, monkeypatch)
        assert code == 2, err
        line = one_error_line(err)
        assert str(existing) in line and "existing file" in line
    assert existing.read_text() == "the user's own file\n"


def test_external_encoder_names_must_be_plain(tmp_path, capsys, monkeypatch):
    bench = tmp_path / "bench.yaml"
    bench.write_text(
        "tasks: [{path: 'synth:ct_organs'}]\nmethods: [none]\n"
        "external_encoders: [{name: '../../escape', path: enc.pt}]\n"
    )
    code, _, err = run_cli(["bench", bench, "--out", tmp_path / "out", "--dry-run"], capsys, monkeypatch)
    assert code == 2
    line = one_error_line(err)
    assert "external_encoders.0.name" in line and "not a plain name" in line
    assert not (tmp_path / "out").exists()


def test_batch_size_beyond_the_limit_is_exit_2_naming_the_limit(task, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    code, _, err = run_cli(
        ["finetune", "--task", task, "--encoder", "none", "--out", out, "schedule.batch_size=100000"],
        capsys,
        monkeypatch,
    )
    assert code == 2
    line = one_error_line(err)
    assert "schedule.batch_size 100,000 exceeds the limit" in line and "held in memory" in line
    assert "--limit batch_size=N" in line
    assert not out.exists()


def test_bench_batch_size_beyond_the_limit_is_exit_2_before_anything_is_made(tmp_path, capsys, monkeypatch):
    bench = tmp_path / "bench.yaml"
    bench.write_text(
        "tasks: [{path: 'synth:ct_organs', finetune: {schedule: {batch_size: 100000}}}]\nmethods: [none]\n"
    )
    code, _, err = run_cli(["bench", bench, "--out", tmp_path / "out"], capsys, monkeypatch)
    assert code == 2
    line = one_error_line(err)
    assert "tasks 'synth:ct_organs' finetune: schedule.batch_size 100,000 exceeds the limit" in line
    assert not (tmp_path / "out").exists()


def test_too_few_cases_names_n_test_and_n_val(task, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(
        ["finetune", "--task", task, "--encoder", "none", "--out", tmp_path / "r", "n_test=4", "n_val=2"],
        capsys,
        monkeypatch,
    )
    assert code == 2
    line = one_error_line(err)
    assert "6 cases leave no training case after n_test=4 test and n_val=2 validation cases" in line
    assert "n_test=1 n_val=1" in line


def test_limit_on_the_command_line_reaches_finetune(task, tmp_path, capsys, monkeypatch):
    """`medssl --limit` is passed into the run's config: run_finetune puts the config's limits in force."""
    out = tmp_path / "run"
    code, _, err = run_cli(
        ["--limit", "voxels_per_volume=1000", "finetune", "--task", task, "--encoder", "none", "--out", out],
        capsys,
        monkeypatch,
    )
    assert code == 2
    assert "limits.voxels_per_volume" in one_error_line(err)


def test_limit_on_the_command_line_reaches_every_bench_run(tmp_path, capsys, monkeypatch):
    """A bench run may execute in a spawned worker, under torchrun or on SLURM, none of which inherits this
    process's limits: they travel in each planned run's config."""
    from medssl.bench import engine
    from medssl.bench.executors import ExecutionSummary
    from medssl.limits import limits, set_limits

    seen = {}

    class Recorder:
        def run(self, plan, out):
            seen.update({run.run_id: run.config.limits for run in plan.runs})
            (out / "runs").mkdir(parents=True, exist_ok=True)  # nothing ran: the report says so
            return ExecutionSummary()

    monkeypatch.setattr(engine, "make_executor", lambda *a, **k: Recorder())
    bench = tmp_path / "bench.yaml"
    bench.write_text(
        "tasks: [{path: 'synth:ct_organs'}]\nmethods: [none, simmim]\nbudgets: [2]\n"
        "data: {synth: {cases: 4, corpus_cases: 2, shape: [32, 32, 32], spacing: [4, 4, 4]}}\n"
        "preprocess: {spacing: [4, 4, 4]}\nencoder: {window_size: 4}\n"
        "pretrain: {crop_size: 32}\nfinetune: {crop_size: 32, n_test: 1, n_val: 1}\nlimits: {labels: 500}\n"
    )
    try:
        code, _, err = run_cli(
            ["--limit", "voxels_per_volume=1e8", "bench", bench, "--out", tmp_path / "out"], capsys, monkeypatch
        )
        assert limits().voxels_per_volume == 10**8  # the bench process itself (data preparation)
    finally:
        set_limits(None)
    assert code == 0, err
    kinds = {run_id.split("-")[0] for run_id in seen}
    assert kinds == {"pretrain", "finetune", "cka"}, seen
    for run_id, run_limits in seen.items():
        assert run_limits.voxels_per_volume == 10**8, run_id  # the command line's
        assert run_limits.labels == 500, run_id  # the bench YAML's, where the command line says nothing


def test_a_folder_of_scans_as_corpus_prints_the_exact_ingest_command(tmp_path, capsys, monkeypatch):
    import shlex

    from medssl.data.synth import synth_corpus

    monkeypatch.chdir(tmp_path)
    synth_corpus(tmp_path / "data" / "corpus", 2, shape=(32, 32, 32))
    args = ["pretrain", "--method", "simmim", "--corpus", "data/corpus", "--out", "r", "preprocess.spacing=[4,4,4]"]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 2
    line = one_error_line(err)
    assert "not an ingested corpus" in line and not (tmp_path / "r").exists()
    command = line.split("cache): ", 1)[1].split(" and pretrain with ", 1)[0]
    assert command == "medssl data ingest data/corpus --out data/corpus-ingested --set 'spacing=[4.0,4.0,4.0]'"
    code, out, err = run_cli(shlex.split(command)[1:], capsys, monkeypatch)  # the printed command works
    assert code == 0, err
    assert (tmp_path / "data" / "corpus-ingested" / "manifest.json").is_file()


def test_resampling_far_finer_than_the_scans_is_announced_before_work_starts(task, tmp_path, capsys, monkeypatch):
    import medssl.train.finetune

    def not_started(config, out):
        raise AssertionError("stop here: the warning must come before the run")

    monkeypatch.setattr(medssl.train.finetune, "run_finetune", not_started)
    # the task's phantoms are ~3 mm; the default spacing is 1.5 mm: ~8x the voxels
    code, _, err = run_cli(
        ["finetune", "--task", task, "--encoder", "none", "--out", tmp_path / "r", "schedule.steps=4"],
        capsys,
        monkeypatch,
    )
    assert code == 1 and "stop here" in err
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1, err
    factor = float(warning[0].split("gives ", 1)[1].split("x the voxels", 1)[0])
    assert 6.5 < factor < 9.5, warning
    assert "the cache of its 6 volumes takes about" in warning[0]
    assert "this 4-step fine-tune will be slow" in warning[0] and "preprocess.spacing=[" in warning[0]
    code, _, err = run_cli(
        [
            "finetune",
            "--task",
            task,
            "--encoder",
            "none",
            "--out",
            tmp_path / "r",
            "preprocess.spacing=[3,3,3]",
        ],
        capsys,
        monkeypatch,
    )
    assert "warning:" not in err  # at the scans' own spacing: nothing to say
