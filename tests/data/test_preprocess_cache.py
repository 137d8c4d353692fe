"""Preprocessing (orientation, resampling, intensity) and the volume cache."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import medssl.data.cache as cache_module
from medssl.config import PreprocessConfig
from medssl.data.cache import CachedVolume, VolumeCache, cache_task, case_id_from_path
from medssl.data.preprocess import preprocess_case
from medssl.data.readers import Volume
from medssl.data.tasks import load_task
from medssl.errors import MedsslInputError


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def _ct_case(tmp_path: Path, name: str = "case_001", shape=(24, 24, 20), spacing=2.0) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    image = rng.uniform(-300, 400, size=shape).astype(np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    label[4:20, 4:20, 4:16] = 1  # 3072 voxels: more than the 2,000 kept per class
    label[10:13, 10:13, 2:4] = 2
    affine = np.diag([spacing, spacing, spacing, 1.0])
    (tmp_path / "imagesTr").mkdir(exist_ok=True)
    (tmp_path / "labelsTr").mkdir(exist_ok=True)
    return (
        _nifti(tmp_path / "imagesTr" / f"{name}_0000.nii.gz", image, affine),
        _nifti(tmp_path / "labelsTr" / f"{name}.nii.gz", label, affine),
    )


ONE_MM = PreprocessConfig(spacing=(1.0, 1.0, 1.0))


# ------------------------------------------------------------------------------ preprocessing


def test_resampling_2mm_to_1mm_doubles_the_shape() -> None:
    image = Volume(np.zeros((10, 12, 8), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]), Path("img"))
    label = Volume(np.ones((10, 12, 8), np.uint8), np.diag([2.0, 2.0, 2.0, 1.0]), Path("lbl"))
    out_image, out_label, spacing = preprocess_case(image, label, "ct", ONE_MM)
    assert out_image.shape == (20, 24, 16)
    assert out_label is not None and out_label.shape == (20, 24, 16)
    assert spacing == pytest.approx((1.0, 1.0, 1.0))
    assert out_image.dtype == np.float32 and out_label.dtype == np.uint8
    assert set(np.unique(out_label)) == {1}  # nearest neighbour: no interpolated label values


def test_lps_input_comes_out_ras() -> None:
    array = np.full((8, 6, 4), -1000.0, np.float32)
    array[0, 0, 0] = 250.0  # the voxel nearest Right-Anterior (x, y most negative in RAS terms)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    out, _, _ = preprocess_case(Volume(array, lps, Path("img")), None, "ct", ONE_MM)
    assert out.shape == (8, 6, 4)
    # After RAS reorientation the i and j axes are reversed: the marker moves to the far corner.
    assert [tuple(c) for c in np.argwhere(out > 0.5)] == [(7, 5, 0)]


def test_ct_window_maps_hu_to_unit_range() -> None:
    hu = np.array([-1000.0, -175.0, 37.5, 250.0, 3000.0], np.float32)
    array = np.tile(hu[:, None, None], (1, 4, 4))
    out, _, _ = preprocess_case(Volume(array, np.eye(4), Path("img")), None, "ct", ONE_MM)
    assert out[:, 0, 0] == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0], abs=1e-6)


def test_mri_percentile_scaling_is_in_unit_range() -> None:
    array = np.random.default_rng(1).gamma(2.0, 300.0, size=(16, 16, 16)).astype(np.float32)
    out, _, _ = preprocess_case(Volume(array, np.eye(4), Path("img")), None, "mri", ONE_MM)
    assert out.min() == pytest.approx(0.0) and out.max() == pytest.approx(1.0)
    assert 0.0 < float(np.median(out)) < 0.5


def test_geometry_mismatch_names_the_label() -> None:
    image = Volume(np.zeros((8, 8, 8), np.float32), np.eye(4), Path("img.nii.gz"))
    wrong_shape = Volume(np.zeros((8, 8, 7), np.uint8), np.eye(4), Path("lbl.nii.gz"))
    with pytest.raises(MedsslInputError, match=r"^lbl\.nii\.gz: .*shape"):
        preprocess_case(image, wrong_shape, "ct", ONE_MM)
    wrong_spacing = Volume(np.zeros((8, 8, 8), np.uint8), np.diag([1.0, 1.0, 1.5, 1.0]), Path("lbl.nii.gz"))
    with pytest.raises(MedsslInputError, match="spacing"):
        preprocess_case(image, wrong_spacing, "ct", ONE_MM)
    shifted = np.eye(4)
    shifted[:3, 3] = [0.0, 5.0, 0.0]
    with pytest.raises(MedsslInputError, match="origin"):
        preprocess_case(image, Volume(np.zeros((8, 8, 8), np.uint8), shifted, Path("lbl.nii.gz")), "ct", ONE_MM)


def test_nan_voxels_are_an_input_error() -> None:
    array = np.zeros((8, 8, 8), np.float32)
    array[1, 2, 3] = np.nan
    with pytest.raises(MedsslInputError, match="1 NaN/inf"):
        preprocess_case(Volume(array, np.eye(4), Path("img")), None, "ct", ONE_MM)


# ------------------------------------------------------------------------------ cache


def test_cache_hit_does_not_decode_again_and_is_keyed_by_config(tmp_path: Path, monkeypatch) -> None:
    image_path, label_path = _ct_case(tmp_path)
    calls: list[Path] = []
    real_read = cache_module.read_volume

    def counting_read(path, **kwargs):
        calls.append(Path(path))
        return real_read(path, **kwargs)

    monkeypatch.setattr(cache_module, "read_volume", counting_read)
    cache = VolumeCache(tmp_path / "cache")
    first = cache.get(image_path, label_path, "ct", ONE_MM)
    assert len(calls) == 2  # image + label
    second = cache.get(image_path, label_path, "ct", ONE_MM)
    assert len(calls) == 2 and second.path == first.path
    other = cache.get(image_path, label_path, "ct", PreprocessConfig(spacing=(2.0, 2.0, 2.0)))
    assert len(calls) == 4 and other.path != first.path
    assert other.shape == (24, 24, 20) and first.shape == (48, 48, 40)
    assert cache.get(image_path, label_path, "mri", ONE_MM).path not in (first.path, other.path)

    # Editing the source file (new size/mtime) gives a fresh entry.
    stat = image_path.stat()
    os.utime(image_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert cache.get(image_path, label_path, "ct", ONE_MM).path != first.path


def test_cached_arrays_round_trip_and_metadata(tmp_path: Path) -> None:
    image_path, label_path = _ct_case(tmp_path)
    config = PreprocessConfig(spacing=(2.0, 2.0, 2.0))
    entry = VolumeCache(tmp_path / "cache").get(image_path, label_path, "ct", config)
    assert entry.case_id == "case_001"
    reference, reference_label, spacing = preprocess_case(
        cache_module.read_volume(image_path), cache_module.read_volume(label_path, label=True), "ct", config
    )
    stored = entry.image()
    assert isinstance(stored, np.memmap) and stored.dtype == np.float16
    error = float(np.abs(stored.astype(np.float32) - reference).max())
    assert error <= 2**-12 < 1e-3, f"float16 round trip error {error}"
    assert np.array_equal(entry.label(), reference_label) and entry.label().dtype == np.uint8
    assert entry.spacing == pytest.approx(spacing)
    meta = json.loads((entry.path / "meta.json").read_text())
    assert meta["modality"] == "ct" and meta["preprocess"]["spacing"] == [2.0, 2.0, 2.0]
    assert meta["class_voxels"] == {"0": 24 * 24 * 20 - 16 * 16 * 12 - 18, "1": 16 * 16 * 12, "2": 18}
    assert entry.source == str(image_path.resolve())

    foreground = entry.foreground()
    assert sorted(foreground) == [1, 2]
    assert len(foreground[1]) == 2000 and len(foreground[2]) == 18
    label = entry.label()
    for cls, coords in foreground.items():
        assert np.all(label[tuple(coords.T)] == cls)
        assert len(np.unique(coords, axis=0)) == len(coords)


def _race_worker(root: str, image: str, label: str, barrier, queue) -> None:
    """Runs in a forked process: decode slowly so both processes miss the cache and build the entry."""
    # One intra-op thread: a forked child entering the OpenMP pool its parent already used can hang.
    torch.set_num_threads(1)
    real_read = cache_module.read_volume
    reads: list[str] = []

    def slow_read(path, **kwargs):
        reads.append(str(path))
        time.sleep(0.5)
        return real_read(path, **kwargs)

    cache_module.read_volume = slow_read
    try:
        barrier.wait(timeout=60)
        entry = VolumeCache(root).get(image, label, "ct", ONE_MM)
        total = float(entry.image(mmap=False).astype(np.float32).sum())
        queue.put(("ok", str(entry.path), total, len(reads)))
    except Exception as err:  # reported to the parent, which fails the test
        queue.put(("error", repr(err), 0.0, len(reads)))


def test_two_processes_racing_on_one_entry_both_succeed(tmp_path: Path) -> None:
    image_path, label_path = _ct_case(tmp_path)
    context = mp.get_context("fork")  # spawn would spend seconds re-importing torch and MONAI
    queue, barrier = context.Queue(), context.Barrier(2)
    args = (str(tmp_path / "cache"), str(image_path), str(label_path), barrier, queue)
    workers = [context.Process(target=_race_worker, args=args) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        results = [queue.get(timeout=120) for _ in workers]
    finally:
        for w in workers:
            w.join(timeout=30)
            if w.is_alive():
                w.kill()
    assert [r[0] for r in results] == ["ok", "ok"], results
    assert [r[3] for r in results] == [2, 2]  # both really built the entry (image + label decoded)
    assert results[0][1] == results[1][1] and results[0][2] == results[1][2]
    leftovers = [p.name for p in (tmp_path / "cache").iterdir()]
    assert leftovers == [Path(results[0][1]).name]  # the loser's temporary directory is gone
    assert CachedVolume(results[0][1]).image().shape == (48, 48, 40)


def _msd_dataset_json(root: Path, names: list[str], modality: dict[str, str]) -> None:
    training = [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in names]
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "name": "toy",
                "modality": modality,
                "labels": {"0": "background", "1": "liver", "2": "spleen"},
                "numTraining": len(names),
                "training": training,
            }
        )
    )


def test_cache_task_keys_by_case_id(tmp_path: Path) -> None:
    root = tmp_path / "Task01_Toy"
    root.mkdir()
    for name in ("case_001", "case_002"):
        image, label = _ct_case(root, name)
        image.rename(root / "imagesTr" / f"{name}.nii.gz")  # MSD: no channel suffix
    _msd_dataset_json(root, ["case_001", "case_002"], {"0": "CT"})
    task = load_task(root)
    cached = cache_task(task, VolumeCache(tmp_path / "cache"), PreprocessConfig(spacing=(2.0, 2.0, 2.0)))
    assert sorted(cached) == ["case_001", "case_002"]
    assert cached["case_002"].case_id == "case_002" and cached["case_002"].label() is not None
    assert cached["case_001"].modality == "ct" and cached["case_001"].n_channels == 1


def test_multichannel_cases_are_stacked(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    t1, t2 = rng.random((8, 8, 8), np.float32), 100 * rng.random((8, 8, 8), np.float32)
    # nnU-Net style: one file per channel.
    first = _nifti(tmp_path / "brain_0000.nii.gz", t1, np.eye(4))
    second = _nifti(tmp_path / "brain_0001.nii.gz", t2, np.eye(4))
    entry = VolumeCache(tmp_path / "cache").get(first, None, "mri", ONE_MM, images=[first, second])
    assert entry.n_channels == 2 and entry.image().shape == (2, 8, 8, 8) and entry.shape == (8, 8, 8)
    assert entry.label() is None and entry.foreground() == {}
    # MSD style: one 4D file; each channel is scaled on its own, so both match the per-file result.
    root = tmp_path / "Task02_Brain"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    _nifti(root / "imagesTr" / "brain.nii.gz", np.stack([t1, t2], axis=-1), np.eye(4))
    _nifti(root / "labelsTr" / "brain.nii.gz", (t1 > 0.5).astype(np.uint8), np.eye(4))
    _msd_dataset_json(root, ["brain"], {"0": "T1", "1": "T2"})
    task = load_task(root)
    assert task.channels_in_one_file
    packed = cache_task(task, VolumeCache(tmp_path / "cache"), ONE_MM)["brain"]
    assert packed.n_channels == 2
    assert np.array_equal(packed.image(), entry.image())


def test_missing_source_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(MedsslInputError, match="not found"):
        VolumeCache(tmp_path / "cache").get(tmp_path / "absent.nii.gz", None, "ct", ONE_MM)


def test_case_id_from_path() -> None:
    assert case_id_from_path("imagesTr/liver_003_0000.nii.gz") == "liver_003"
    assert case_id_from_path("scan.nrrd") == "scan"
    assert case_id_from_path("patient_12.mha") == "patient_12"


def test_damaged_entry_is_rebuilt(tmp_path: Path) -> None:
    image_path, label_path = _ct_case(tmp_path)
    cache = VolumeCache(tmp_path / "cache")
    entry = cache.get(image_path, label_path, "ct", ONE_MM)
    (entry.path / "meta.json").unlink()
    with pytest.raises(MedsslInputError, match="meta.json missing"):
        CachedVolume(entry.path)
    rebuilt = cache.get(image_path, label_path, "ct", ONE_MM)
    assert rebuilt.path == entry.path and rebuilt.shape == (48, 48, 40)
