"""Issue 19's classes on ``medssl data convert``: each bad source exits 2 with one line naming the file,
and every output it writes passes ``data check``.

Item 3 symlinks out of the source, 4 an --out made from another source, 5 duplicate case ids, 6 channels
that modality does not declare, 11 a killed conversion, 14 malformed json paths and an --out that is a
file, 16 the json_bytes/labels/label_value limits. Hypothesis writes MSD dataset.json files (names,
labels, modalities, training lists) and the property is: exit 0 and a clean ``data check``, or exit 2
and one line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from medssl import cli
from medssl.data.convert.writer import MANIFEST, PARTIAL
from medssl.data.readers import write_nifti
from medssl.data.tasks import check_task
from medssl.limits import set_limits

SHAPE = (12, 12, 12)
AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])
PROPERTY = settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(autouse=True)
def default_limits():
    """`medssl --limit` sets the process's limits: put the defaults back around each test."""
    set_limits(None)
    yield
    set_limits(None)


def run_cli(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["medssl", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def refused(args, capsys, monkeypatch, *names) -> str:
    code, _, err = run_cli(args, capsys, monkeypatch)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def label_map(seed: int, values=(1, 2)) -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    rng = np.random.default_rng(seed)
    for value in values:
        x, y, z = rng.integers(0, 8, 3)
        label[x : x + 4, y : y + 4, z : z + 4] = value
    return label


def make_msd(root: Path, n: int = 2, channels: int = 1, extra: dict | None = None) -> Path:
    training = []
    for i in range(n):
        label = label_map(i)
        image = np.stack([label * 10.0 + c for c in range(channels)], -1) if channels > 1 else label * 10.0 - 5
        (root / "imagesTr").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(image.astype(np.float32), AFFINE), str(root / "imagesTr" / f"case_{i}.nii.gz"))
        write_nifti(root / "labelsTr" / f"case_{i}.nii.gz", label, AFFINE)
        training.append({"image": f"./imagesTr/case_{i}.nii.gz", "label": f"./labelsTr/case_{i}.nii.gz"})
    modality = {"0": "CT"} if channels == 1 else {str(c): f"T{1 + c % 2}" for c in range(channels)}
    data = {"name": "Demo", "modality": modality, "labels": {"0": "background", "1": "a", "2": "b"}}
    data["training"] = training
    (root / "dataset.json").write_text(json.dumps({**data, **(extra or {})}))
    return root


def convert(args, capsys, monkeypatch) -> str:
    code, out, err = run_cli(["data", "convert", *args], capsys, monkeypatch)
    assert code == 0, err
    return out


# --------------------------------------------------------------------------------------------- item 3


def test_symlinked_dataset_json_and_images_out_of_the_source_are_refused(tmp_path, capsys, monkeypatch):
    elsewhere = make_msd(tmp_path / "elsewhere")
    src = make_msd(tmp_path / "Task01_Demo")
    (src / "dataset.json").unlink()
    (src / "dataset.json").symlink_to(elsewhere / "dataset.json")
    refused(["data", "convert", "msd", src, "--out", tmp_path / "o"], capsys, monkeypatch, src / "dataset.json")
    assert not (tmp_path / "o").exists()
    src = make_msd(tmp_path / "Task02_Demo")
    image = src / "imagesTr/case_1.nii.gz"
    image.unlink()
    image.symlink_to(elsewhere / "imagesTr/case_1.nii.gz")
    line = refused(["data", "convert", "msd", src, "--out", tmp_path / "o2"], capsys, monkeypatch, image)
    assert "outside" in line


# --------------------------------------------------------------------------------------------- item 4


def test_an_out_made_from_another_source_is_refused_and_a_changed_source_redone(tmp_path, capsys, monkeypatch):
    first, second = make_msd(tmp_path / "first"), make_msd(tmp_path / "second", n=3)
    out = tmp_path / "out"
    convert(["msd", first, "--out", out], capsys, monkeypatch)
    line = refused(["data", "convert", "msd", second, "--out", out], capsys, monkeypatch, out / MANIFEST)
    assert "source" in line and str(second.resolve()) in line
    # the same source, one case's label edited and one case gone: redone and removed, not "already done"
    write_nifti(first / "labelsTr/case_1.nii.gz", label_map(7), AFFINE)
    data = json.loads((first / "dataset.json").read_text())
    data["training"] = data["training"][1:]
    (first / "dataset.json").write_text(json.dumps(data))
    printed = convert(["msd", first, "--out", out], capsys, monkeypatch)
    assert "removed case_0" in printed and "1 cases (1 converted, 0 already done)" in printed
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["case_1_0000.nii.gz"]
    np.testing.assert_array_equal(np.asarray(nib.load(out / "labelsTr/case_1.nii.gz").dataobj), label_map(7))
    assert check_task(out) == []
    printed = convert(["msd", first, "--out", out], capsys, monkeypatch)
    assert "1 cases (0 converted, 1 already done)" in printed


# --------------------------------------------------------------------------------------------- item 5


def test_duplicate_case_ids_name_both_files(tmp_path, capsys, monkeypatch):
    raw = tmp_path / "btcv/RawData/Training"
    for name, suffix in (("img0001", ".nii"), ("img0001", ".nii.gz"), ("img0002", ".nii.gz")):
        write_nifti(raw / "img" / f"{name}{suffix}", (label_map(1) * 10).astype(np.int16), AFFINE)
        write_nifti(raw / "label" / f"{name.replace('img', 'label')}{suffix}", label_map(1), AFFINE)
    refused(
        ["data", "convert", "btcv", tmp_path / "btcv", "--out", tmp_path / "o"],
        capsys,
        monkeypatch,
        raw / "img/img0001.nii",
        raw / "img/img0001.nii.gz",
    )
    src = make_msd(tmp_path / "Task01_Demo")
    data = json.loads((src / "dataset.json").read_text())
    data["training"].append(dict(data["training"][0]))
    (src / "dataset.json").write_text(json.dumps(data))
    line = refused(["data", "convert", "msd", src, "--out", tmp_path / "o"], capsys, monkeypatch, "case_0")
    assert "listed twice" in line
    # `data check` of such a task names both entries; a key twice in one json object is refused
    problems = check_task(src, deep=False)
    assert any("appears twice" in p and p.count("case_0.nii.gz") == 3 for p in problems), problems
    (src / "dataset.json").write_text('{"name": "x", "name": "y"}')
    assert "appears twice in one object" in check_task(src, deep=False)[0]


# --------------------------------------------------------------------------------------------- item 6


@pytest.mark.parametrize("held", [3, 5])
def test_msd_4d_channels_must_match_modality(tmp_path, capsys, monkeypatch, held):
    src = make_msd(tmp_path / "Task01_Demo", channels=4)
    image = src / "imagesTr/case_1.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((*SHAPE, held), np.float32), AFFINE), str(image))
    line = refused(["data", "convert", "msd", src, "--out", tmp_path / "o"], capsys, monkeypatch, image)
    assert f"holds {held} channel(s)" in line and "4 declared" in line
    assert any(str(image) in p and f"holds {held}" in p for p in check_task(src))


# --------------------------------------------------------------------------------------------- item 11


KILLED_CONVERT = textwrap.dedent(
    """
    import os, signal, sys
    from medssl.data.convert import convert_dataset, writer

    real, calls = writer.write_nifti, []

    def write_then_die(path, array, affine):
        calls.append(path)
        if len(calls) == int(sys.argv[3]):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(b"half a file")  # what a kill in the middle of nib.save leaves
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, array, affine)

    writer.write_nifti = write_then_die
    convert_dataset("msd", sys.argv[1], sys.argv[2])
    """
)


def nnunet_case_ids(folder: Path) -> set[str]:
    """nnU-Net v2's own listing (``get_identifiers_from_splitted_dataset_folder``): every file with the
    file ending, hidden or not, minus the ending and the ``_XXXX`` channel suffix."""
    return {name[: -len(".nii.gz") - 5] for name in os.listdir(folder) if name.endswith(".nii.gz")}


@pytest.mark.parametrize("kill_at", [1, 3, 4])
def test_a_killed_convert_leaves_nothing_nnunet_lists(tmp_path, capsys, monkeypatch, kill_at):
    src, out = make_msd(tmp_path / "Task01_Demo", n=3), tmp_path / "out"
    script = tmp_path / "killed.py"
    script.write_text(KILLED_CONVERT)
    done = subprocess.run([sys.executable, str(script), str(src), str(out), str(kill_at)], capture_output=True)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    assert list((out / PARTIAL).iterdir())  # the debris is there, not in imagesTr/labelsTr
    finished = set(json.loads((out / MANIFEST).read_text())["cases"])
    assert finished == {f"case_{i}" for i in range((kill_at - 1) // 2)}
    images, labels = out / "imagesTr", out / "labelsTr"
    listed = nnunet_case_ids(images) if images.is_dir() else set()
    labeled = {p.name[: -len(".nii.gz")] for p in labels.iterdir()} if labels.is_dir() else set()
    assert listed == labeled == finished  # nnU-Net lists exactly the finished cases, each with its label
    # an earlier medssl's temporary in imagesTr is swept too
    images.mkdir(exist_ok=True)
    (images / ".case_0_0000.nii.gz.k3j2l1.nii.gz").write_bytes(b"partial")
    printed = convert(["msd", src, "--out", out], capsys, monkeypatch)
    assert f"3 cases ({3 - len(finished)} converted, {len(finished)} already done)" in printed
    assert not (out / PARTIAL).exists()
    assert nnunet_case_ids(images) == {"case_0", "case_1", "case_2"}
    assert check_task(out) == []


# --------------------------------------------------------------------------------------------- item 14


def test_malformed_json_paths_and_an_out_that_is_a_file_exit_2(tmp_path, capsys, monkeypatch):
    src = make_msd(tmp_path / "Task01_Demo")
    listing = src / "dataset.json"
    good = listing.read_text()
    label = "./labelsTr/case_0.nii.gz"
    for bad in (
        good[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}",
        json.dumps({**json.loads(good), "training": [{"image": "./imagesTr/case_0\0.nii.gz", "label": label}]}),
        json.dumps({**json.loads(good), "training": [{"image": "./" + "a" * 5000, "label": label}]}),
        json.dumps({**json.loads(good), "training": [{"image": "./" + "/".join(["b" * 300] * 3), "label": label}]}),
    ):
        listing.write_text(bad)
        refused(["data", "convert", "msd", src, "--out", tmp_path / "o"], capsys, monkeypatch, listing)
    listing.write_text(good)
    (tmp_path / "file").write_text("mine")
    refused(["data", "convert", "msd", src, "--out", tmp_path / "file"], capsys, monkeypatch, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine"


# --------------------------------------------------------------------------------------------- item 16


def test_limits_apply_to_convert(tmp_path, capsys, monkeypatch):
    src = make_msd(tmp_path / "Task01_Demo")
    listing = src / "dataset.json"
    for limit, what in (
        ("json_bytes=100", "json_bytes"),
        ("labels=2", "limits.labels"),
        ("label_value=1", "label_value"),
    ):
        line = refused(
            ["--limit", limit, "data", "convert", "msd", src, "--out", tmp_path / "o"], capsys, monkeypatch, listing
        )
        assert what in line
    assert not (tmp_path / "o").exists()


GOOD = [
    {"image": "./imagesTr/case_0.nii.gz", "label": "./labelsTr/case_0.nii.gz"},
    {"image": "./imagesTr/case_1.nii.gz", "label": "./labelsTr/case_1.nii.gz"},
    {"image": "imagesTr/case_1.nii.gz", "label": "labelsTr/case_0.nii.gz"},
]
BAD = [
    {"image": "../outside.nii.gz", "label": "./labelsTr/case_1.nii.gz"},
    {"image": "./imagesTr/missing.nii.gz", "label": "./labelsTr/case_1.nii.gz"},
    {"image": 5, "label": None},
]


@st.composite
def msd_listings(draw):
    """dataset.json fields, each valid about half the time, so both outcomes are common."""
    names = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=0, max_size=12)
    extra_labels = st.dictionaries(st.sampled_from(["0", "3", "7", "x", "-1", "1"]), names | st.integers(), max_size=3)
    labels = {"0": "background", "1": "a", "2": "b"} | draw(st.just({}) | extra_labels)
    modality = draw(
        st.sampled_from([{"0": "CT"}, {"0": "MRI"}, {"0": "t2"}, {"0": "PET"}, {"0": "T2", "1": "ADC"}, {"1": "CT"}])
    )
    training = draw(st.lists(st.sampled_from(GOOD), min_size=1, max_size=2) | st.lists(st.sampled_from(GOOD + BAD)))
    name = draw(st.none() | st.just("Demo") | names)
    return {"labels": labels, "modality": modality, "training": training, **({"name": name} if name else {})}


@PROPERTY
@given(listing=msd_listings())
def test_convert_output_always_passes_data_check(tmp_path_factory, listing):
    root = tmp_path_factory.mktemp("msd")
    src = make_msd(root / "Task01_Demo", extra=listing)
    out = root / "out"
    argv = sys.argv
    sys.argv = ["medssl", "data", "convert", "msd", str(src), "--out", str(out)]
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
    finally:
        sys.argv = argv
    assert exit_info.value.code in (0, 2)
    event(f"exit {exit_info.value.code}")  # --hypothesis-show-statistics: both outcomes occur
    if exit_info.value.code == 0:
        assert check_task(out) == []
