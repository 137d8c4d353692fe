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
    lines = [line for line in err.splitlines() if line.strip()]
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
