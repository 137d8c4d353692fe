"""A CKA run: two models (encoder checkpoints or fine-tuned segmenters) compared stage by stage on
fixed crops of a task, the 5×5 matrices written to a run directory (``run_cka(config, run_dir)``).

The estimators are ``medssl.analysis.cka``, the activations ``medssl.analysis.activations``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from medssl.analysis.activations import layer_names, stage_activations
from medssl.analysis.cka import MinibatchCKA, batch_bounds, linear_cka
from medssl.config import CKARunConfig, PreprocessConfig, validate_config
from medssl.data.cache import VolumeCache
from medssl.data.tasks import load_task
from medssl.errors import MedsslInputError
from medssl.limits import set_limits
from medssl.models.checkpoint import load_segmenter, safe_torch_load
from medssl.models.encoder import SwinEncoder
from medssl.models.load import load_encoder
from medssl.runs import RunDir, RunWork, perform_run


def cka_matrices(
    encoder_a: SwinEncoder,
    encoder_b: SwinEncoder,
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
    rows_out, columns_out = accumulator.undefined()
    left_out = {f"A {names_a[i]}": why for i, why in rows_out.items()}
    left_out.update({f"B {names_b[j]}": why for j, why in columns_out.items()})
    return {
        "layers": names_a,
        "layers_b": names_b,
        "linear_cka": _to_json_matrix(linear),
        "minibatch_cka": _to_json_matrix(minibatch),  # null where undefined: see minibatch_cka_left_out
        "minibatch_cka_left_out": left_out,
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


def load_model_encoder(path: str | Path) -> tuple[SwinEncoder, dict[str, Any]]:
    """The Swin encoder inside an encoder checkpoint (``"encoder"``) or a fine-tuned segmenter
    (``"model"``: its ``swinViT``), with the checkpoint's metadata plus ``source_kind``."""
    payload = safe_torch_load(path)  # to tell the two apart; the loader reads it again and validates
    if isinstance(payload, dict) and "encoder" in payload:
        encoder, meta = load_encoder(path)
        return encoder, {**meta, "source_kind": "encoder"}
    if isinstance(payload, dict) and "model" in payload and "meta" in payload:
        model, meta = load_segmenter(path)
        return model.encoder, {**meta, "source_kind": "segmenter"}
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


def run_cka(config: CKARunConfig, run_dir: str | Path, device: str | torch.device | None = None) -> dict[str, Any]:
    """Compare ``config.model_a`` and ``config.model_b`` stage by stage on fixed crops of ``config.task``.

    Each model is an encoder checkpoint or a fine-tuned segmenter. Crops are preprocessed as
    model A was trained (its checkpoint metadata). Writes ``config.yaml``, ``run.json``,
    ``results.json`` (contracts.md format) into ``run_dir`` through the run lifecycle
    (``medssl.runs.perform_run``) and returns the results; a finished run is returned as stored.
    Raises ``RunLockedError`` when another process holds the run.

    The models and the task are read inside the work, under the run's lock (they are loaded once, by
    the process that holds the run): a file that is no model is recorded as the run's failure, and
    as a refused input it leaves the run directory unbound.
    """
    run = RunDir(run_dir)
    set_limits(config.limits)  # the run's own: a bench worker process does not inherit its parent's
    info = {
        "method": config.method,
        "task": config.task.name,
        "comparison": config.comparison,
        "model_a": str(config.model_a),
        "model_b": str(config.model_b),
    }
    return perform_run(
        run, config, lambda: RunWork("cka", info, lambda started: compare_models(config, run, device, started))
    )


def compare_models(
    config: CKARunConfig, run: RunDir, device: str | torch.device | None, started: float
) -> dict[str, Any]:
    """The work of a CKA run: load both models and the task's crops, and compare them stage by stage."""
    run.log(f"cka {config.comparison}: {config.model_a} vs {config.model_b}")
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
    cache = VolumeCache(config.cache_dir if config.cache_dir is not None else run.path / "cache")
    sampling = config.model_dump(include={"n_crops", "crop_size", "seed", "cases"})  # how the crops are drawn
    crops, origins = task_crops(task, cache, preprocess, **sampling)
    target = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
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
        "minibatch_cka_left_out": matrices["minibatch_cka_left_out"],
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
