"""CKA estimators against their definitions, and a CKA run on tiny encoders and a tiny MSD task."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medssl.analysis.activations import LAYER_NAMES, sample_token_positions, stage_activations
from medssl.analysis.cka import MinibatchCKA, batch_bounds, linear_cka, minibatch_cka, unbiased_hsic
from medssl.analysis.cka_run import cka_matrices, extract_crop, preprocess_from_meta, run_cka
from medssl.config import CKARunConfig, EncoderConfig, PreprocessConfig
from medssl.errors import MedsslInputError
from medssl.models import SwinEncoder
from medssl.models.checkpoint import encoder_meta, save_encoder, save_segmenter
from medssl.models.segmenter import SwinSegmenter
from medssl.runs import RunDir

TINY = EncoderConfig(preset="tiny", window_size=4)


def _pair(n: int = 60, d1: int = 6, d2: int = 9, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d1))
    y = x @ rng.normal(size=(d1, d2)) + 0.5 * rng.normal(size=(n, d2))
    return x, y


def _orthogonal(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


def _brute_force_hsic(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """The U-statistic that defines the unbiased HSIC (Song et al. 2012): the mean over ordered
    4-tuples of distinct indices of k_ij·l_ij + k_ij·l_qr − 2·k_ij·l_iq."""
    total, count = 0.0, 0
    for i, j, q, r in itertools.permutations(range(k.shape[0]), 4):
        total += k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2.0 * k[i, j] * l[i, q]
        count += 1
    return total / count


# --------------------------------------------------------------------------- linear CKA


def test_linear_cka_of_a_representation_with_itself_is_one():
    x, _ = _pair()
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(torch.from_numpy(x).float(), torch.from_numpy(x).float()) == pytest.approx(1.0, abs=1e-6)
    assert minibatch_cka([x], [x]) == pytest.approx(1.0, abs=1e-12)


def test_linear_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    x, y = _pair()
    reference = linear_cka(x, y)
    assert 0.2 < reference < 0.95  # a non-trivial value, so invariance is not 1 == 1
    qx, qy = _orthogonal(x.shape[1], 1), _orthogonal(y.shape[1], 2)
    assert linear_cka(x @ qx, y @ qy) == pytest.approx(reference, abs=1e-10)
    assert linear_cka(x, x @ qx) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(3.7 * x, 0.02 * y) == pytest.approx(reference, abs=1e-10)
    # The unbiased (minibatch) estimator has the same invariances: Gram matrices only rotate/scale.
    unbiased = minibatch_cka([x], [y])
    assert minibatch_cka([5.0 * x @ qx], [y @ qy]) == pytest.approx(unbiased, abs=1e-10)


def test_linear_cka_is_not_invariant_to_a_general_invertible_linear_map():
    x, y = _pair(n=400, d1=5)
    stretch = np.diag([100.0, 1.0, 1.0, 1.0, 1.0])  # invertible, far from a scaled rotation
    shear = np.eye(5) + np.triu(np.full((5, 5), 3.0), k=1)
    for a in (stretch, shear):
        assert abs(np.linalg.det(a)) > 1e-6
        # With isotropic x, CKA(x, xA) = ||A||²_F / (sqrt(d)·||AᵀA||_F) < 1 unless A ∝ orthogonal.
        assert linear_cka(x, x @ a) < 0.8
        assert abs(linear_cka(x @ a, y) - linear_cka(x, y)) > 0.05


def test_linear_cka_stays_in_unit_interval():
    rng = np.random.default_rng(3)
    values = []
    for n, d1, d2 in [(10, 3, 50), (50, 50, 2), (200, 8, 8), (5, 1, 1)]:
        x = rng.normal(size=(n, d1))
        for y in (rng.normal(size=(n, d2)), -x[:, :1] * 4.0, np.exp(x[:, :d2] if d2 <= d1 else x)):
            values.append(linear_cka(x, y))
    assert all(0.0 <= v <= 1.0 for v in values)
    assert linear_cka(rng.normal(size=(10, 3)), -rng.normal(size=(10, 3))) >= 0.0
    assert math.isnan(linear_cka(np.ones((10, 3)), rng.normal(size=(10, 2))))  # no variance: undefined


def test_linear_cka_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="same number of rows"):
        linear_cka(np.zeros((5, 2)), np.zeros((6, 2)))


# --------------------------------------------------------------------------- unbiased HSIC and minibatch CKA


def test_unbiased_hsic_equals_the_u_statistic_it_estimates():
    x, y = _pair(n=7, d1=3, d2=2, seed=4)
    k, l = x @ x.T, y @ y.T  # noqa: E741
    assert unbiased_hsic(k, l) == pytest.approx(_brute_force_hsic(k, l), rel=1e-10)
    # Translation invariance: the estimator needs no centring of features.
    shifted = x + 5.0
    assert unbiased_hsic(shifted @ shifted.T, l) == pytest.approx(unbiased_hsic(k, l), rel=1e-9)
    with pytest.raises(ValueError, match="at least 4"):
        unbiased_hsic(k[:3, :3], l[:3, :3])


def test_minibatch_cka_of_one_batch_is_the_full_unbiased_cka():
    x, y = _pair(n=8, d1=3, d2=4, seed=5)
    k, l = x @ x.T, y @ y.T  # noqa: E741
    full = _brute_force_hsic(k, l) / math.sqrt(_brute_force_hsic(k, k) * _brute_force_hsic(l, l))
    assert minibatch_cka([x], [y]) == pytest.approx(full, rel=1e-9)


def test_minibatch_cka_over_many_batches_converges_to_the_full_data_value():
    # Y = [X, Z] with X, Z independent N(0, I_4): population linear CKA = sqrt(4 / (4 + 4)).
    rng = np.random.default_rng(0)
    n, d = 2048, 4
    x = rng.normal(size=(n, d))
    y = np.concatenate([x, rng.normal(size=(n, d))], axis=1)
    population = math.sqrt(0.5)
    full = minibatch_cka([x], [y])
    batched = minibatch_cka(np.split(x, 64), np.split(y, 64))  # 64 batches of 32
    # Equal-size batches: Σ of per-batch unbiased HSICs is a different estimator than one HSIC on
    # all rows, so the two differ, but both estimate the population value without bias.
    assert batched != full
    # Tolerance: over 30 data seeds at this size, the std of (batched − full) was 0.0031 (max |·|
    # 0.006) and of (full − population) about 0.007; 0.015 and 0.035 are ~5 standard deviations.
    assert batched == pytest.approx(full, abs=0.015)
    assert full == pytest.approx(population, abs=0.035)
    # The tolerance is tight enough to catch the naive alternative: averaging per-batch biased
    # linear CKA over small batches overestimates by > 0.1 here.
    naive = np.mean([linear_cka(a, b) for a, b in zip(np.split(x, 256), np.split(y, 256), strict=True)])
    assert abs(naive - full) > 0.05


def test_minibatch_accumulator_builds_the_layer_matrix():
    rng = np.random.default_rng(6)
    batches = []
    for _ in range(3):
        base = rng.normal(size=(20, 4))
        acts_a = [base, base @ rng.normal(size=(4, 7)) + rng.normal(size=(20, 7))]
        acts_b = [np.tanh(base), rng.normal(size=(20, 3)), base[:, :2]]
        batches.append((acts_a, acts_b))
    accumulator = MinibatchCKA(2, 3)
    for acts_a, acts_b in batches:
        accumulator.update(acts_a, acts_b)
    matrix = accumulator.compute()
    assert matrix.shape == (2, 3)
    for i, j in itertools.product(range(2), range(3)):
        expected = minibatch_cka([b[0][i] for b in batches], [b[1][j] for b in batches])
        assert matrix[i, j] == pytest.approx(expected, rel=1e-10)
    assert accumulator.n_batches == 3 and accumulator.n_samples == 60
    with pytest.raises(ValueError, match="expected 2 and 3 layers"):
        accumulator.update(batches[0][0][:1], batches[0][1])
    with pytest.raises(ValueError, match="same number of rows"):
        accumulator.update([a[:10] for a in batches[0][0]], batches[0][1])


# --------------------------------------------------------------------------- activations


def _encoder(seed: int) -> SwinEncoder:
    torch.manual_seed(seed)
    return SwinEncoder(TINY)


def test_token_positions_are_seeded_distinct_and_inside_the_grid():
    a = sample_token_positions((16, 16, 16), n_crops=3, max_tokens=50, seed=1)
    assert a.shape == (3, 50, 3)
    assert np.array_equal(a, sample_token_positions((16, 16, 16), 3, 50, seed=1))
    assert not np.array_equal(a, sample_token_positions((16, 16, 16), 3, 50, seed=2))
    assert a.min() >= 0 and a.max() < 16
    assert all(len({tuple(p) for p in crop}) == 50 for crop in a)
    assert sample_token_positions((2, 2, 2), 1, 50, seed=0).shape == (1, 8, 3)  # capped at the grid


def test_stage_activations_align_rows_across_stages():
    encoder = _encoder(0)
    encoder.train()
    crops = torch.rand(2, 1, 32, 32, 32)
    acts = stage_activations(encoder, crops, max_tokens=10, seed=0, batch_size=1)
    assert [tuple(a.shape) for a in acts] == [(20, c) for c in encoder.stage_channels]
    assert encoder.training  # mode restored
    # The 32³ bottleneck is one token per crop: every row of a crop is that token.
    bottleneck = acts[-1].reshape(2, 10, -1)
    assert torch.allclose(bottleneck, bottleneck[:, :1].expand_as(bottleneck))
    with torch.no_grad():
        encoder.eval()
        expected = encoder(crops)[-1].flatten(1)
    assert torch.allclose(bottleneck[:, 0], expected, atol=1e-5)
    # Row k is the same token in every stage: the patch embedding at the sampled positions.
    positions = sample_token_positions((16, 16, 16), 2, 10, seed=0)
    with torch.no_grad():
        embedding = encoder(crops)[0]
    first = embedding[0, :, positions[0, :, 0], positions[0, :, 1], positions[0, :, 2]].T
    assert torch.allclose(acts[0][:10], first, atol=1e-5)
    again = stage_activations(encoder, crops, max_tokens=10, seed=0, batch_size=2)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(acts, again, strict=True))


def test_cka_matrices_of_an_encoder_with_itself_have_a_unit_diagonal():
    encoder, other = _encoder(0), _encoder(1)
    crops = torch.rand(3, 1, 32, 32, 32)
    same = cka_matrices(encoder, encoder, crops, max_tokens=16, batch_size=2)
    assert same["n_rows"] == 48 and same["n_batches"] == 2  # 2 crops + 1 crop
    assert same["layers"] == list(LAYER_NAMES)
    for key in ("linear_cka", "minibatch_cka"):
        m = np.array(same[key], dtype=float)
        assert m.shape == (5, 5)
        assert np.allclose(np.diag(m), 1.0)
        assert np.allclose(m, m.T, atol=1e-9)
    assert same["reuse"] == {name: pytest.approx(1.0) for name in LAYER_NAMES}
    different = cka_matrices(encoder, other, crops, max_tokens=16, batch_size=2)
    linear = np.array(different["linear_cka"], dtype=float)
    assert np.all((linear >= 0) & (linear <= 1))
    assert linear[0, 0] < 0.99  # two random encoders do not share their patch embedding


def test_batch_bounds_keep_every_batch_large_enough_for_unbiased_hsic():
    assert batch_bounds(12, 4) == [0, 4, 8, 12]
    assert batch_bounds(10, 4) == [0, 4, 10]  # a last batch of 2 joins the previous one
    assert batch_bounds(6, 1) == [0, 6]
    assert batch_bounds(5, 100) == [0, 5]
    with pytest.raises(ValueError, match="at least 4 rows"):
        batch_bounds(3, 2)


# --------------------------------------------------------------------------- helpers of run_cka


def test_extract_crop_pads_outside_the_volume():
    image = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    crop = extract_crop(image, (0, 0, 0), 4, pad_value=-1.0)
    assert crop.shape == (4, 4, 4)
    assert np.array_equal(crop[2:, 2:, 2:], image[:2, :2, :2])
    assert np.all(crop[:2] == -1.0)
    inside = extract_crop(image, (2, 2, 3), 4, pad_value=-1.0)
    assert np.array_equal(inside[:, :4, :4], np.pad(image, 1, constant_values=-1)[1:5, 1:5, 2:6])


def test_preprocess_comes_from_the_checkpoint_meta():
    encoder_style = encoder_meta(
        method="simmim",
        family="mim",
        encoder=TINY,
        preprocess={"spacing": [2.0, 2.0, 3.0], "ct_window": [-100.0, 200.0], "orientation": "LPS"},
    )
    config = preprocess_from_meta(encoder_style, "enc.pt")
    assert config.spacing == (2.0, 2.0, 3.0) and config.ct_window == (-100.0, 200.0) and config.orientation == "LPS"
    segmenter_style = {"preprocess": PreprocessConfig(spacing=(1.0, 1.0, 1.0)).model_dump(mode="json")}
    assert preprocess_from_meta(segmenter_style, "seg.pt").spacing == (1.0, 1.0, 1.0)
    assert preprocess_from_meta({"method": "x"}, "old.pt") == PreprocessConfig()


# --------------------------------------------------------------------------- run_cka end to end


def _write_msd_task(root: Path, n_cases: int = 3, size: int = 32) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"))
    training = []
    for i in range(n_cases):
        centre = rng.integers(10, size - 10, size=3)
        organ = ((grid - centre[:, None, None, None]) ** 2).sum(0) < 36
        image = np.where(organ, 80.0, -50.0) + rng.normal(0.0, 10.0, size=(size,) * 3)
        name = f"case_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image.astype(np.int16), affine), root / "imagesTr" / name)
        nib.save(nib.Nifti1Image(organ.astype(np.uint8), affine), root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    dataset = {
        "name": "toy_organs",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "organ"},
        "numTraining": n_cases,
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(dataset))
    return root


def _save_tiny_encoder(path: Path, seed: int) -> SwinEncoder:
    encoder = _encoder(seed)
    meta = encoder_meta(method="simmim", family="mim", encoder=TINY, preprocess={"spacing": [1.5, 1.5, 1.5]})
    save_encoder(path, encoder, meta)
    return encoder


def _run(model_a: Path, model_b: Path, task: Path, out: Path, **options: object) -> dict:
    """``run_cka`` on a config of these models and task (paths as given: tmp_path is absolute)."""
    return run_cka(CKARunConfig(model_a=model_a, model_b=model_b, task=task, **options), out)


def test_run_cka_writes_matrices_with_a_unit_diagonal_for_the_same_model(tmp_path):
    task = _write_msd_task(tmp_path / "task")
    encoder = _save_tiny_encoder(tmp_path / "a.pt", seed=0)
    cache = tmp_path / "cache"
    kwargs = dict(n_crops=3, crop_size=32, batch_size=2, max_tokens=16, seed=0, cache_dir=cache)

    out = tmp_path / "runs" / "cka-simmim-same"
    results = _run(tmp_path / "a.pt", tmp_path / "a.pt", task, out, comparison="custom", **kwargs)
    stored = json.loads((out / "results.json").read_text())
    assert stored == json.loads(json.dumps(results))
    assert stored["kind"] == "cka" and stored["method"] == "simmim" and stored["task"] == "toy_organs"
    assert stored["layers"] == list(LAYER_NAMES) and stored["n_crops"] == 3
    for key in ("linear_cka", "minibatch_cka"):
        matrix = np.array(stored[key], dtype=float)
        assert matrix.shape == (5, 5)
        assert np.allclose(np.diag(matrix), 1.0)
    assert all(c["structure"] == 1 for c in stored["crops"])  # foreground-centred crops
    run = RunDir(out)
    assert run.status() == "finished"
    info = run.info()
    assert info["kind"] == "cka" and info["comparison"] == "custom" and info["run_id"] == out.name
    assert info["model_a"] == str((tmp_path / "a.pt").resolve()) and len(info["config_hash"]) == 12
    assert (out / "config.yaml").is_file()

    # Finished runs are returned as stored, never rewritten.
    mtime = (out / "results.json").stat().st_mtime_ns
    assert _run(tmp_path / "a.pt", tmp_path / "a.pt", task, out, **kwargs) == stored
    assert (out / "results.json").stat().st_mtime_ns == mtime

    # A fine-tuned segmenter is compared through its swinViT: same weights -> diagonal 1 again.
    segmenter = SwinSegmenter(TINY, out_channels=2, crop_size=32)
    segmenter.swinViT.load_state_dict(encoder.state_dict())
    seg_meta = {
        "encoder": TINY.model_dump(mode="json"),
        "out_channels": 2,
        "crop_size": 32,
        "norm": "auto",
        "method": "simmim",
        "family": "mim",
        "preprocess": PreprocessConfig().model_dump(mode="json"),
    }
    save_segmenter(tmp_path / "seg.pt", segmenter, seg_meta)
    vs_segmenter = _run(
        tmp_path / "a.pt",
        tmp_path / "seg.pt",
        task,
        tmp_path / "runs" / "cka-seg",
        comparison="pretrained_vs_finetuned",
        **kwargs,
    )
    assert vs_segmenter["model_b_kind"] == "segmenter"
    assert vs_segmenter["reuse"] == {name: pytest.approx(1.0) for name in LAYER_NAMES}
    assert vs_segmenter["crops"] == stored["crops"]  # the same fixed crops


def test_run_cka_rejects_a_file_that_is_no_model_and_records_the_failure(tmp_path):
    task = _write_msd_task(tmp_path / "task", n_cases=1)
    _save_tiny_encoder(tmp_path / "a.pt", seed=0)
    torch.save({"something": torch.zeros(1)}, tmp_path / "junk.pt")
    out = tmp_path / "runs" / "cka-bad"
    with pytest.raises(MedsslInputError, match="not an encoder checkpoint: no Swin encoder"):
        _run(tmp_path / "a.pt", tmp_path / "junk.pt", task, out, n_crops=2, max_tokens=8, cache_dir=tmp_path / "c")
    assert RunDir(out).status() == "failed"
    with pytest.raises(MedsslInputError, match="cases not in the task: nope"):
        _run(
            tmp_path / "a.pt",
            tmp_path / "a.pt",
            task,
            tmp_path / "runs" / "cka-case",
            n_crops=2,
            cases=["nope"],
            cache_dir=tmp_path / "c",
        )
    with pytest.raises(MedsslInputError, match="checkpoint file not found"):
        _run(tmp_path / "missing.pt", tmp_path / "a.pt", task, tmp_path / "runs" / "cka-missing", n_crops=2)


def test_minibatch_cka_of_a_deep_stage_with_a_large_common_mean_is_defined():
    """A 32³ crop has one stage-4 token, so a batch of 4 crops has 4 distinct rows, each repeated for every
    sampled position; with a common mean far above their spread the unbiased HSIC's terms (~||mean||^4)
    used to cancel to float64 noise <= 0, leaving a row of NaN. The estimator is shift-invariant: computed
    on centred features it is defined and equals the estimate of the same features without the mean."""
    rng = np.random.default_rng(0)
    spread = [rng.normal(scale=0.01, size=(4, 192)).repeat(64, axis=0) for _ in range(2)]
    offset = rng.normal(scale=50.0, size=(1, 192))
    other = [rng.normal(size=(256, 24)) for _ in range(2)]
    accumulator, centred = MinibatchCKA(1, 1), MinibatchCKA(1, 1)
    for batch, b in zip(spread, other, strict=True):
        accumulator.update([batch + offset], [b])
        centred.update([batch], [b])
    value = accumulator.compute()[0, 0]
    assert np.isfinite(value) and abs(value) <= 1  # unbiased: may be a little below 0 for unrelated features
    assert value == pytest.approx(centred.compute()[0, 0], rel=1e-6)
    assert accumulator.undefined() == ({}, {})


def test_minibatch_cka_names_the_layers_it_cannot_define():
    rng = np.random.default_rng(1)
    accumulator = MinibatchCKA(2, 1)
    for _ in range(2):
        one_token = np.repeat(rng.normal(size=(1, 8)), 16, axis=0)  # one crop per batch: one distinct row
        accumulator.update([rng.normal(size=(16, 8)), one_token], [rng.normal(size=(16, 4))])
    matrix = accumulator.compute()
    assert np.isfinite(matrix[0, 0]) and np.isnan(matrix[1, 0])
    rows, columns = accumulator.undefined()
    assert list(rows) == [1] and not columns
    assert "only 1 distinct rows" in rows[1] and "needs 4" in rows[1]
