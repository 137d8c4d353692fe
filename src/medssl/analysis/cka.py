"""Centred kernel alignment (CKA) between the stages of two Swin encoders.

Two estimators, both on ``(n, d)`` representations whose rows are the same ``n`` examples:

* **linear CKA** (Kornblith et al. 2019): biased HSIC of linear kernels after centring,
  ``CKA = ||YᵀX||²_F / (||XᵀX||_F ||YᵀY||_F)`` on column-centred X, Y, computed in float64.
  It lies in [0, 1], equals 1 for identical representations and is invariant to orthogonal
  transforms and isotropic scaling of either side, but not to general invertible linear maps.
* **minibatch CKA** (Nguyen et al. 2021): per batch the unbiased HSIC estimator of Song et al.
  (2012) on linear Gram matrices, summed over batches,
  ``CKA = Σ HSIC₁(Kᵢ, Lᵢ) / sqrt(Σ HSIC₁(Kᵢ, Kᵢ) · Σ HSIC₁(Lᵢ, Lᵢ))``. Every batch term is an
  unbiased estimate of the population HSIC, so the ratio converges to the population CKA as the
  number of batches grows, while memory stays at one batch's Gram matrices.

``run_cka`` compares two models (encoder checkpoints or fine-tuned segmenters) stage by stage on
fixed crops of a task and writes the 5×5 matrices to a run directory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from medssl.config import CropSize, PreprocessConfig, StrictModel, config_hash, dump_yaml, validate_config
from medssl.errors import MedsslInputError, describe_error
from medssl.models.checkpoint import load_encoder, load_segmenter, safe_torch_load
from medssl.runs import RunDir
from medssl.version import code_version

LAYER_NAMES = ("patch_embed", "stage1", "stage2", "stage3", "stage4")
COMPARISONS = ("pretrained_vs_finetuned", "fewshot_vs_manyshot", "custom")
MIN_HSIC_SAMPLES = 4  # the unbiased estimator divides by n(n-3)


# --------------------------------------------------------------------------- estimators


def _representation(x: Tensor | np.ndarray, name: str) -> Tensor:
    t = torch.as_tensor(x).detach()
    if t.ndim != 2:
        raise ValueError(f"{name} must be a (n, d) matrix, got shape {tuple(t.shape)}")
    return t.to(torch.float64)


def linear_cka(x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> float:
    """Linear CKA of two representations of the same ``n`` examples (Kornblith et al. 2019).

    Returns NaN when either side has no variance (every row identical): its Gram matrix is zero
    after centring and similarity is undefined.
    """
    x = _representation(x, "x")
    y = _representation(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y need the same number of rows, got {x.shape[0]} and {y.shape[0]}")
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    # Feature-space form: d×d products instead of n×n Grams (n = crops × tokens is the large side).
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    denominator = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    if not torch.isfinite(denominator) or denominator <= 0:
        return float("nan")
    # Cauchy-Schwarz bounds the ratio by 1; only rounding can push it past (e.g. CKA(X, X)).
    return float(torch.clamp(cross / denominator, 0.0, 1.0))


class _GramStats:
    """A linear Gram matrix with its diagonal zeroed, plus the sums the unbiased HSIC needs."""

    def __init__(self, gram: Tensor) -> None:
        n = gram.shape[0]
        if gram.ndim != 2 or gram.shape[1] != n:
            raise ValueError(f"a Gram matrix must be square, got shape {tuple(gram.shape)}")
        if n < MIN_HSIC_SAMPLES:
            raise ValueError(f"unbiased HSIC needs at least {MIN_HSIC_SAMPLES} samples, got {n}")
        self.n = n
        self.gram = gram.to(torch.float64).clone()
        self.gram.fill_diagonal_(0.0)
        self.row_sums = self.gram.sum(dim=1)
        self.col_sums = self.gram.sum(dim=0)
        self.total = self.gram.sum()

    @classmethod
    def from_features(cls, x: Tensor | np.ndarray, name: str = "x") -> _GramStats:
        x = _representation(x, name)
        return cls(x @ x.T)


def _hsic_from_stats(k: _GramStats, l: _GramStats) -> float:  # noqa: E741 - K, L as in the papers
    if k.n != l.n:
        raise ValueError(f"Gram matrices of different sizes: {k.n} and {l.n}")
    n = k.n
    trace_kl = (k.gram * l.gram.T).sum()  # tr(K̃ L̃)
    sums = k.total * l.total / ((n - 1) * (n - 2))  # (1ᵀK̃1)(1ᵀL̃1) / ((n-1)(n-2))
    cross = 2.0 / (n - 2) * torch.dot(k.col_sums, l.row_sums)  # 2/(n-2) · 1ᵀK̃L̃1
    return float((trace_kl + sums - cross) / (n * (n - 3)))


def unbiased_hsic(k: Tensor | np.ndarray, l: Tensor | np.ndarray) -> float:  # noqa: E741
    """Unbiased HSIC estimator of two ``(n, n)`` kernel matrices (Song et al. 2012, eq. 5).

    ``HSIC₁ = [tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((n-1)(n-2)) − 2/(n-2)·1ᵀK̃L̃1] / (n(n-3))`` where K̃, L̃ are
    K, L with their diagonals set to zero. Needs n ≥ 4; can be slightly negative (it is unbiased,
    not non-negative).
    """
    return _hsic_from_stats(_GramStats(torch.as_tensor(k)), _GramStats(torch.as_tensor(l)))


def _ratio(cross: float | np.ndarray, self_a: float | np.ndarray, self_b: float | np.ndarray):
    """cross / sqrt(self_a · self_b), NaN where the denominator is not positive."""
    denominator = np.sqrt(np.clip(np.multiply(self_a, self_b), 0.0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.where(denominator > 0, np.asarray(cross) / np.where(denominator > 0, denominator, 1.0), np.nan)
    return value


class MinibatchCKA:
    """Streaming minibatch CKA between every layer of model A and every layer of model B.

    ``update(acts_a, acts_b)`` takes one batch: ``n_layers_a`` and ``n_layers_b`` matrices whose rows
    are the same ``n`` examples (n ≥ 4; d may differ per layer). ``compute()`` returns the
    ``(n_layers_a, n_layers_b)`` matrix. Only the running HSIC sums are kept between batches.
    """

    def __init__(self, n_layers_a: int, n_layers_b: int) -> None:
        if n_layers_a < 1 or n_layers_b < 1:
            raise ValueError("need at least one layer on each side")
        self.n_layers_a = n_layers_a
        self.n_layers_b = n_layers_b
        self.cross = np.zeros((n_layers_a, n_layers_b))
        self.self_a = np.zeros(n_layers_a)
        self.self_b = np.zeros(n_layers_b)
        self.n_batches = 0
        self.n_samples = 0

    def update(self, acts_a: Sequence[Tensor | np.ndarray], acts_b: Sequence[Tensor | np.ndarray]) -> None:
        if len(acts_a) != self.n_layers_a or len(acts_b) != self.n_layers_b:
            raise ValueError(
                f"expected {self.n_layers_a} and {self.n_layers_b} layers, got {len(acts_a)} and {len(acts_b)}"
            )
        grams_a = [_GramStats.from_features(a, f"layer a{i}") for i, a in enumerate(acts_a)]
        grams_b = [_GramStats.from_features(b, f"layer b{j}") for j, b in enumerate(acts_b)]
        sizes = {g.n for g in grams_a + grams_b}
        if len(sizes) != 1:
            raise ValueError(f"every layer of a batch needs the same number of rows, got {sorted(sizes)}")
        for i, ga in enumerate(grams_a):
            self.self_a[i] += _hsic_from_stats(ga, ga)
            for j, gb in enumerate(grams_b):
                self.cross[i, j] += _hsic_from_stats(ga, gb)
        for j, gb in enumerate(grams_b):
            self.self_b[j] += _hsic_from_stats(gb, gb)
        self.n_batches += 1
        self.n_samples += sizes.pop()

    def compute(self) -> np.ndarray:
        if self.n_batches == 0:
            raise ValueError("no batches were added")
        return _ratio(self.cross, self.self_a[:, None], self.self_b[None, :])


def minibatch_cka(batches_x: Iterable[Tensor | np.ndarray], batches_y: Iterable[Tensor | np.ndarray]) -> float:
    """Minibatch CKA (Nguyen et al. 2021) of paired batches ``(n_i, d1)`` and ``(n_i, d2)``.

    With a single batch this is the unbiased (full-data) CKA of that batch.
    """
    accumulator = MinibatchCKA(1, 1)
    for bx, by in zip(batches_x, batches_y, strict=True):
        accumulator.update([bx], [by])
    return float(accumulator.compute()[0, 0])


# --------------------------------------------------------------------------- activations


def sample_token_positions(grid: Sequence[int], n_crops: int, max_tokens: int, seed: int) -> np.ndarray:
    """``(n_crops, t, 3)`` token positions on the finest (patch-embedding) grid, distinct per crop.

    ``t = min(max_tokens, tokens in the grid)``; the positions depend only on the seed, the grid and
    the number of crops, so two models compared on the same crops see the same positions.
    """
    n_grid = int(np.prod(grid))
    t = min(int(max_tokens), n_grid)
    rng = np.random.default_rng(seed)
    flat = np.stack([rng.choice(n_grid, size=t, replace=False) for _ in range(n_crops)])
    return np.stack(np.unravel_index(flat, tuple(grid)), axis=-1)


def stage_activations(
    encoder: nn.Module,
    crops: Tensor,
    *,
    max_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 4,
) -> list[Tensor]:
    """The encoder's five outputs on ``crops`` (N, C, S, S, S) as ``(N·t, channels)`` float32 matrices.

    Rows are tokens at ``t`` seeded positions per crop, drawn on the patch-embedding grid; a
    coarser stage contributes the token whose cell contains that position. Why subsampling and
    not pooling: CKA needs row k to be the same example in every layer, and the five maps have
    grids S/2 … S/32. Pooling every map to the bottleneck grid keeps rows aligned but leaves one
    row per 32³ crop (too few rows for stable estimates with d up to 16·feature_size); sampling
    shared positions keeps the rows aligned across stages and models, gives ``t`` rows per crop
    and keeps the Gram matrices small (t=64, 16 crops: 1,024 rows). Caveat: a 32³ crop has a 1³
    bottleneck, so stage 4 then has only one distinct row per crop; use 64³+ crops or more crops
    when the stage-4 score matters.
    """
    if crops.ndim != 5:
        raise ValueError(f"crops must be (N, C, D, H, W), got shape {tuple(crops.shape)}")
    n = crops.shape[0]
    grid0 = [-(-s // _patch_size(encoder)) for s in crops.shape[2:]]
    positions = torch.from_numpy(sample_token_positions(grid0, n, max_tokens, seed))  # (n, t, 3)
    t = positions.shape[1]
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    per_layer: list[list[Tensor]] = []
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                batch = crops[start : start + batch_size].to(device=device, dtype=torch.float32)
                outputs = encoder(batch)
                pos = positions[start : start + batch_size]
                crop_index = torch.arange(batch.shape[0]).repeat_interleave(t)
                for layer, feat in enumerate(outputs):
                    grid = torch.tensor(feat.shape[2:])
                    # The cell of a coarser grid containing a patch token: floor(p · G_l / G_0).
                    idx = (pos * grid // torch.tensor(grid0)).reshape(-1, 3).to(feat.device)
                    rows = feat.permute(0, 2, 3, 4, 1)[crop_index.to(feat.device), idx[:, 0], idx[:, 1], idx[:, 2]]
                    if layer == len(per_layer):
                        per_layer.append([])
                    per_layer[layer].append(rows.float().cpu())
    finally:
        encoder.train(was_training)
    return [torch.cat(chunks) for chunks in per_layer]


def _patch_size(encoder: nn.Module) -> int:
    config = getattr(encoder, "config", None)
    if config is not None and hasattr(config, "patch_size"):
        return int(config.patch_size)
    return int(encoder.patch_embed.patch_size[0])


def layer_names(n_layers: int) -> list[str]:
    return list(LAYER_NAMES[:n_layers]) if n_layers <= len(LAYER_NAMES) else [f"layer{i}" for i in range(n_layers)]


def batch_bounds(n_rows: int, rows_per_batch: int) -> list[int]:
    """Row boundaries of consecutive minibatches; every batch has ≥ 4 rows (the unbiased HSIC's
    minimum): a last batch smaller than that joins the one before it."""
    if n_rows < MIN_HSIC_SAMPLES:
        raise ValueError(f"CKA needs at least {MIN_HSIC_SAMPLES} rows, got {n_rows} (more crops or tokens)")
    step = max(int(rows_per_batch), MIN_HSIC_SAMPLES)
    bounds = list(range(0, n_rows, step)) + [n_rows]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < MIN_HSIC_SAMPLES:
        bounds.pop(-2)
    return bounds


def cka_matrices(
    encoder_a: nn.Module,
    encoder_b: nn.Module,
    crops: Tensor,
    *,
    max_tokens: int = 64,
    batch_size: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """Layer × layer linear and minibatch CKA of two encoders on the same crops.

    ``linear_cka`` uses every row at once; ``minibatch_cka`` uses batches of ``batch_size`` crops
    (their tokens together). ``reuse`` is the diagonal of the linear matrix: how much each stage's
    representation survived from model A to model B. Values are Python floats (None for NaN).
    """
    acts_a = stage_activations(encoder_a, crops, max_tokens=max_tokens, seed=seed, batch_size=batch_size)
    if encoder_b is encoder_a:
        acts_b = acts_a
    else:
        acts_b = stage_activations(encoder_b, crops, max_tokens=max_tokens, seed=seed, batch_size=batch_size)
    n_rows = acts_a[0].shape[0]
    linear = np.array([[linear_cka(a, b) for b in acts_b] for a in acts_a])
    tokens_per_crop = n_rows // crops.shape[0]
    bounds = batch_bounds(n_rows, batch_size * tokens_per_crop)
    accumulator = MinibatchCKA(len(acts_a), len(acts_b))
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        accumulator.update([a[lo:hi] for a in acts_a], [b[lo:hi] for b in acts_b])
    minibatch = accumulator.compute()
    names_a, names_b = layer_names(len(acts_a)), layer_names(len(acts_b))
    return {
        "layers": names_a,
        "layers_b": names_b,
        "linear_cka": _to_json_matrix(linear),
        "minibatch_cka": _to_json_matrix(minibatch),
        "reuse": {name: _json_float(linear[i, i]) for i, name in enumerate(names_a) if i < len(names_b)},
        "n_rows": int(n_rows),
        "tokens_per_crop": int(tokens_per_crop),
        "n_batches": accumulator.n_batches,
    }


def _json_float(value: float) -> float | None:
    return None if not math.isfinite(float(value)) else float(value)


def _to_json_matrix(matrix: np.ndarray) -> list[list[float | None]]:
    return [[_json_float(v) for v in row] for row in matrix]


# --------------------------------------------------------------------------- models and crops


def load_model_encoder(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The Swin encoder inside an encoder checkpoint (``"encoder"``) or a fine-tuned segmenter
    (``"model"``: its ``swinViT``), with the checkpoint's metadata plus ``source_kind``."""
    payload = safe_torch_load(path)  # to tell the two apart; the loader reads it again and validates
    if isinstance(payload, dict) and "encoder" in payload:
        encoder, meta = load_encoder(path)
        return encoder, {**meta, "source_kind": "encoder"}
    if isinstance(payload, dict) and "model" in payload and "meta" in payload:
        model, meta = load_segmenter(path)
        return model.swinViT, {**meta, "source_kind": "segmenter"}
    encoder, meta = load_encoder(path)  # a MONAI SwinUNETR / research-contributions state dict, or a clear error
    return encoder, {**meta, "source_kind": "external"}


def preprocess_from_meta(meta: dict[str, Any], source: str | Path) -> PreprocessConfig:
    """The preprocessing a model was trained with: segmenter meta ``preprocess``, or encoder meta
    ``spacing`` + ``intensity``; the defaults where the checkpoint says nothing."""
    fields = set(PreprocessConfig.model_fields)
    data: dict[str, Any] = {}
    if isinstance(meta.get("preprocess"), dict):
        data.update({k: v for k, v in meta["preprocess"].items() if k in fields})
    else:
        if meta.get("spacing"):
            data["spacing"] = meta["spacing"]
        if isinstance(meta.get("intensity"), dict):
            data.update({k: v for k, v in meta["intensity"].items() if k in fields})
    return validate_config(PreprocessConfig, data, source)


def extract_crop(image: np.ndarray, centre: Sequence[int], size: int, pad_value: float) -> np.ndarray:
    """A ``size``³ crop centred on ``centre``; voxels outside the volume get ``pad_value``."""
    out = np.full((size, size, size), pad_value, dtype=np.float32)
    src, dst = [], []
    for axis, c in enumerate(centre):
        start = int(c) - size // 2
        lo, hi = max(start, 0), min(start + size, image.shape[axis])
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    out[tuple(dst)] = image[tuple(src)]
    return out


def task_crops(
    task: Any,
    cache: Any,
    preprocess: PreprocessConfig,
    *,
    n_crops: int,
    crop_size: int,
    seed: int,
    cases: Sequence[str] | None = None,
) -> tuple[Tensor, list[dict[str, Any]]]:
    """Fixed crops of a task's preprocessed volumes, ``(n_crops, 1, S, S, S)``, and where each came from.

    Cases in case-id order (or the ``cases`` given), crop k from case ``k mod n_cases``; each crop is
    centred on a foreground voxel of a structure chosen uniformly among those present (so small
    structures are seen), or on a uniform random voxel when the case has no foreground.
    Deterministic given the seed.
    """
    by_id = {c.case_id: c for c in sorted(task.cases, key=lambda c: c.case_id)}
    if cases is not None:
        unknown = [c for c in cases if c not in by_id]
        if unknown:
            raise MedsslInputError(task.root, f"cases not in the task: {', '.join(unknown[:5])}")
        selected = [by_id[c] for c in cases]
    else:
        selected = list(by_id.values())
    if not selected:
        raise MedsslInputError(task.root, "task has no cases to take CKA crops from")
    selected = selected[:n_crops]
    volumes = [cache.get(c.image, c.label, task.modality, preprocess, case_id=c.case_id) for c in selected]
    rng = np.random.default_rng(seed)
    crops, origins = [], []
    for k in range(n_crops):
        case, volume = selected[k % len(selected)], volumes[k % len(volumes)]
        image = volume.image()
        foreground = {int(cls): np.asarray(coords) for cls, coords in (volume.foreground() or {}).items()}
        present = sorted(cls for cls, coords in foreground.items() if len(coords))
        if present:
            structure = int(rng.choice(present))
            coords = foreground[structure]
            centre = coords[rng.integers(len(coords))]
        else:
            structure = 0
            centre = np.array([rng.integers(s) for s in image.shape])
        # Padding with the volume minimum matches the background of the normalised image.
        crops.append(extract_crop(image, centre, crop_size, volume.image_min))
        origins.append({"case": case.case_id, "structure": structure, "centre": [int(c) for c in centre]})
    return torch.from_numpy(np.stack(crops)[:, None]), origins


# --------------------------------------------------------------------------- the CKA run


class CKAConfig(StrictModel):
    """Everything that determines a CKA run's result (its hash is the run's ``config_hash``)."""

    model_a: Path
    model_b: Path
    task: Path
    n_crops: int = Field(16, ge=1)
    crop_size: CropSize = 32
    batch_size: int = Field(4, ge=1)
    max_tokens: int = Field(64, ge=1)
    seed: int = 0
    comparison: Literal["pretrained_vs_finetuned", "fewshot_vs_manyshot", "custom"] = "custom"
    method: str | None = None
    cases: list[str] | None = None


def run_cka(
    model_a: str | Path,
    model_b: str | Path,
    task: str | Path,
    out_dir: str | Path,
    *,
    n_crops: int = 16,
    crop_size: int = 32,
    batch_size: int = 4,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    comparison: str = "custom",
    method: str | None = None,
    max_tokens: int = 64,
    cases: Sequence[str] | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Compare two models stage by stage on fixed crops of ``task``; ``out_dir`` is the run directory.

    Each model is an encoder checkpoint or a fine-tuned segmenter. Crops are preprocessed as
    model A was trained (its checkpoint metadata). Writes ``config.yaml``, ``run.json``,
    ``results.json`` (contracts.md format) and returns the results; a finished run is returned
    as stored. Raises ``RunLockedError`` when another process holds the run.
    """
    config = validate_config(
        CKAConfig,
        {
            "model_a": Path(model_a).resolve(),
            "model_b": Path(model_b).resolve(),
            "task": Path(task).resolve(),
            "n_crops": n_crops,
            "crop_size": crop_size,
            "batch_size": batch_size,
            "max_tokens": max_tokens,
            "seed": seed,
            "comparison": comparison,
            "method": method,
            "cases": list(cases) if cases is not None else None,
        },
        "cka",
    )
    run = RunDir(out_dir)
    if run.is_finished():
        return run.results() or {}
    with run.lock():
        if run.is_finished():  # finished by another process between the check and the lock
            return run.results() or {}
        started = time.time()
        run.prepare(
            dump_yaml(config),
            {
                "kind": "cka",
                "run_id": run.id,
                "config_hash": config_hash(config),
                "created": run.info().get("created", started),
                "code_version": code_version(),
                "method": method,
                "task": config.task.name,
                "comparison": config.comparison,
                "model_a": str(config.model_a),
                "model_b": str(config.model_b),
            },
        )
        run.set_status("running")
        run.log(f"start cka {config.comparison}: {config.model_a} vs {config.model_b}")
        try:
            results = _compute_cka_run(config, run, cache_dir, device, started)
        except KeyboardInterrupt:
            run.set_status("pending", error="interrupted")
            run.log("interrupted")
            raise
        except BaseException as err:
            run.set_status("failed", error=describe_error(err))
            run.log(f"failed: {describe_error(err)}")
            raise
        run.write_results(results)
        run.set_status("finished")
        run.log("finished")
    return results


def _compute_cka_run(
    config: CKAConfig, run: RunDir, cache_dir: str | Path | None, device: str | torch.device | None, started: float
) -> dict[str, Any]:
    from medssl.data.cache import VolumeCache  # data layer; imported here so the estimators load alone
    from medssl.data.tasks import load_task

    encoder_a, meta_a = load_model_encoder(config.model_a)
    if config.model_b == config.model_a:  # a model against itself: one encoder, one forward pass
        encoder_b, meta_b = encoder_a, meta_a
    else:
        encoder_b, meta_b = load_model_encoder(config.model_b)
    for path, encoder in ((config.model_a, encoder_a), (config.model_b, encoder_b)):
        in_channels = encoder.patch_embed.proj.in_channels
        if in_channels != 1:
            raise MedsslInputError(path, f"CKA crops are single-channel; this encoder takes {in_channels} channels")
    task = load_task(config.task)
    method = config.method or meta_a.get("method") or meta_b.get("method") or "unknown"
    run.update_info(method=method, task=task.name)
    preprocess = preprocess_from_meta(meta_a, config.model_a)
    cache = VolumeCache(Path(cache_dir) if cache_dir is not None else run.path / "cache")
    crops, origins = task_crops(
        task,
        cache,
        preprocess,
        n_crops=config.n_crops,
        crop_size=config.crop_size,
        seed=config.seed,
        cases=config.cases,
    )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    target = torch.device(device)
    encoder_a.to(target)
    encoder_b.to(target)  # the same module again when comparing a model with itself: a no-op
    matrices = cka_matrices(
        encoder_a, encoder_b, crops, max_tokens=config.max_tokens, batch_size=config.batch_size, seed=config.seed
    )
    run.log(f"cka on {len(crops)} crops, {matrices['n_rows']} rows; reuse {matrices['reuse']}")
    return {
        "kind": "cka",
        "method": method,
        "task": task.name,
        "comparison": config.comparison,
        "layers": matrices["layers"],
        "linear_cka": matrices["linear_cka"],
        "minibatch_cka": matrices["minibatch_cka"],
        "reuse": matrices["reuse"],
        "model_a": str(config.model_a),
        "model_b": str(config.model_b),
        "model_a_kind": meta_a["source_kind"],
        "model_b_kind": meta_b["source_kind"],
        "n_crops": config.n_crops,
        "crop_size": config.crop_size,
        "tokens_per_crop": matrices["tokens_per_crop"],
        "n_rows": matrices["n_rows"],
        "n_batches": matrices["n_batches"],
        "preprocess": preprocess.model_dump(mode="json"),
        "crops": origins,
        "seed": config.seed,
        "wall_seconds": round(time.time() - started, 3),
    }
