"""Synthetic phantoms: determinism, variety between cases, plausible anatomy, CT/MRI pairing, MSD folders."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medssl.data.synth import (
    LESION_LABELS,
    ORGAN_LABELS,
    TISSUES,
    case_seed,
    make_anatomy,
    render_ct,
    render_mri,
    synth_all,
    synth_corpus,
    synth_task,
)
from medssl.data.tasks import check_corpus_folder, check_task, load_task
from medssl.errors import MedsslInputError

SMALL = (32, 32, 32)


@pytest.fixture(scope="module")
def anatomies() -> list:
    return [make_anatomy(seed) for seed in range(8)]  # the default 64^3 grid


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synth_all(out, cases=3, corpus_cases=2, seed=0, shape=SMALL)
    return out


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_same_seed_same_arrays_different_seed_differs() -> None:
    a, b, c = make_anatomy(5, SMALL), make_anatomy(5, SMALL), make_anatomy(6, SMALL)
    for name in ("tissue", "organs", "lesions"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.lesion_info == b.lesion_info and a.origin == b.origin
    np.testing.assert_array_equal(render_ct(a, 5), render_ct(b, 5))
    np.testing.assert_array_equal(render_mri(a, 5, "t2"), render_mri(b, 5, "t2"))
    assert not np.array_equal(a.organs, c.organs)
    assert not np.array_equal(render_ct(a, 5), render_ct(a, 6))  # noise follows the render seed


def test_same_seed_same_bytes_on_disk(tmp_path: Path) -> None:
    first = synth_task(tmp_path / "a", "ct_lesions", 2, seed=3, shape=SMALL)
    second = synth_task(tmp_path / "b", "ct_lesions", 2, seed=3, shape=SMALL)
    other = synth_task(tmp_path / "c", "ct_lesions", 2, seed=4, shape=SMALL)
    for sub in ("imagesTr", "labelsTr"):
        for path in sorted((first / sub).iterdir()):
            assert path.read_bytes() == (second / sub / path.name).read_bytes()
    assert (first / "imagesTr/case_000.nii.gz").read_bytes() != (other / "imagesTr/case_000.nii.gz").read_bytes()


def test_organs_vary_in_position_size_and_shape(anatomies: list) -> None:
    livers = [a.organs == 1 for a in anatomies]
    centroids = np.array([np.argwhere(m).mean(axis=0) for m in livers])
    assert float(np.linalg.norm(centroids.std(axis=0))) > 2.0  # voxels
    for label in ORGAN_LABELS:
        volumes = np.array([(a.organs == label).sum() for a in anatomies], dtype=float)
        assert volumes.std() / volumes.mean() > 0.1, ORGAN_LABELS[label]
    assert _dice(livers[0], livers[1]) < 0.9


# Plausible share of the 64^3 volume per organ (liver ~1-4%, aorta a thin tube, ...).
_FRACTION = {
    "liver": (0.008, 0.06),
    "spleen": (0.0008, 0.008),
    "kidney": (0.002, 0.012),
    "stomach": (0.0015, 0.012),
    "aorta": (0.001, 0.008),
}


def test_every_organ_present_with_plausible_size(anatomies: list) -> None:
    for a in anatomies:
        n = a.organs.size
        for label, name in ORGAN_LABELS.items():
            low, high = _FRACTION[name]
            assert low < (a.organs == label).sum() / n < high, (a.seed, name)
        # two kidneys, each one connected piece
        assert ndimage.label(a.organs == 3)[1] == 2, a.seed
        assert set(np.unique(a.organs)) <= {0, *ORGAN_LABELS}


def test_lesions_inside_liver_or_kidney_and_body(anatomies: list) -> None:
    for a in anatomies:
        lesion = a.lesion_labels().astype(bool)
        assert 1 <= len(a.lesion_info) <= 3 and lesion.sum() >= 8
        assert a.body_mask()[lesion].all()
        assert np.isin(a.organs[lesion], [1, 3]).all()
        for k, info in enumerate(a.lesion_info, start=1):
            assert (a.lesions == k).any()
            assert a.organs[info.center] == {"liver": 1, "kidney": 3}[info.host]


def test_ct_intensities_match_tissues() -> None:
    a = make_anatomy(11)
    ct = render_ct(a, 11)
    core = lambda m: ndimage.binary_erosion(m, iterations=1) & (a.lesions == 0)  # away from blur
    expected = {
        "liver": (60, 25),
        "spleen": (50, 25),
        "kidney": (150, 30),
        "aorta": (200, 45),
        "lung": (-850, 60),
        "fat": (-100, 30),
    }
    for tissue, (hu, tolerance) in expected.items():
        mean = float(ct[core(a.tissue == TISSUES[tissue])].mean())
        assert abs(mean - hu) < tolerance, (tissue, mean)
    assert float(ct[a.tissue == TISSUES["air"]].mean()) < -950
    residual = ct[core(a.tissue == TISSUES["liver"])] - ct[core(a.tissue == TISSUES["liver"])].mean()
    assert 8.0 < residual.std() < 25.0  # noise sd 10-18 HU plus texture


def test_mri_is_nonnegative_and_differs_by_weighting(anatomies: list) -> None:
    a = anatomies[0]
    t1, t2 = render_mri(a, 2, "t1"), render_mri(a, 2, "t2")
    assert t1.dtype == np.float32 and t1.min() >= 0 and t2.min() >= 0
    core = {
        name: ndimage.binary_erosion(a.tissue == TISSUES[name], iterations=1) & (a.lesions == 0)
        for name in ("liver", "spleen", "fat", "muscle")
    }
    # liver brighter than spleen on T1, darker on T2; fat brighter than muscle on both
    assert t1[core["liver"]].mean() > 1.2 * t1[core["spleen"]].mean()
    assert t2[core["spleen"]].mean() > 1.5 * t2[core["liver"]].mean()
    assert t1[core["fat"]].mean() > 2 * t1[core["muscle"]].mean()
    with pytest.raises(ValueError):
        render_mri(a, 2, "pd")


def test_ct_and_mri_tasks_share_labels_but_not_images(synth_root: Path) -> None:
    for i in range(3):
        name = f"case_{i:03d}.nii.gz"
        ct_label = nib.load(synth_root / "ct_organs/labelsTr" / name)
        mri_label = nib.load(synth_root / "mri_organs/labelsTr" / name)
        np.testing.assert_array_equal(np.asanyarray(ct_label.dataobj), np.asanyarray(mri_label.dataobj))
        np.testing.assert_allclose(ct_label.affine, mri_label.affine)
        ct = np.asanyarray(nib.load(synth_root / "ct_organs/imagesTr" / name).dataobj)
        mri = np.asanyarray(nib.load(synth_root / "mri_organs/imagesTr" / name).dataobj)
        assert ct.dtype == np.int16 and ct.min() >= -1024 and mri.min() >= 0
        assert abs(np.corrcoef(ct.ravel(), mri.ravel())[0, 1]) < 0.99


def test_corpus_and_tasks_never_share_a_case(synth_root: Path) -> None:
    corpus = {case_seed(0, "corpus", i) for i in range(1000)}
    tasks = {case_seed(0, d, i) for d in ("organs", "lesions") for i in range(1000)}
    assert not corpus & tasks
    scans = sorted((synth_root / "corpus").glob("scan_*.nii.gz"))
    assert len(scans) == 2 and check_corpus_folder(synth_root / "corpus") == []
    task_images = [np.asanyarray(nib.load(p).dataobj) for p in (synth_root / "ct_organs/imagesTr").iterdir()]
    for scan in scans:
        data = np.asanyarray(nib.load(scan).dataobj)
        assert not any(np.array_equal(data, img) for img in task_images)


@pytest.mark.parametrize(
    ("kind", "modality", "labels"),
    [
        ("ct_organs", "ct", ORGAN_LABELS),
        ("ct_lesions", "ct", LESION_LABELS),
        ("mri_organs", "mri", ORGAN_LABELS),
    ],
)
def test_msd_folder_is_a_valid_task(synth_root: Path, kind: str, modality: str, labels: dict) -> None:
    root = synth_root / kind
    raw = json.loads((root / "dataset.json").read_text())
    assert raw["modality"] == {"0": modality.upper()} and raw["numTraining"] == 3
    assert raw["training"][0] == {"image": "./imagesTr/case_000.nii.gz", "label": "./labelsTr/case_000.nii.gz"}
    task = load_task(root)
    assert task.modality == modality and task.structures == labels and len(task.cases) == 3
    assert check_task(root, deep=True) == []
    for case in task.cases:
        label = np.asanyarray(nib.load(case.label).dataobj)
        assert set(np.unique(label)) == {0, *labels}  # every structure present in every case


def test_spacing_jitter_and_origin(tmp_path: Path) -> None:
    jittered = synth_task(tmp_path / "j", "ct_organs", 3, shape=SMALL)
    plain = synth_task(tmp_path / "p", "ct_organs", 3, shape=SMALL, spacing=(2.0, 2.0, 2.5), jitter_spacing=False)
    spacings = [nib.load(p).header.get_zooms() for p in sorted((jittered / "imagesTr").iterdir())]
    assert len(set(spacings)) == 3
    assert all(abs(s / 3.0 - 1) <= 0.05 + 1e-6 for zooms in spacings for s in zooms)
    for path in (plain / "imagesTr").iterdir():
        image = nib.load(path)
        np.testing.assert_allclose(image.header.get_zooms(), (2.0, 2.0, 2.5), rtol=1e-6)
        np.testing.assert_allclose(np.diag(image.affine)[:3], (2.0, 2.0, 2.5))


def test_rerun_skips_complete_and_regenerates_changed(tmp_path: Path) -> None:
    made = synth_all(tmp_path, cases=2, corpus_cases=1, modality="mri", shape=SMALL)
    assert set(made) == {"mri_organs"} and not (tmp_path / "corpus").exists()
    image = tmp_path / "mri_organs/imagesTr/case_001.nii.gz"
    stamp = image.stat().st_mtime_ns
    synth_all(tmp_path, cases=2, corpus_cases=1, modality="mri", shape=SMALL)
    assert image.stat().st_mtime_ns == stamp  # complete with the same parameters: untouched
    synth_all(tmp_path, cases=1, corpus_cases=1, modality="mri", shape=SMALL)
    assert not image.exists() and len(load_task(tmp_path / "mri_organs").cases) == 1
    # an interrupted generation (no marker) is redone
    (tmp_path / "mri_organs/.complete").unlink()
    (tmp_path / "mri_organs/dataset.json").unlink()
    synth_all(tmp_path, cases=1, corpus_cases=1, modality="mri", shape=SMALL)
    assert (tmp_path / "mri_organs/dataset.json").is_file() and (tmp_path / "mri_organs/.complete").is_file()


def test_corpus_returns_paths(tmp_path: Path) -> None:
    paths = synth_corpus(tmp_path / "c", 2, seed=1, shape=SMALL)
    assert [p.name for p in paths] == ["scan_000.nii.gz", "scan_001.nii.gz"] and all(p.is_file() for p in paths)


def test_bad_requests_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(MedsslInputError, match="unknown synthetic task"):
        synth_task(tmp_path, "pet_organs", 2)  # type: ignore[arg-type]
    with pytest.raises(MedsslInputError, match="modality"):
        synth_all(tmp_path, modality="pet")
    with pytest.raises(MedsslInputError, match="number of synthetic cases"):
        synth_task(tmp_path, "ct_organs", 0)
    with pytest.raises(MedsslInputError, match="shape"):
        synth_corpus(tmp_path, 2, shape=(8, 8, 8))
    with pytest.raises(MedsslInputError, match="mri_weighting"):
        synth_task(tmp_path, "mri_organs", 2, mri_weighting="flair")
    assert not any(tmp_path.iterdir())  # nothing written for a bad request


def _organ_means(anatomy, image: np.ndarray) -> dict[str, float]:
    return {name: float(image[anatomy.organs == label].mean()) for label, name in ORGAN_LABELS.items()}


def test_scanner_variation_spreads_the_acquisitions_and_keeps_the_standard_bytes(tmp_path: Path) -> None:
    from medssl.data.synth import CT_PHASES, ct_protocol

    anatomy = make_anatomy(21, SMALL)
    # "standard" is the one protocol of before: unchanged render, defaults in every folder's marker.
    np.testing.assert_array_equal(render_ct(anatomy, 21), render_ct(anatomy, 21, "standard"))
    np.testing.assert_array_equal(render_mri(anatomy, 21), render_mri(anatomy, 21, variation="standard"))
    # Deterministic per seed, and the anatomy (hence the labels) does not depend on the variation.
    np.testing.assert_array_equal(render_ct(anatomy, 21, "scanners"), render_ct(anatomy, 21, "scanners"))
    protocols = [ct_protocol(seed, "scanners") for seed in range(40)]
    assert {p.phase for p in protocols} == set(CT_PHASES)  # every contrast phase occurs
    noise = [p.noise for p in protocols]
    assert max(noise) > 2.5 * min(noise)  # dose / kernel spread, not one scanner
    # The organs' contrast changes with the phase: the aorta ranges from unenhanced to arterial.
    aorta = []
    for seed in range(12):
        image = render_ct(anatomy, seed, "scanners")
        aorta.append(_organ_means(anatomy, image)["aorta"] - float(image[anatomy.tissue == TISSUES["muscle"]].mean()))
    standard = []
    for seed in range(12):
        image = render_ct(anatomy, seed)
        standard.append(
            _organ_means(anatomy, image)["aorta"] - float(image[anatomy.tissue == TISSUES["muscle"]].mean())
        )
    assert max(aorta) - min(aorta) > 2.0 * (max(standard) - min(standard))  # partial volume spreads both

    # MRI: a stronger spread of bias and noise between scans than the standard phantoms.
    def spread(variation: str) -> float:
        liver = [_organ_means(anatomy, render_mri(anatomy, s, variation=variation))["liver"] for s in range(12)]
        kidney = [_organ_means(anatomy, render_mri(anatomy, s, variation=variation))["kidney"] for s in range(12)]
        return float(np.std(np.array(liver) / np.array(kidney)))

    assert spread("scanners") > 1.5 * spread("standard")
    with pytest.raises(ValueError, match="variation"):
        render_ct(anatomy, 1, "hospital")
    # The folders record the variation, so a change regenerates them.
    a = synth_task(tmp_path / "t", "ct_organs", 2, seed=1, shape=SMALL)
    first = (a / "imagesTr" / "case_000.nii.gz").read_bytes()
    synth_task(tmp_path / "t", "ct_organs", 2, seed=1, shape=SMALL, variation="scanners")
    assert (a / "imagesTr" / "case_000.nii.gz").read_bytes() != first
    assert "scanners" in json.loads((a / "dataset.json").read_text())["description"]


def test_lesion_radius_option_grows_lesions_and_leaves_organ_tasks_alone(tmp_path: Path) -> None:
    default = synth_task(tmp_path / "d", "ct_lesions", 2, seed=0, shape=(40, 40, 40), spacing=(4.0, 4.0, 4.0))
    large = synth_task(
        tmp_path / "l", "ct_lesions", 2, seed=0, shape=(40, 40, 40), spacing=(4.0, 4.0, 4.0), lesion_radius_mm=(12, 20)
    )
    for name in ("case_000.nii.gz", "case_001.nii.gz"):
        small_voxels = int(np.asarray(nib.load(default / "labelsTr" / name).dataobj).sum())
        large_voxels = int(np.asarray(nib.load(large / "labelsTr" / name).dataobj).sum())
        assert large_voxels > 2 * small_voxels > 0
    # the default's marker has no radius entry (folders made before the option stay complete)
    assert "lesion_radius_mm" not in json.loads((default / ".complete").read_text())
    assert json.loads((large / ".complete").read_text())["lesion_radius_mm"] == [12.0, 20.0]
    organs = synth_task(tmp_path / "o", "ct_organs", 1, seed=0, shape=SMALL, lesion_radius_mm=(12, 20))
    plain = synth_task(tmp_path / "p", "ct_organs", 1, seed=0, shape=SMALL)
    assert (organs / "imagesTr" / "case_000.nii.gz").read_bytes() == (
        plain / "imagesTr" / "case_000.nii.gz"
    ).read_bytes()
    with pytest.raises(MedsslInputError, match="lesion_radius_mm"):
        synth_task(tmp_path / "x", "ct_lesions", 1, seed=0, shape=SMALL, lesion_radius_mm=(8, 4))
