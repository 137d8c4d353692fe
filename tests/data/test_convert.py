"""``medssl data convert``: each public dataset's documented layout, fabricated at 20³, converted into the
nnU-Net v2 raw layout, then checked clean by ``data check`` and compared voxel by voxel with its source."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medssl import cli
from medssl.data.convert import brats, btcv, hanseg
from medssl.data.convert.writer import MANIFEST
from medssl.data.readers import write_nifti
from medssl.data.tasks import check_task, load_task

SHAPE = (20, 20, 20)
AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])


def run_cli(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["medssl", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def blocks(values, seed: int = 0, shape=SHAPE) -> np.ndarray:
    """A label map holding each value in ``values`` as a small cube at a seeded position."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, dtype=np.uint8)
    for value in values:
        x, y, z = rng.integers(0, np.array(shape) - 4)
        label[x : x + 4, y : y + 4, z : z + 4] = value
    return label


def ct_like(label: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 20, label.shape) + 40.0 * label - 100).round().astype(np.int16)


def read(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def converted(out: Path) -> dict:
    assert check_task(out) == [], check_task(out)
    task = load_task(out)
    assert task.layout == "nnunet"
    return json.loads((out / "dataset.json").read_text())


def convert(args, capsys, monkeypatch) -> str:
    code, out, err = run_cli(["data", "convert", *args], capsys, monkeypatch)
    assert code == 0, err
    return out


# --------------------------------------------------------------------------------------------- BTCV


def make_btcv(root: Path, n: int = 2) -> dict[str, np.ndarray]:
    labels = {}
    for i in range(1, n + 1):
        label = blocks(range(1, 14), seed=i)
        write_nifti(root / "RawData/Training/img" / f"img{i:04d}.nii.gz", ct_like(label, i), AFFINE)
        write_nifti(root / "RawData/Training/label" / f"label{i:04d}.nii.gz", label, AFFINE)
        labels[f"btcv_{i:04d}"] = label
    (root / "RawData/Testing/img").mkdir(parents=True)
    return labels


def test_btcv_converts_with_swinunetr_label_names(tmp_path, capsys, monkeypatch):
    labels = make_btcv(tmp_path / "btcv")
    out = tmp_path / "Dataset001_BTCV"
    printed = convert(["btcv", tmp_path / "btcv", "--out", out], capsys, monkeypatch)
    assert "2 cases (2 converted, 0 already done)" in printed
    dataset = converted(out)
    code, printed, _ = run_cli(["data", "check", out], capsys, monkeypatch)
    assert code == 0 and printed.strip() == f"ok: {out}"
    assert dataset["labels"] == btcv.LABELS and dataset["labels"]["IVC"] == 9 and dataset["labels"]["lad"] == 13
    assert dataset["channel_names"] == {"0": "CT"} and dataset["numTraining"] == 2
    assert dataset["file_ending"] == ".nii.gz"
    for case, label in labels.items():
        np.testing.assert_array_equal(read(out / "labelsTr" / f"{case}.nii.gz"), label)
        image = nib.load(str(out / "imagesTr" / f"{case}_0000.nii.gz"))
        assert image.get_data_dtype() == np.int16 and np.allclose(image.affine, AFFINE)


def test_conversion_resumes_and_redoes_only_incomplete_cases(tmp_path, capsys, monkeypatch):
    make_btcv(tmp_path / "btcv", n=3)
    out = tmp_path / "out"
    convert(["btcv", tmp_path / "btcv", "--out", out], capsys, monkeypatch)
    kept = out / "imagesTr/btcv_0001_0000.nii.gz"
    mtime = kept.stat().st_mtime_ns
    # A case cut short (a truncated file) and a case never recorded (killed before the manifest write).
    (out / "labelsTr/btcv_0002.nii.gz").write_bytes(b"")
    manifest = json.loads((out / MANIFEST).read_text())
    del manifest["cases"]["btcv_0003"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    printed = convert(["btcv", tmp_path / "btcv", "--out", out], capsys, monkeypatch)
    assert "3 cases (2 converted, 1 already done)" in printed
    assert kept.stat().st_mtime_ns == mtime
    converted(out)
    # The same folder cannot be reused for another dataset.
    make_btcv(tmp_path / "kits_wrong", n=1)
    code, _, err = run_cli(["data", "convert", "kits", tmp_path / "kits_wrong", "--out", out], capsys, monkeypatch)
    assert code == 2


def test_bad_input_exits_2_naming_the_file(tmp_path, capsys, monkeypatch):
    make_btcv(tmp_path / "btcv")
    missing = tmp_path / "btcv/RawData/Training/label/label0002.nii.gz"
    missing.unlink()
    code, _, err = run_cli(["data", "convert", "btcv", tmp_path / "btcv", "--out", tmp_path / "o"], capsys, monkeypatch)
    assert code == 2 and str(missing) in one_error_line(err)
    # A label value outside the 13 organs.
    write_nifti(missing, blocks([1, 14]), AFFINE)
    code, _, err = run_cli(["data", "convert", "btcv", tmp_path / "btcv", "--out", tmp_path / "o"], capsys, monkeypatch)
    assert code == 2 and "label0002.nii.gz" in one_error_line(err) and "14" in err
    # A label on another grid.
    write_nifti(missing, blocks([1], shape=(20, 20, 18)), AFFINE)
    code, _, err = run_cli(["data", "convert", "btcv", tmp_path / "btcv", "--out", tmp_path / "o"], capsys, monkeypatch)
    assert code == 2 and "label0002.nii.gz" in one_error_line(err) and "shape" in err
    code, _, err = run_cli(
        ["data", "convert", "nosuch", tmp_path / "btcv", "--out", tmp_path / "o"], capsys, monkeypatch
    )
    assert code == 2 and "nosuch" in one_error_line(err)
    code, _, err = run_cli(
        ["data", "convert", "btcv", tmp_path / "btcv", "--out", tmp_path / "btcv/out"], capsys, monkeypatch
    )
    assert code == 2 and "outside the source" in one_error_line(err)


# --------------------------------------------------------------------------------------------- AMOS

AMOS_LABELS = {
    "0": "background",
    "1": "spleen",
    "2": "right kidney",
    "3": "left kidney",
    "4": "gall bladder",
    "5": "esophagus",
    "6": "liver",
    "7": "stomach",
    "8": "arota",
    "9": "postcava",
    "10": "pancreas",
    "11": "right adrenal gland",
    "12": "left adrenal gland",
    "13": "duodenum",
    "14": "bladder",
    "15": "prostate/uterus",
}


def make_amos(root: Path, ids=(1, 2, 508)) -> None:
    training = []
    for i in ids:
        label = blocks(range(1, 16), seed=i)
        image = ct_like(label, i) if i <= 500 else (label * 50 + 100).astype(np.int16)
        write_nifti(root / "imagesTr" / f"amos_{i:04d}.nii.gz", image, AFFINE)
        write_nifti(root / "labelsTr" / f"amos_{i:04d}.nii.gz", label, AFFINE)
        training.append({"image": f"./imagesTr/amos_{i:04d}.nii.gz", "label": f"./labelsTr/amos_{i:04d}.nii.gz"})
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "name": "AMOS",
                "modality": {"0": "CT"},
                "labels": AMOS_LABELS,
                "numTraining": len(ids),
                "training": training,
                "validation": [],
                "test": [],
            }
        )
    )


def test_amos_splits_ct_and_mri_ids(tmp_path, capsys, monkeypatch):
    make_amos(tmp_path / "amos22")
    convert(["amos", tmp_path / "amos22", "--out", tmp_path / "ct", "--modality", "ct"], capsys, monkeypatch)
    convert(["amos", tmp_path / "amos22", "--out", tmp_path / "mri", "--modality", "mri"], capsys, monkeypatch)
    ct, mri = converted(tmp_path / "ct"), converted(tmp_path / "mri")
    assert ct["channel_names"] == {"0": "CT"} and ct["numTraining"] == 2
    assert mri["channel_names"] == {"0": "MRI"} and mri["numTraining"] == 1
    assert load_task(tmp_path / "mri").modality == "mri" and load_task(tmp_path / "ct").modality == "ct"
    assert sorted(p.name for p in (tmp_path / "mri/labelsTr").iterdir()) == ["amos_0508.nii.gz"]
    assert ct["labels"] == {name: int(value) for value, name in AMOS_LABELS.items()}
    code, _, err = run_cli(
        ["data", "convert", "btcv", tmp_path / "amos22", "--out", tmp_path / "x", "--modality", "ct"],
        capsys,
        monkeypatch,
    )
    assert code == 2 and "--modality" in one_error_line(err)


def test_amos_paths_may_not_leave_the_dataset(tmp_path, capsys, monkeypatch):
    make_amos(tmp_path / "amos22", ids=(1,))
    write_nifti(tmp_path / "amos_0009.nii.gz", blocks([1]), AFFINE)
    listing = tmp_path / "amos22/dataset.json"
    data = json.loads(listing.read_text())
    data["training"].append({"image": "../amos_0009.nii.gz", "label": "./labelsTr/amos_0001.nii.gz"})
    listing.write_text(json.dumps(data))
    code, _, err = run_cli(
        ["data", "convert", "amos", tmp_path / "amos22", "--out", tmp_path / "o"], capsys, monkeypatch
    )
    assert code == 2 and "outside the dataset folder" in one_error_line(err) and "dataset.json" in err
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------- KiTS


def make_kits(root: Path, n: int, cyst: bool) -> None:
    for i in range(n):
        case = root / f"case_{i:05d}"
        label = np.zeros(SHAPE, dtype=np.uint8)
        label[3:13, 4:14, 4:14] = 1  # a kidney with a tumour (and a cyst) inside
        label[5:9, 6:10, 6:10] = 2
        if cyst and i % 2:
            label[10:12, 10:12, 10:12] = 3
        write_nifti(case / "imaging.nii.gz", ct_like(label, i), AFFINE)
        write_nifti(case / "segmentation.nii.gz", label, AFFINE)
    write_nifti(root / f"case_{n:05d}" / "imaging.nii.gz", np.zeros(SHAPE, np.int16), AFFINE)  # unlabeled test


def test_kits19_and_kits23_labels(tmp_path, capsys, monkeypatch):
    make_kits(tmp_path / "kits19/data", 2, cyst=False)
    printed = convert(
        ["kits", tmp_path / "kits19", "--out", tmp_path / "k19", "--labels", "plain"], capsys, monkeypatch
    )
    assert "skipped case_00002" in printed
    assert converted(tmp_path / "k19")["labels"] == {"background": 0, "kidney": 1, "tumor": 2}
    make_kits(tmp_path / "kits23/dataset", 2, cyst=True)
    convert(["kits", tmp_path / "kits23/dataset", "--out", tmp_path / "k23", "--labels", "plain"], capsys, monkeypatch)
    dataset = converted(tmp_path / "k23")
    assert dataset["labels"] == {"background": 0, "kidney": 1, "tumor": 2, "cyst": 3}
    assert dataset["numTraining"] == 2
    assert set(np.unique(read(tmp_path / "k23/labelsTr/case_00001.nii.gz"))) == {0, 1, 2, 3}


def test_kits_regions_as_nnunet_dataset220(tmp_path, capsys, monkeypatch):
    """The default: nnU-Net's Dataset220_KiTS2023 regions; without any cyst (KiTS19) masses would repeat
    tumor, so it goes with its painting value 3."""
    make_kits(tmp_path / "kits23/dataset", 2, cyst=True)
    convert(["kits", tmp_path / "kits23/dataset", "--out", tmp_path / "k23"], capsys, monkeypatch)
    dataset = converted(tmp_path / "k23")
    assert dataset["labels"] == {"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": [2]}
    assert dataset["regions_class_order"] == [1, 3, 2]
    task = load_task(tmp_path / "k23")
    assert task.regions is not None and task.n_outputs == 3
    assert task.structures == {1: "kidney", 2: "masses", 3: "tumor"} and set(task.labels) == {0, 1, 2, 3}
    np.testing.assert_array_equal(  # the label maps are copied as they are
        read(tmp_path / "k23/labelsTr/case_00001.nii.gz"),
        read(tmp_path / "kits23/dataset/case_00001/segmentation.nii.gz"),
    )
    make_kits(tmp_path / "kits19/data", 2, cyst=False)
    convert(["kits", tmp_path / "kits19", "--out", tmp_path / "k19"], capsys, monkeypatch)
    dataset = converted(tmp_path / "k19")
    assert dataset["labels"] == {"background": 0, "kidney": [1, 2], "tumor": [2]}
    assert dataset["regions_class_order"] == [1, 2]
    code, _, err = run_cli(
        ["data", "convert", "btcv", tmp_path / "kits19", "--out", tmp_path / "x", "--labels", "plain"],
        capsys,
        monkeypatch,
    )
    assert code == 2 and "--labels applies to brats, kits only" in one_error_line(err)


@pytest.mark.slow
def test_converted_kits_replica_fine_tunes(tmp_path, capsys, monkeypatch):
    make_kits(tmp_path / "kits", 4, cyst=True)
    convert(["kits", tmp_path / "kits", "--out", tmp_path / "task"], capsys, monkeypatch)  # regions
    code, out, err = run_cli(
        [
            "finetune",
            "--task",
            tmp_path / "task",
            "--encoder",
            "none",
            "--budget",
            "2",
            "--out",
            tmp_path / "run",
            "encoder.preset=tiny",
            "encoder.window_size=4",
            "crop_size=32",
            "n_test=1",
            "n_val=1",
            "val_every=2",
            "schedule.steps=2",
            "schedule.batch_size=1",
            "schedule.warmup_steps=0",
        ],
        capsys,
        monkeypatch,
    )
    assert code == 0, err
    results = json.loads((tmp_path / "run/results.json").read_text())
    assert results["n_train"] == 2
    # region-aware training: a sigmoid per region, Dice per region
    assert results["labels"] == {"1": "kidney", "2": "masses", "3": "tumor"}
    assert results["regions"]["regions_class_order"] == [1, 3, 2]
    assert {row["structure"] for row in results["cases"]} == {"kidney", "masses", "tumor"}
    assert all(0.0 <= row["dice"] <= 1.0 for row in results["cases"])
    meta = torch.load(tmp_path / "run" / results["model"], weights_only=True)["meta"]
    assert meta["out_channels"] == 3 and meta["regions"] == results["regions"]


# --------------------------------------------------------------------------------------------- BraTS


def make_brats(root: Path, n: int = 2) -> dict[str, np.ndarray]:
    segs = {}
    for i in range(n):
        case = f"BraTS2021_{i:05d}"
        seg = blocks([1, 2, 4], seed=i)
        for offset, sequence in enumerate(brats.SEQUENCES, start=1):
            write_nifti(root / case / f"{case}_{sequence}.nii.gz", seg.astype(np.int16) + 100 * offset, AFFINE)
        write_nifti(root / case / f"{case}_seg.nii.gz", seg, AFFINE)
        segs[case] = seg
    return segs


def test_brats_channel_order_and_label_remap_as_nnunet(tmp_path, capsys, monkeypatch):
    segs = make_brats(tmp_path / "BraTS2021_Training_Data")
    out = tmp_path / "Dataset137_BraTS2021"
    convert(["brats", tmp_path / "BraTS2021_Training_Data", "--out", out], capsys, monkeypatch)
    dataset = converted(out)
    assert dataset["channel_names"] == {"0": "T1", "1": "T1ce", "2": "T2", "3": "Flair"}
    # the regions of nnU-Net's Dataset137_BraTS21
    assert dataset["labels"] == {
        "background": 0,
        "whole tumor": [1, 2, 3],
        "tumor core": [2, 3],
        "enhancing tumor": [3],
    }
    assert dataset["regions_class_order"] == [1, 2, 3]
    for case, seg in segs.items():
        for channel in range(4):  # t1 was written at +100, t1ce +200, t2 +300, flair +400
            np.testing.assert_array_equal(
                read(out / "imagesTr" / f"{case}_{channel:04d}.nii.gz"), seg.astype(np.int16) + 100 * (channel + 1)
            )
        label = read(out / "labelsTr" / f"{case}.nii.gz")
        for old, new in {0: 0, 1: 2, 2: 1, 4: 3}.items():
            assert np.all(label[seg == old] == new)
    plain = tmp_path / "plain"
    convert(["brats", tmp_path / "BraTS2021_Training_Data", "--out", plain, "--labels", "plain"], capsys, monkeypatch)
    assert converted(plain)["labels"] == {"background": 0, "edema": 1, "necrotic_core": 2, "enhancing_tumor": 3}
    for case in segs:
        np.testing.assert_array_equal(
            read(plain / "labelsTr" / f"{case}.nii.gz"), read(out / "labelsTr" / f"{case}.nii.gz")
        )
    bad = tmp_path / "BraTS2021_Training_Data/BraTS2021_00001/BraTS2021_00001_seg.nii.gz"
    write_nifti(bad, blocks([3]), AFFINE)
    code, _, err = run_cli(
        ["data", "convert", "brats", tmp_path / "BraTS2021_Training_Data", "--out", tmp_path / "o"], capsys, monkeypatch
    )
    assert code == 2 and str(bad) in one_error_line(err) and "[3]" in err


# --------------------------------------------------------------------------------------------- HaN-Seg


def write_nrrd(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0)) -> None:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))  # (i, j, k) → ITK (k, j, i)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)


def test_hanseg_masks_merge_with_the_smaller_structure_winning(tmp_path, capsys, monkeypatch):
    case = tmp_path / "HaN-Seg/set_1/case_01"
    write_nrrd(case / "case_01_IMG_CT.nrrd", np.full(SHAPE, -50, np.int16))
    write_nrrd(case / "case_01_IMG_MR_T1.nrrd", np.zeros((12, 12, 12), np.int16), spacing=(2.0, 2.0, 2.0))
    oral = np.zeros(SHAPE, np.uint8)
    oral[2:14, 2:14, 2:14] = 1
    chiasm = np.zeros(SHAPE, np.uint8)
    chiasm[10:16, 10:12, 10:12] = 1  # overlaps the oral cavity on 4*2*2 voxels
    write_nrrd(case / "case_01_OAR_Cavity_Oral.seg.nrrd", oral)
    write_nrrd(case / "case_01_OAR_OpticChiasm.seg.nrrd", chiasm)
    cord = np.ones((4, 4, 6), np.uint8)  # a segment cropped to its extent: origin at voxel (15, 15, 12)
    write_nrrd(case / "case_01_OAR_SpinalCord.seg.nrrd", cord, origin=(15.0, 15.0, 24.0))
    out = tmp_path / "hanseg"
    convert(["hanseg", tmp_path / "HaN-Seg", "--out", out], capsys, monkeypatch)
    dataset = converted(out)
    assert dataset["labels"] == hanseg.LABELS and len(dataset["labels"]) == 31
    assert dataset["channel_names"] == {"0": "CT"}
    label = read(out / "labelsTr/case_01.nii.gz")
    chiasm_value, oral_value, cord_value = (hanseg.LABELS[n] for n in ("OpticChiasm", "Cavity_Oral", "SpinalCord"))
    assert np.all(label[chiasm.astype(bool)] == chiasm_value)
    assert np.count_nonzero(label == oral_value) == oral.sum() - 16
    assert np.count_nonzero(label == cord_value) == 4 * 4 * 6 and np.all(label[15:19, 15:19, 12:18] == cord_value)
    assert json.loads((out / MANIFEST).read_text())["cases"]["case_01"]["notes"]["overlap_voxels"] == 16
    write_nrrd(case / "case_01_OAR_Nosuch.seg.nrrd", chiasm)
    code, _, err = run_cli(
        ["data", "convert", "hanseg", tmp_path / "HaN-Seg", "--out", tmp_path / "o"], capsys, monkeypatch
    )
    assert code == 2 and "case_01_OAR_Nosuch.seg.nrrd" in one_error_line(err)


# --------------------------------------------------------------------------------------------- MSD


def test_msd_4d_images_split_into_channels(tmp_path, capsys, monkeypatch):
    root = tmp_path / "Task01_BrainTumour"
    training = []
    images = {}
    for i in (1, 2):
        seg = blocks([1, 2, 3], seed=i)
        image = np.stack([(seg + 10 * c).astype(np.float32) + 0.5 for c in range(4)], axis=-1)
        (root / "imagesTr").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(image, AFFINE), str(root / "imagesTr" / f"BRATS_{i:03d}.nii.gz"))
        write_nifti(root / "labelsTr" / f"BRATS_{i:03d}.nii.gz", seg, AFFINE)
        training.append({"image": f"./imagesTr/BRATS_{i:03d}.nii.gz", "label": f"./labelsTr/BRATS_{i:03d}.nii.gz"})
        images[f"BRATS_{i:03d}"] = image
    (root / "imagesTr/._BRATS_001.nii.gz").write_bytes(b"\0" * 64)  # the archive's macOS resource fork
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "name": "BRATS",
                "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
                "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
                "numTraining": 2,
                "training": training,
                "test": [],
            }
        )
    )
    out = tmp_path / "Dataset001_BrainTumour"
    convert(["msd", root, "--out", out], capsys, monkeypatch)
    dataset = converted(out)
    assert dataset["channel_names"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    assert dataset["labels"] == {"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}
    assert load_task(out).n_channels == 4 and dataset["numTraining"] == 2
    for case, image in images.items():
        for c in range(4):
            np.testing.assert_allclose(read(out / "imagesTr" / f"{case}_{c:04d}.nii.gz"), image[..., c])
    # A 3D image where the json declares four channels is bad input naming the image.
    nib.save(nib.Nifti1Image(images["BRATS_002"][..., 0], AFFINE), str(root / "imagesTr/BRATS_002.nii.gz"))
    code, _, err = run_cli(["data", "convert", "msd", root, "--out", tmp_path / "o"], capsys, monkeypatch)
    assert code == 2 and "BRATS_002.nii.gz" in one_error_line(err)


def test_a_symlink_out_of_the_dataset_is_refused(tmp_path, capsys, monkeypatch):
    make_btcv(tmp_path / "btcv", n=1)
    outside = tmp_path / "elsewhere.nii.gz"
    write_nifti(outside, blocks([1]), AFFINE)
    link = tmp_path / "btcv/RawData/Training/img/img0002.nii.gz"
    link.symlink_to(outside)
    write_nifti(tmp_path / "btcv/RawData/Training/label/label0002.nii.gz", blocks([1]), AFFINE)
    code, _, err = run_cli(["data", "convert", "btcv", tmp_path / "btcv", "--out", tmp_path / "o"], capsys, monkeypatch)
    assert code == 2 and str(link) in one_error_line(err) and "outside the dataset folder" in err
