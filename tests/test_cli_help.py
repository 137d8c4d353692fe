"""What a new user meets first: --version, the defaults of every config, and help for every option."""

from __future__ import annotations

import re

import pytest
import typer
import yaml
from typer.testing import CliRunner

from medssl import __version__, cli
from medssl.config import BenchConfig, FinetuneConfig, PretrainConfig, config_hash

WIDE = {"COLUMNS": "220", "TERMINAL_WIDTH": "220", "NO_COLOR": "1"}


def _commands(group, prefix=()):
    """(path, click command) for every command and group of the app."""
    yield prefix, group
    for name, command in getattr(group, "commands", {}).items():
        yield from _commands(command, (*prefix, name))


def _invoke(*args):
    result = CliRunner().invoke(cli.app, list(args), env=WIDE)
    return result.exit_code, result.output


def test_every_option_and_argument_has_a_help_text():
    missing = []
    for path, command in _commands(typer.main.get_command(cli.app)):
        for param in command.params:
            if not (getattr(param, "help", None) or "").strip():
                missing.append(f"medssl {' '.join(path)} {param.opts[0] if param.opts else param.name}")
    assert not missing, f"options without a help text: {missing}"


def test_help_shows_no_bool_type_on_flags_and_keeps_square_brackets():
    paths = [path for path, _ in _commands(typer.main.get_command(cli.app))]
    assert ("finetune",) in paths and ("config", "show") in paths
    for path in paths:
        code, output = _invoke(*path, "--help")
        assert code == 0, output
        assert "<bool>" not in output, f"medssl {' '.join(path)} --help:\n{output}"
    _, ingest = _invoke("data", "ingest", "--help")
    assert "pip install 'medssl[blosc2]'" in ingest, ingest


def test_finetune_encoder_help_names_the_foreign_layouts():
    _, output = _invoke("finetune", "--help")
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())
    for name in ("MONAI SwinUNETR", "model_swinvit.pt", "research-contributions", "random init"):
        assert name in text, text


def test_version_prints_the_package_version():
    code, output = _invoke("--version")
    assert code == 0 and output.startswith(f"medssl {__version__}")


@pytest.mark.parametrize(
    ("kind", "model", "default"),
    [
        ("pretrain", PretrainConfig, PretrainConfig()),
        ("finetune", FinetuneConfig, FinetuneConfig()),
        ("bench", None, None),
    ],
)
def test_config_show_prints_every_default_as_yaml_that_loads_back(kind, model, default):
    code, output = _invoke("config", "show", kind)
    assert code == 0, output
    assert output.startswith("# medssl ")
    data = yaml.safe_load(output)
    if model is not None:
        loaded = model.model_validate(data)
        assert config_hash(loaded) == config_hash(default)
        assert set(data) == set(type(default).model_fields)  # every field, none invented
        assert data["schedule"]["batch_size"] == default.schedule.batch_size
    else:
        bench = BenchConfig.model_validate(data)
        assert bench.tasks[0].path == "synth:ct_organs" and data["data"]["synth"]["cases"] == 12
    assert data["encoder"]["feature_size"] is None  # from the preset: a changed preset changes the size


def test_config_show_refuses_an_unknown_kind():
    code, output = _invoke("config", "show", "pretrian")
    assert code == 2 and "pretrian" in output
