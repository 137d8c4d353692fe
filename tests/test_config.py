"""Config loading: YAML, overrides, and one-line errors naming the key and the file."""

import pytest

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
    assert str(err.value) == f"{path}: schedule.stpes: unknown key"


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
