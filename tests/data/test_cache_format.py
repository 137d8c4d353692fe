"""cache.format: blosc2 entries hold the same array as npy ones; without blosc2 the error is one line."""

from __future__ import annotations

import builtins
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medssl.config import BenchConfig, PreprocessConfig
from medssl.data.cache import VolumeCache
from medssl.data.corpus import ingest_corpus
from medssl.data.datasets import read_crop
from medssl.errors import MedsslInputError

pytest.importorskip("blosc2")

PRE = PreprocessConfig(spacing=(2.0, 2.0, 2.0))


def _scan(path: Path, shape=(40, 36, 34)) -> Path:
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.uniform(-500, 500, shape).astype(np.float32), np.diag([2.0, 2.0, 2.0, 1])), path)
    return path


def test_blosc2_entry_reads_the_same_crops_as_npy(tmp_path: Path) -> None:
    scan = _scan(tmp_path / "ct.nii.gz")
    npy = VolumeCache(tmp_path / "npy").get(scan, None, "ct", PRE)
    b2 = VolumeCache(tmp_path / "b2", image_format="blosc2").get(scan, None, "ct", PRE)
    assert (npy.image_format, b2.image_format) == ("npy", "blosc2")
    assert (b2.path / "image.b2nd").is_file() and not (b2.path / "image.npy").exists()
    np.testing.assert_array_equal(b2.image(mmap=False), npy.image(mmap=False))  # lossless
    for start in ([0, 0, 0], [10, -5, 20], [30, 30, 30]):  # inside, over the edge, mostly outside
        np.testing.assert_array_equal(
            read_crop(b2.image(), start, 16, b2.image_min, np.float32),
            read_crop(npy.image(), start, 16, npy.image_min, np.float32),
        )


def test_corpus_ingest_with_blosc2(tmp_path: Path) -> None:
    _scan(tmp_path / "scans.nii.gz")
    corpus = ingest_corpus(tmp_path / "scans.nii.gz", tmp_path / "corpus", PRE, image_format="blosc2")
    (volume,) = corpus.volumes
    assert volume.image_format == "blosc2" and volume.image().shape == volume.shape


def test_missing_blosc2_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_blosc2(name, *args, **kwargs):
        if name == "blosc2":
            raise ImportError("no blosc2")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_blosc2)
    with pytest.raises(MedsslInputError, match=r"pip install 'medssl\[blosc2\]'"):
        VolumeCache(tmp_path / "cache", image_format="blosc2")
    with pytest.raises(MedsslInputError, match="unknown cache format 'zarr'"):
        VolumeCache(tmp_path / "cache", image_format="zarr")


def test_cache_format_is_a_config_field_outside_the_benchmark_identity() -> None:
    from medssl.bench.identity import bench_identity

    base = {"tasks": [{"path": "synth:ct_organs"}]}
    packed = BenchConfig.model_validate({**base, "cache": {"format": "blosc2"}})
    assert packed.cache.format == "blosc2" and BenchConfig.model_validate(base).cache.format == "npy"
    assert bench_identity(packed) == bench_identity(BenchConfig.model_validate(base))
    with pytest.raises(ValueError):
        BenchConfig.model_validate({**base, "cache": {"format": "zarr"}})
