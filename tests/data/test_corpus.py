"""Corpus ingest (mixed formats, skipped bad files, cheap re-ingest) and manifest validation."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

import medssl.data.cache as cache_module
from medssl.config import PreprocessConfig
from medssl.data.corpus import Corpus, ingest_corpus
from medssl.errors import MedsslInputError

CONFIG = PreprocessConfig(spacing=(2.0, 2.0, 2.0))


def _mixed_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    (root / "patient1").mkdir(parents=True)
    nib.save(
        nib.Nifti1Image(rng.uniform(-1000, 1000, (16, 16, 12)).astype(np.float32), np.diag([2.0, 2.0, 3.0, 1.0])),
        str(root / "patient1" / "ct.nii.gz"),
    )
    image = sitk.GetImageFromArray(rng.uniform(-1000, 1000, (10, 14, 12)).astype(np.float32))  # (k, j, i)
    image.SetSpacing((1.5, 1.5, 2.0))
    sitk.WriteImage(image, str(root / "scan2.nrrd"))
    (root / "broken.nii.gz").write_bytes(b"this is not a NIfTI file")
    return root


def test_ingest_mixed_folder_records_the_bad_file(tmp_path: Path) -> None:
    src = _mixed_folder(tmp_path / "raw")
    corpus = ingest_corpus(src, tmp_path / "corpus", CONFIG)
    assert len(corpus) == 2 and len(corpus.volumes) == 2
    manifest = json.loads((tmp_path / "corpus" / "manifest.json").read_text())
    assert manifest["version"] == 1 and manifest["modality"] == "ct"
    assert manifest["preprocess"]["spacing"] == [2.0, 2.0, 2.0]
    assert sorted(v["id"] for v in manifest["volumes"]) == ["patient1_ct", "scan2"]
    assert [Path(s["source"]).name for s in manifest["skipped"]] == ["broken.nii.gz"]
    assert manifest["skipped"][0]["problem"]
    by_id = {v.case_id: v for v in corpus.volumes}
    assert by_id["patient1_ct"].shape == (16, 16, 18)  # 2x2x3 mm -> 2 mm
    assert by_id["scan2"].shape == (9, 10, 10)  # NRRD (i, j, k) = (12, 14, 10) at 1.5/1.5/2 mm
    assert all(v.label() is None for v in corpus.volumes)
    assert corpus.skipped == manifest["skipped"]


def test_reingest_decodes_nothing_and_open_reads_the_manifest(tmp_path: Path, monkeypatch) -> None:
    src = _mixed_folder(tmp_path / "raw")
    ingest_corpus([src], tmp_path / "corpus", CONFIG)
    calls: list[Path] = []
    real_read = cache_module.read_volume

    def counting_read(path, **kwargs):
        calls.append(Path(path))
        return real_read(path, **kwargs)

    monkeypatch.setattr(cache_module, "read_volume", counting_read)
    again = ingest_corpus([src], tmp_path / "corpus", CONFIG)
    assert [p.name for p in calls] == ["broken.nii.gz"]  # only the file that never made it into the cache
    opened = Corpus.open(tmp_path / "corpus")
    assert len(opened) == 2 and opened.preprocess == CONFIG and opened.modality == "ct"
    assert [v.path for v in opened.volumes] == [v.path for v in again.volumes]
    assert Corpus.open(tmp_path / "corpus" / "manifest.json").entries == opened.entries


def test_open_rejects_plain_folders_and_escaping_manifests(tmp_path: Path) -> None:
    src = _mixed_folder(tmp_path / "raw")
    with pytest.raises(MedsslInputError, match="not an ingested corpus; run 'medssl data ingest'"):
        Corpus.open(src)
    with pytest.raises(MedsslInputError, match="not found"):
        Corpus.open(tmp_path / "absent")

    ingest_corpus(src, tmp_path / "corpus", CONFIG)
    manifest_path = tmp_path / "corpus" / "manifest.json"
    original = json.loads(manifest_path.read_text())
    for key, problem in [
        ("../raw", "not a plain entry name"),
        ("/etc", "not a plain entry name"),
        ("0" * 32, "missing"),
    ]:
        tampered = json.loads(json.dumps(original))
        tampered["volumes"][0]["cache_key"] = key
        manifest_path.write_text(json.dumps(tampered))
        with pytest.raises(MedsslInputError, match=problem):
            Corpus.open(tmp_path / "corpus")
    # A symlink inside the cache that leads out of it is refused too.
    (tmp_path / "corpus" / "cache" / "link").symlink_to(tmp_path / "raw", target_is_directory=True)
    tampered = json.loads(json.dumps(original))
    tampered["volumes"][0]["cache_key"] = "link"
    manifest_path.write_text(json.dumps(tampered))
    with pytest.raises(MedsslInputError, match="leads outside"):
        Corpus.open(tmp_path / "corpus")


def test_empty_or_unreadable_sources(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedsslInputError, match="no volumes found"):
        ingest_corpus(tmp_path / "empty", tmp_path / "out", CONFIG)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.nrrd").write_bytes(b"garbage")
    with pytest.raises(MedsslInputError, match="no readable volumes"):
        ingest_corpus(tmp_path / "bad", tmp_path / "out2", CONFIG)
    assert not (tmp_path / "out2" / "manifest.json").exists()  # a manifest only once a volume is cached


def test_ingest_extends_an_existing_corpus(tmp_path: Path) -> None:
    first = _mixed_folder(tmp_path / "raw")
    ingest_corpus(first, tmp_path / "corpus", CONFIG)
    second = tmp_path / "more"
    second.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(second / "scan2.nii.gz"))
    extended = ingest_corpus(second, tmp_path / "corpus", CONFIG)
    # The earlier volumes stay with their ids; the clashing name gets a fresh one.
    assert sorted(e["id"] for e in extended.entries) == ["patient1_ct", "scan2", "scan2_2"]
    assert len(extended.skipped) == 1  # broken.nii.gz from the first ingest is still reported
    again = ingest_corpus([first, second], tmp_path / "corpus", CONFIG)
    assert {e["id"]: e["cache_key"] for e in again.entries} == {e["id"]: e["cache_key"] for e in extended.entries}
    with pytest.raises(MedsslInputError, match="another modality or preprocessing"):
        ingest_corpus(second, tmp_path / "corpus", PreprocessConfig(spacing=(3.0, 3.0, 3.0)))


@pytest.mark.slow  # two spawned workers each import torch and MONAI (seconds)
def test_parallel_ingest_matches_serial(tmp_path: Path) -> None:
    src = _mixed_folder(tmp_path / "raw")
    serial = ingest_corpus(src, tmp_path / "serial", CONFIG)
    parallel = ingest_corpus(src, tmp_path / "parallel", CONFIG, workers=2)
    assert [e["cache_key"] for e in parallel.entries] == [e["cache_key"] for e in serial.entries]
    assert len(parallel.skipped) == 1
