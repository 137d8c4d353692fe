"""Task folders (MSD and nnU-Net v2 layouts): loading, structural and deep checks, path escapes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medssl.data.readers import write_nifti
from medssl.data.tasks import (
    TaskFolder,
    check_corpus_folder,
    check_path,
    check_task,
    load_task,
)
from medssl.errors import MedsslInputError

SHAPE = (8, 8, 6)


def _affine(spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return affine


def _image(seed: int = 0, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _label(shape=SHAPE, values=(1, 2)) -> np.ndarray:
    label = np.zeros(shape, dtype=np.uint8)
    for n, value in enumerate(values):
        label[n, : shape[1] // 2, :] = value
    return label


def _make_msd(root: Path, n_cases: int = 3, modality: dict | None = None, **extra) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i in range(n_cases):
        write_nifti(root / "imagesTr" / f"organ_{i}.nii.gz", _image(i), _affine())
        write_nifti(root / "labelsTr" / f"organ_{i}.nii.gz", _label(), _affine())
        training.append({"image": f"./imagesTr/organ_{i}.nii.gz", "label": f"./labelsTr/organ_{i}.nii.gz"})
    dataset = {
        "name": "Organs",
        "modality": modality or {"0": "CT"},
        "labels": {"0": "background", "1": "liver", "2": "spleen"},
        "numTraining": n_cases,
        "training": training,
        **extra,
    }
    (root / "dataset.json").write_text(json.dumps(dataset))
    return root


def _make_nnunet(root: Path, n_cases: int = 3, channels: dict | None = None) -> Path:
    channels = channels or {"0": "T2"}
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(n_cases):
        for c in range(len(channels)):
            write_nifti(root / "imagesTr" / f"pat{i:03d}_{c:04d}.nii.gz", _image(10 * i + c), _affine())
        write_nifti(root / "labelsTr" / f"pat{i:03d}.nii.gz", _label(), _affine())
    dataset = {
        "channel_names": channels,
        "labels": {"background": 0, "kidney": 1, "tumour": 2},
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(dataset))
    return root


def _edit_json(root: Path, **changes) -> None:
    data = json.loads((root / "dataset.json").read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    (root / "dataset.json").write_text(json.dumps(data))


def _has(problems: list[str], path: Path, text: str) -> bool:
    return any(line.startswith(f"{path}:") and text in line for line in problems)


# ---------------------------------------------------------------------------------------------
# both layouts load


def test_msd_layout_loads(tmp_path: Path) -> None:
    root = _make_msd(tmp_path / "Task03_Organs")
    task = load_task(root)
    assert isinstance(task, TaskFolder)
    assert (task.name, task.modality, task.layout, task.file_ending) == ("Organs", "ct", "msd", ".nii.gz")
    assert task.labels == {0: "background", 1: "liver", 2: "spleen"}
    assert task.structures == {1: "liver", 2: "spleen"}
    assert task.n_classes == 3
    assert [c.case_id for c in task.cases] == ["organ_0", "organ_1", "organ_2"]
    first = task.cases[0]
    assert first.image == root / "imagesTr" / "organ_0.nii.gz" and first.images == [first.image]
    assert first.label == root / "labelsTr" / "organ_0.nii.gz"
    assert check_task(root) == []


def test_nnunet_layout_loads(tmp_path: Path) -> None:
    root = _make_nnunet(tmp_path / "Dataset007_Kidney")
    task = load_task(root)
    assert (task.name, task.modality, task.layout) == ("Dataset007_Kidney", "mri", "nnunet")
    assert task.labels == {0: "background", 1: "kidney", 2: "tumour"}
    assert [c.case_id for c in task.cases] == ["pat000", "pat001", "pat002"]
    assert task.cases[1].image == root / "imagesTr" / "pat001_0000.nii.gz"
    assert task.cases[1].label == root / "labelsTr" / "pat001.nii.gz"
    assert check_task(root) == []


def test_nnunet_multichannel_cases(tmp_path: Path) -> None:
    root = _make_nnunet(tmp_path / "Dataset005_Prostate", channels={"0": "T2", "1": "ADC"})
    task = load_task(root)
    assert task.n_channels == 2 and task.channel_names == ["T2", "ADC"] and not task.channels_in_one_file
    assert [p.name for p in task.cases[0].images] == ["pat000_0000.nii.gz", "pat000_0001.nii.gz"]
    assert check_task(root) == []
    (root / "imagesTr" / "pat002_0001.nii.gz").unlink()
    problems = check_task(root)
    assert _has(problems, root / "imagesTr", "case pat002 lacks channel file(s) 0001")
    assert _has(problems, root / "dataset.json", "numTraining is 3 but 2")


def test_msd_multichannel_4d_images(tmp_path: Path) -> None:
    root = _make_msd(tmp_path / "Task01_Brain", n_cases=2, modality={"0": "FLAIR", "1": "T1w"})
    for i in range(2):
        data = np.stack([_image(i), _image(i + 5)], axis=-1)
        nib.save(nib.Nifti1Image(data, _affine()), root / "imagesTr" / f"organ_{i}.nii.gz")
    task = load_task(root)
    assert task.modality == "mri" and task.channels_in_one_file
    assert check_task(root) == []


def test_nnunet_dataset_listing(tmp_path: Path) -> None:
    root = _make_nnunet(tmp_path / "Dataset009_Listed", n_cases=2)
    listing = {
        f"pat{i:03d}": {"images": [f"imagesTr/pat{i:03d}_0000.nii.gz"], "label": f"labelsTr/pat{i:03d}.nii.gz"}
        for i in range(2)
    }
    _edit_json(root, dataset=listing, numTraining=2)
    task = load_task(root)
    assert [c.case_id for c in task.cases] == ["pat000", "pat001"]
    listing["pat001"]["label"] = "../../etc/passwd"
    _edit_json(root, dataset=listing)
    with pytest.raises(MedsslInputError, match="outside the task folder"):
        load_task(root)


@pytest.mark.parametrize(
    ("name", "modality"),
    [
        ("CT", "ct"),
        ("ct", "ct"),
        ("MRI", "mri"),
        ("MR", "mri"),
        ("T1", "mri"),
        ("T2w", "mri"),
        ("FLAIR", "mri"),
        ("ADC", "mri"),
        ("t1gd", "mri"),
    ],
)
def test_modality_names(tmp_path: Path, name: str, modality: str) -> None:
    root = _make_msd(tmp_path / "t", n_cases=1, modality={"0": name})
    assert load_task(root).modality == modality


def test_unknown_or_mixed_modality_is_a_problem(tmp_path: Path) -> None:
    root = _make_msd(tmp_path / "pet", n_cases=1, modality={"0": "PET"})
    with pytest.raises(MedsslInputError, match="cannot tell CT from MRI"):
        load_task(root)
    _edit_json(root, modality={"0": "CT", "1": "T2"})
    with pytest.raises(MedsslInputError, match="mixes CT and MRI"):
        load_task(root)


# ---------------------------------------------------------------------------------------------
# structural problems: load_task raises on the first, check_task lists them all


def test_missing_dataset_json(tmp_path: Path) -> None:
    root = _make_msd(tmp_path / "t")
    (root / "dataset.json").unlink()
    with pytest.raises(MedsslInputError, match="missing") as info:
        load_task(root)
    assert str(root / "dataset.json") in str(info.value)
    assert check_task(root) == [f"{root / 'dataset.json'}: missing (a task folder needs dataset.json)"]


def test_malformed_json(tmp_path: Path) -> None:
    root = _make_msd(tmp_path / "t")
    (root / "dataset.json").write_text('{"labels": {"0": "background",}')
    with pytest.raises(MedsslInputError, match="malformed JSON.*line 1") as info:
        load_task(root)
    assert str(root / "dataset.json") in str(info.value)


@pytest.mark.parametrize(
    ("make", "drop", "message"),
    [
        (_make_msd, "labels", "missing required key 'labels'"),
        (_make_msd, "modality", "missing required key 'modality'"),
        (_make_msd, "training", "missing required key 'training'"),
        (_make_nnunet, "file_ending", "missing required key 'file_ending'"),
        (_make_nnunet, "numTraining", "missing required key 'numTraining'"),
    ],
)
def test_missing_required_keys(tmp_path: Path, make, drop: str, message: str) -> None:
    root = make(tmp_path / "t")
    _edit_json(root, **{drop: None})
    assert _has(check_task(root, deep=False), root / "dataset.json", message)
    with pytest.raises(MedsslInputError, match=message):
        load_task(root)


def test_bad_labels_mapping(tmp_path: Path) -> None:
    root = _make_nnunet(tmp_path / "t")
    _edit_json(root, labels={"background": 0, "kidney": 1, "kidney_again": 1})
    problems = check_task(root, deep=False)
    assert _has(problems, root / "dataset.json", "label value 1 is declared twice")
    # regions (nnU-Net: a list of more than one value) need their painting order
    _edit_json(root, labels={"background": 0, "kidney": 1, "whole": [1, 2]})
    problems = check_task(root, deep=False)
    assert _has(problems, root / "dataset.json", "region labels need 'regions_class_order'")


def test_empty_images_folder(tmp_path: Path) -> None:
    root = _make_nnunet(tmp_path / "t")
    for path in (root / "imagesTr").iterdir():
        path.unlink()
    problems = check_task(root)
    assert _has(problems, root / "imagesTr", "empty imagesTr folder")
    with pytest.raises(MedsslInputError, match="empty imagesTr"):
        load_task(root)


@pytest.mark.parametrize("make", [_make_msd, _make_nnunet])
def test_case_with_missing_label(tmp_path: Path, make) -> None:
    root = make(tmp_path / "t")
    label = sorted((root / "labelsTr").iterdir())[1]
    label.unlink()
    problems = check_task(root)
    assert len(problems) == 1 and _has(problems, label, "not found")
    with pytest.raises(MedsslInputError, match="not found") as info:
        load_task(root)
    assert str(label) in str(info.value)


def test_msd_entry_without_label_key(tmp_path: Path) -> None:
    root = _make_msd(tmp_path / "t")
    data = json.loads((root / "dataset.json").read_text())
    del data["training"][0]["label"]
    (root / "dataset.json").write_text(json.dumps(data))
    assert _has(check_task(root), root / "dataset.json", "training[0] (./imagesTr/organ_0.nii.gz) has no 'label'")


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ("../outside/evil.nii.gz", "resolves outside the task folder"),
        ("./imagesTr/../../outside/evil.nii.gz", "resolves outside the task folder"),
        ("/etc/passwd", "absolute path"),
    ],
)
def test_paths_escaping_the_task_are_rejected(tmp_path: Path, image: str, message: str) -> None:
    root = _make_msd(tmp_path / "t")
    (tmp_path / "outside").mkdir()
    write_nifti(tmp_path / "outside" / "evil.nii.gz", _image(), _affine())
    data = json.loads((root / "dataset.json").read_text())
    data["training"][1]["image"] = image
    (root / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(MedsslInputError, match=message):
        load_task(root)
    assert any(message in line for line in check_task(root))


def test_symlink_pointing_out_is_rejected(tmp_path: Path) -> None:
    for make in (_make_msd, _make_nnunet):
        root = make(tmp_path / make.__name__)
        outside = tmp_path / f"{make.__name__}_secret.nii.gz"
        write_nifti(outside, _image(), _affine())
        target = sorted((root / "imagesTr").iterdir())[0]
        target.unlink()
        os.symlink(outside, target)
        with pytest.raises(MedsslInputError, match="outside the task folder"):
            load_task(root)
    # a symlink that stays inside the folder is fine
    root = _make_msd(tmp_path / "inside")
    (root / "imagesTr" / "organ_0.nii.gz").rename(root / "store.nii.gz")
    os.symlink(root / "store.nii.gz", root / "imagesTr" / "organ_0.nii.gz")
    assert check_task(root) == []


# ---------------------------------------------------------------------------------------------
# deep checks: every problem in one go


def test_check_task_lists_every_content_problem(tmp_path: Path) -> None:
    root = _make_nnunet(tmp_path / "Dataset099_Broken", n_cases=9)
    images, labels = root / "imagesTr", root / "labelsTr"
    # 0: label shape differs
    write_nifti(labels / "pat000.nii.gz", _label(shape=(8, 8, 5)), _affine())
    # 1: label spacing differs
    write_nifti(labels / "pat001.nii.gz", _label(), _affine(spacing=(1.0, 1.0, 2.5)))
    # 2: label origin differs
    write_nifti(labels / "pat002.nii.gz", _label(), _affine(origin=(0.0, 5.0, 0.0)))
    # 3: undeclared label values
    write_nifti(labels / "pat003.nii.gz", _label(values=(1, 3, 7)), _affine())
    # 4: label not integer-valued
    fractional = _label().astype(np.float32)
    fractional[0, 0, 0] = 0.5
    write_nifti(labels / "pat004.nii.gz", fractional, _affine())
    # 5: NaN voxels in the image
    with_nan = _image()
    with_nan[1, 1, 1] = np.nan
    write_nifti(images / "pat005_0000.nii.gz", with_nan, _affine())
    # 6: truncated image
    data = (images / "pat006_0000.nii.gz").read_bytes()
    (images / "pat006_0000.nii.gz").write_bytes(data[: len(data) // 2])
    # 7: label flipped along i (same spacing and origin, different direction)
    flipped = _affine()
    flipped[0, 0] = -1.0
    write_nifti(labels / "pat007.nii.gz", _label(), flipped)
    # 8: label missing altogether
    (labels / "pat008.nii.gz").unlink()

    problems = check_task(root)
    expected = [
        (labels / "pat000.nii.gz", "label shape (8, 8, 5) differs from image shape (8, 8, 6)"),
        (labels / "pat001.nii.gz", "label spacing (1, 1, 2.5) differs from image spacing (1, 1, 2)"),
        (labels / "pat002.nii.gz", "label origin"),
        (labels / "pat003.nii.gz", "label values not declared in dataset.json: 3, 7"),
        (labels / "pat004.nii.gz", "not integer-valued"),
        (images / "pat005_0000.nii.gz", "contains 1 NaN/inf voxels"),
        (images / "pat006_0000.nii.gz", "truncated"),
        (labels / "pat007.nii.gz", "orientation"),
        (labels / "pat008.nii.gz", "not found"),
    ]
    for path, text in expected:
        assert _has(problems, path, text), f"{path.name}: {text!r} not in {problems}"
    assert len(problems) == len(expected), problems
    assert all("\n" not in line for line in problems)
    # a shallow check reads no voxels: only the missing label remains
    assert check_task(root, deep=False) == [f"{labels / 'pat008.nii.gz'}: label of case pat008 not found"]


def test_small_spacing_differences_are_tolerated(tmp_path: Path) -> None:
    root = _make_msd(tmp_path / "t", n_cases=1)
    write_nifti(root / "labelsTr" / "organ_0.nii.gz", _label(), _affine(spacing=(1.0004, 1.0, 2.0)))
    assert check_task(root) == []


def test_nnunet_file_without_channel_suffix(tmp_path: Path) -> None:
    root = _make_nnunet(tmp_path / "t", n_cases=2)
    (root / "imagesTr" / "pat001_0000.nii.gz").rename(root / "imagesTr" / "pat001.nii.gz")
    problems = check_task(root)
    assert _has(problems, root / "imagesTr" / "pat001.nii.gz", "lacks the _XXXX channel suffix")


# ---------------------------------------------------------------------------------------------
# unlabeled corpus folders and the `data check` dispatcher


def test_check_corpus_folder(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    assert len(check_corpus_folder(corpus)) == 1 and "no volumes found" in check_corpus_folder(corpus)[0]
    write_nifti(corpus / "good.nii.gz", _image(), _affine())
    assert check_corpus_folder(corpus) == []
    bad = _image()
    bad[0, 0, :3] = np.inf
    write_nifti(corpus / "sub" / "inf.nii.gz", bad, _affine())
    (corpus / "broken.nrrd").write_text("garbage")
    problems = check_corpus_folder(corpus)
    assert len(problems) == 2
    assert _has(problems, corpus / "sub" / "inf.nii.gz", "contains 3 NaN/inf voxels")
    assert _has(problems, corpus / "broken.nrrd", "unreadable")
    assert "not found" in check_corpus_folder(tmp_path / "absent")[0]


def test_check_path_dispatch(tmp_path: Path) -> None:
    root = _make_msd(tmp_path / "task", n_cases=1)
    assert check_path(root) == []
    write_nifti(root / "labelsTr" / "organ_0.nii.gz", _label(values=(5,)), _affine())
    assert _has(check_path(root), root / "labelsTr" / "organ_0.nii.gz", "not declared")
    assert check_path(root / "imagesTr" / "organ_0.nii.gz") == []
    (tmp_path / "notes.txt").write_text("x")
    assert "not a volume file" in check_path(tmp_path / "notes.txt")[0]
    assert check_path(root / "imagesTr") == []  # a folder of scans
