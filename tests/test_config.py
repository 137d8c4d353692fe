"""Config loading: YAML, overrides, and one-line errors naming the key and the file."""

import sys

import pytest

from medssl import cli
from medssl.config import FinetuneConfig, PretrainConfig, apply_overrides, config_hash, load_config
from medssl.errors import ConfigError


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("method: {name: simmim, options: {mask_ratio: 0.5}}\nschedule: {steps: 10}\n")
    cfg = load_config(PretrainConfig, path, ["schedule.lr=0.001", "encoder.preset=base", "crop_size=96"])
    assert cfg.method.options == {"mask_ratio": 0.5}
    assert cfg.schedule.steps == 10 and cfg.schedule.lr == 0.001
    assert cfg.encoder.feature_size == 48 and cfg.crop_size == 96


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("schedule: {stpes: 10}\n")
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, path)
    assert str(err.value) == f"{path}: schedule.stpes: unknown key; did you mean schedule.steps?"


def test_wrong_type_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("budget: lots\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: budget"):
        load_config(FinetuneConfig, path)
    with pytest.raises(ConfigError, match="crop_size"):
        load_config(FinetuneConfig, None, ["crop_size=40"])


def test_malformed_yaml_and_override(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(PretrainConfig, path)
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides({}, ["schedule.steps"])


def test_config_hash_is_stable_and_sensitive():
    a, b = PretrainConfig(), PretrainConfig()
    assert config_hash(a) == config_hash(b)
    b.schedule.steps = 1
    assert config_hash(a) != config_hash(b)


# --------------------------------------------------------------------------- errors through the CLI


def run_cli(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["medssl", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return exit_info.value.code, [line for line in err.splitlines() if line.strip()]


def test_an_unknown_key_suggests_the_nearest_valid_dotted_key(tmp_path, capsys, monkeypatch):
    args = ["finetune", "--task", tmp_path, "--encoder", "none", "--out", tmp_path / "r"]
    code, lines = run_cli([*args, "schedule.lrr=0.1"], capsys, monkeypatch)
    assert code == 2 and lines == ["error: <command line>: schedule.lrr: unknown key; did you mean schedule.lr?"]
    code, lines = run_cli([*args, "lr=0.1"], capsys, monkeypatch)  # a key of a section, given at the top
    assert code == 2 and lines == ["error: <command line>: lr: unknown key; did you mean schedule.lr?"]
    bench = tmp_path / "bench.yaml"
    bench.write_text("tasks: [{path: 'synth:ct_organs'}]\nfinetune: {schedule: {stesp: 3}}\n")
    code, lines = run_cli(["bench", bench, "--out", tmp_path / "b", "--dry-run"], capsys, monkeypatch)
    assert code == 2
    assert lines == [f"error: {bench}: finetune.schedule.stesp: unknown key; did you mean finetune.schedule.steps?"]
    assert not (tmp_path / "r").exists() and not (tmp_path / "b").exists()  # refused before anything is written


def test_a_type_error_in_a_bench_yaml_is_one_line_per_field(tmp_path, capsys, monkeypatch):
    bench = tmp_path / "bench.yaml"
    bench.write_text("tasks: [{path: 'synth:ct_organs'}]\nmethods: 3\n")
    code, lines = run_cli(["bench", bench, "--out", tmp_path / "b", "--dry-run"], capsys, monkeypatch)
    assert code == 2
    assert lines == [f"error: {bench}: methods: expected 'all' or a list of (text or a mapping), given 3"]
    # two bad fields, two lines; an item of a list is named by its index; no union member's name
    bench.write_text(
        "tasks: [{path: 'synth:ct_organs'}]\nmethods: [simclr, 3]\ndata: {corpus: 5}\nseeds: [zero]\nbudgets: [few]\n"
    )
    code, lines = run_cli(["bench", bench, "--out", tmp_path / "b", "--dry-run"], capsys, monkeypatch)
    assert code == 2
    assert lines == [
        f"error: {bench}: data.corpus: expected 'synth' or a list of (a path), given 5",
        f"error: {bench}: methods.1: expected text or a mapping, given 3",
        f"error: {bench}: budgets.0: unknown label budget 'few' (a positive number of cases or 'all')",
        f"error: {bench}: seeds.0: Input should be a valid integer, unable to parse string as an integer "
        "(given 'zero')",
    ]
    bench.write_text("tasks: [{path: 'synth:ct_organs'}]\nmethods: [simclr, {nme: dino}]\n")
    code, lines = run_cli(["bench", bench, "--out", tmp_path / "b", "--dry-run"], capsys, monkeypatch)
    assert code == 2 and lines == [f"error: {bench}: methods.1.nme: unknown key; did you mean methods.1.name?"]
