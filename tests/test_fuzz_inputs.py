"""Property-based: random bytes and random JSON/YAML structures given to every reader, to dataset.json
parsing and to config loading end in success or a ``MedsslInputError`` (exit 2), never in another
exception. Example counts are kept small so the file runs in well under 30 s."""

import contextlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medssl import cli
from medssl.config import BenchConfig, FinetuneConfig, PretrainConfig, load_config
from medssl.data.readers import read_volume
from medssl.data.tasks import check_task, load_task
from medssl.errors import MedsslInputError

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
SUFFIXES = [".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".inv3"]

# JSON-like values (what json.loads and yaml.safe_load give), nested a few levels
scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=30)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=25,
)

# Headers that look like the real formats, so the fuzzer gets past the magic bytes
PREFIXES = {
    ".nhdr": b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n",
    ".nrrd": b"NRRD0004\n",
    ".mhd": b"ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_SHORT\n",
    ".mha": b"ObjectType = Image\nNDims = 3\n",
}


def _tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(suffix=st.sampled_from(SUFFIXES), data=st.binary(max_size=600), label=st.booleans(), structured=st.booleans())
def test_readers_take_any_bytes(tmp_path_factory, suffix, data, label, structured):
    folder = _tmp(tmp_path_factory)
    path = folder / f"scan{suffix}"
    path.write_bytes((PREFIXES.get(suffix, b"") if structured else b"") + data)
    try:
        volume = read_volume(path, label=label)
    except MedsslInputError:
        return
    assert volume.array.ndim == 3


@FUZZ
@given(data=st.binary(max_size=400))
def test_dicom_folder_of_any_bytes(tmp_path_factory, data):
    folder = _tmp(tmp_path_factory) / "series"
    folder.mkdir()
    (folder / "slice.dcm").write_bytes(b"\0" * 128 + b"DICM" + data)
    with pytest.raises(MedsslInputError):
        read_volume(folder)


@pytest.fixture(scope="module")
def task_template(tmp_path_factory):
    from medssl.data.synth import synth_task

    return synth_task(tmp_path_factory.mktemp("task") / "t", "ct_organs", 2, seed=0, shape=(32, 32, 32))


@FUZZ
@given(
    content=json_values,
    patch=st.dictionaries(
        st.sampled_from(
            [
                "labels",
                "training",
                "modality",
                "channel_names",
                "name",
                "file_ending",
                "numTraining",
                "dataset",
                "regions_class_order",
            ]
        ),
        json_values,
        max_size=3,
    ),
)
def test_dataset_json_of_any_structure(tmp_path_factory, task_template, content, patch):
    root = shutil.copytree(task_template, _tmp(tmp_path_factory) / "task")
    base = json.loads((root / "dataset.json").read_text())
    data = {**base, **patch} if patch else content
    (root / "dataset.json").write_text(json.dumps(data, allow_nan=True))
    with contextlib.suppress(MedsslInputError):
        load_task(root)
    assert all(isinstance(line, str) for line in check_task(root, deep=False))


@FUZZ
@given(raw=st.binary(max_size=300))
def test_dataset_json_of_any_bytes(tmp_path_factory, task_template, raw):
    root = shutil.copytree(task_template, _tmp(tmp_path_factory) / "task")
    (root / "dataset.json").write_bytes(raw)
    with pytest.raises(MedsslInputError):
        load_task(root)


@FUZZ
@given(
    model=st.sampled_from([FinetuneConfig, PretrainConfig, BenchConfig]),
    content=json_values,
    as_bytes=st.binary(max_size=200),
    use_bytes=st.booleans(),
)
def test_config_loading_of_any_yaml(tmp_path_factory, model, content, as_bytes, use_bytes):
    path = _tmp(tmp_path_factory) / "config.yaml"
    if use_bytes:
        path.write_bytes(as_bytes)
    else:
        path.write_text(yaml.safe_dump(content, allow_unicode=True), encoding="utf-8")
    with contextlib.suppress(MedsslInputError):
        load_config(model, path)


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=st.binary(max_size=300), suffix=st.sampled_from(SUFFIXES))
def test_data_check_exits_0_or_2(tmp_path_factory, data, suffix):
    """The same through the CLI: exit code 0 or 2, never a traceback."""
    path = _tmp(tmp_path_factory) / f"scan{suffix}"
    path.write_bytes(data)
    argv = sys.argv
    sys.argv = ["medssl", "data", "check", str(path)]
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
    finally:
        sys.argv = argv
    assert exit_info.value.code in (0, 2)


def test_fuzzed_reader_accepts_a_real_volume(tmp_path):
    """The property above is not vacuous: a valid file does read."""
    import nibabel as nib

    path = tmp_path / "ok.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), path)
    assert read_volume(path).shape == (4, 4, 4)
