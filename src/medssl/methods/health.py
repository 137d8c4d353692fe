"""Representation health: pure, detached diagnostics of what an SSL method trains.

Every method's ``forward`` puts ``**health_metrics(...)`` in its output dict; the training loop logs
every scalar of that dict per step (``metrics.jsonl``) and ``train/pretrain.py`` turns the logged
values into a verdict (``health_verdict``). Three signals, each on the tensor it is meaningful for:

- **Effective rank** (RankMe, Garrido et al. 2023, "RankMe: Assessing the downstream performance of
  pretrained self-supervised representations by their rank", eq. 1): ``exp(H(p))`` with
  ``p_k = s_k / sum(s) + eps`` over the singular values ``s`` of the (uncentred) batch matrix. It lies in
  ``[1, min(B, d)]``: 1 when every row is the same vector (or all rows are parallel), ``min(B, d)`` when the
  rows are orthogonal with equal norms. It is bounded by the batch size, so with the few-sample batches of a
  3D pretraining step it is reported beside ``*_rank_ratio = rank / min(B, d)`` (1 is full rank).
- **Normalised-embedding spread** (SimSiam, Chen & He 2021, §4.1): the mean over dimensions of the
  per-dimension standard deviation of the L2-normalised rows. Healthy embeddings spread over the sphere read
  about ``1 / sqrt(d)``; collapse onto one point reads 0. Reported raw (``*_std``) and times ``sqrt(d)``
  (``*_std_scaled``, about 1 when healthy whatever ``d``).
- **Teacher entropy** for teacher-student methods: the mean per-sample entropy of the teacher distribution
  (``log K`` when the teacher is uniform, DINO's "uniform" failure) and the entropy of the batch-mean
  distribution (0 when every sample sits on one prototype, DINO's "one dimension dominates" failure; Caron et
  al. 2021, §5.3 and fig. 7). Both are also given divided by ``log K`` (``*_ratio``).

All values are float32 scalar tensors, detached from the graph; a tensor with more than two dimensions is read
as rows of its last dimension (tokens of a patch head count as samples).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

RANKME_EPS = 1e-7
"""The ``epsilon`` RankMe adds to the normalised singular values (Garrido et al. 2023, eq. 1)."""


def _rows(x: Tensor) -> Tensor:
    x = x.detach().float()
    if x.ndim == 1:
        return x.unsqueeze(0)
    return x.reshape(-1, x.shape[-1])


def effective_rank(x: Tensor) -> Tensor:
    """RankMe's effective rank ``exp(-sum p_k log p_k)``, ``p = s / ||s||_1 + eps``, of the rows of ``x``.

    1 for identical (or parallel) rows, ``min(B, d)`` for orthogonal rows of equal norm, 0 for an all-zero
    matrix (no direction at all)."""
    rows = _rows(x)
    if not torch.isfinite(rows).all():  # the SVD would raise; the loop reports the non-finite loss itself
        return rows.new_tensor(float("nan"))
    singular = torch.linalg.svdvals(rows)
    total = singular.sum()
    if total <= 0:
        return rows.new_tensor(0.0)
    p = singular / total + RANKME_EPS
    return torch.exp(-(p * p.log()).sum())


def normalised_std(x: Tensor) -> Tensor:
    """Mean per-dimension std of the L2-normalised rows of ``x``: about ``1/sqrt(d)`` healthy, 0 collapsed,
    NaN with fewer than two rows (no spread to measure)."""
    rows = _rows(x)
    if rows.shape[0] < 2:
        return rows.new_tensor(float("nan"))
    unit = torch.nn.functional.normalize(rows, dim=1)
    return unit.std(dim=0).mean()


def entropy(probs: Tensor) -> Tensor:
    """Entropy ``-sum_k p_k log p_k`` of each row of ``probs`` (0 log 0 = 0), as a tensor of rows."""
    return torch.special.entr(_rows(probs)).sum(dim=-1)


def _vector_health(prefix: str, x: Tensor) -> dict[str, Tensor]:
    rows = _rows(x)
    rank = effective_rank(rows)
    std = normalised_std(rows)
    return {
        f"health/{prefix}_rank": rank,
        f"health/{prefix}_rank_ratio": rank / min(rows.shape),
        f"health/{prefix}_std": std,
        f"health/{prefix}_std_scaled": std * math.sqrt(rows.shape[1]),
    }


def health_metrics(
    embedding: Tensor | None = None, features: Tensor | None = None, teacher_probs: Tensor | None = None
) -> dict[str, Tensor]:
    """Detached health scalars under ``health/...`` keys for whatever is given.

    ``embedding`` (B, d): the vector the method's loss is computed on (projector/head output before
    normalisation) -> ``health/embedding_{rank,rank_ratio,std,std_scaled}``.
    ``features`` (B, C): the pooled encoder features -> ``health/feature_{rank,rank_ratio,std,std_scaled}``.
    ``teacher_probs`` (B, K): the teacher distribution after centring and temperature ->
    ``health/teacher_entropy`` (mean per-sample), ``health/teacher_batch_entropy`` (entropy of the batch mean)
    and both divided by ``log K`` (``health/teacher_entropy_ratio``, ``health/teacher_batch_entropy_ratio``).
    """
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        if embedding is not None:
            out.update(_vector_health("embedding", embedding))
        if features is not None:
            out.update(_vector_health("feature", features))
        if teacher_probs is not None:
            probs = _rows(teacher_probs)
            log_k = math.log(probs.shape[1]) if probs.shape[1] > 1 else float("nan")
            per_sample = entropy(probs).mean()
            batch_mean = entropy(probs.mean(dim=0)).squeeze(0)
            out.update(
                {
                    "health/teacher_entropy": per_sample,
                    "health/teacher_batch_entropy": batch_mean,
                    "health/teacher_entropy_ratio": per_sample / log_k,
                    "health/teacher_batch_entropy_ratio": batch_mean / log_k,
                }
            )
    return out


# --------------------------------------------------------------------------- verdict
# What flags a run, and why (measured with ``benchmarks/health_calibration.py``: tiny preset, 32^3 crops,
# global batch 2, the phantom corpus; values at step 1 are the randomly initialised networks).

HEALTH_WINDOW = 3
"""The verdict reads the mean of the last this-many logged values of each key (one noisy step is no verdict)."""

EMBEDDING_STD_FLOOR = 1e-5
"""``health/embedding_std_scaled`` below this flags collapse onto one point. Constant embeddings read 0 (to
float precision). Measured at batch 2 (tiny preset, 32^3, lr 5e-4): random init 0.10 (RotNet's 4-way logits)
to 1.4 (MoCo v3); after 20 steps SimCLR 0.59, MoCo v3 1.41, BYOL 0.82, SwinUNETR-SSL 0.028, RotNet 0.059,
while the teacher-student heads shrink fast at this scale: DINO 0.0021, iBOT 0.0034, SMIT 0.0030 (single
steps down to 6e-4). The floor lies about two orders of magnitude under the lowest healthy value."""

TEACHER_BATCH_ENTROPY_FLOOR = 0.01
"""``health/teacher_batch_entropy_ratio`` (entropy of the batch-mean teacher distribution / log K) below this
flags DINO's collapse onto one prototype, where it reads 0 (DINO without centring driven with tau_t 0.02 and
lr 5e-3: 0.0 from the third step). At random init it is 0.29-0.31 for DINO, iBOT and SMIT at the published
tau_t 0.04 (0.05 at tau_t 0.02: a randomly initialised encoder gives near-identical outputs, so the sharpened
teacher is already peaked), and 0.98-0.99 after 20 centred steps. Caveat measured: at the published lr 5e-4,
DINO without centring had not collapsed after 20 steps (0.39, against 0.98 centred); that collapse takes
longer than a short run and is flagged when it happens."""

TEACHER_UNIFORM_CEIL = 0.99
"""``health/teacher_entropy_ratio`` above this (every sample's teacher near uniform) is reported as a warning,
not a collapse: short healthy runs of DINO, iBOT and SMIT reach 0.987-0.989 after 20 steps while the centre
absorbs the near-identical outputs of a young encoder, so flagging it would flag them."""

FEATURE_STD_NOTE = 1e-3
"""``health/feature_std_scaled`` (pooled encoder features) is reported, never flagged: a randomly initialised
tiny Swin gives near-identical pooled features for different crops (0.11-0.54 at batch 2, where a spread-out
embedding reads about 1), and healthy 20-step runs went down to 0.010 (RotNet, DINO), so no floor separates
random init or healthy runs from collapse. Below this value the verdict adds a note."""

THRESHOLDS: dict[str, dict[str, Any]] = {
    "embedding_std_floor": {
        "key": "health/embedding_std_scaled",
        "flags": "below",
        "value": EMBEDDING_STD_FLOOR,
        "why": "constant embeddings read 0; the lowest healthy value measured (random init and 20-step runs of "
        "every method, tiny preset, 32^3, batch 2) was 6e-4 (DINO's head output)",
    },
    "teacher_batch_entropy_floor": {
        "key": "health/teacher_batch_entropy_ratio",
        "flags": "below",
        "value": TEACHER_BATCH_ENTROPY_FLOOR,
        "why": "the batch-mean teacher distribution on one prototype (DINO without centring) reads 0; random "
        "init reads 0.29-0.31 at tau_t 0.04 (0.05 at 0.02), healthy 20-step runs 0.98",
    },
    "teacher_uniform_warning": {
        "key": "health/teacher_entropy_ratio",
        "flags": "above (warning only)",
        "value": TEACHER_UNIFORM_CEIL,
        "why": "a uniform teacher carries no target; short healthy runs pass through it, so it only warns",
    },
    "feature_std_note": {
        "key": "health/feature_std_scaled",
        "flags": "below (note only)",
        "value": FEATURE_STD_NOTE,
        "why": "random-init pooled Swin features are near-identical across crops, so this cannot flag",
    },
}


def _tail_mean(records: list[dict[str, Any]], key: str, window: int) -> float | None:
    values = [float(r[key]) for r in records if isinstance(r.get(key), int | float)]
    if not values:
        return None
    recent = values[-window:]
    return sum(recent) / len(recent)


def health_verdict(records: list[dict[str, Any]], window: int = HEALTH_WINDOW) -> dict[str, Any]:
    """The ``health`` block of a pretraining run's results from its logged metrics (``metrics.jsonl`` rows).

    ``collapsed`` is True when the embedding spread fell under ``EMBEDDING_STD_FLOOR`` or the batch-mean
    teacher entropy under ``TEACHER_BATCH_ENTROPY_FLOOR`` (each the mean of the last ``window`` logs), or a
    health value became non-finite. ``final`` holds every ``health/...`` key's tail mean; ``reasons`` why it
    is flagged, ``warnings`` what is worth a look but is seen in healthy short runs too; ``thresholds`` the
    constants and their justification. A run that logged no health (random init, zero steps) is not assessed.
    """
    keys = sorted({k for r in records for k in r if k.startswith("health/")})
    final = {k: _tail_mean(records, k, window) for k in keys}
    reasons: list[str] = []
    warnings: list[str] = []
    spread = final.get("health/embedding_std_scaled")
    if spread is not None and (not math.isfinite(spread) or spread < EMBEDDING_STD_FLOOR):
        reasons.append(
            f"embedding spread (std of L2-normalised embeddings x sqrt(d)) {spread:.2e} < "
            f"{EMBEDDING_STD_FLOOR:g}: the embeddings collapsed onto one point"
        )
    batch_entropy = final.get("health/teacher_batch_entropy_ratio")
    if batch_entropy is not None and (not math.isfinite(batch_entropy) or batch_entropy < TEACHER_BATCH_ENTROPY_FLOOR):
        reasons.append(
            f"batch-mean teacher entropy {batch_entropy:.3f} log K < {TEACHER_BATCH_ENTROPY_FLOOR:g} log K: "
            "the teacher puts every sample on the same prototype"
        )
    uniform = final.get("health/teacher_entropy_ratio")
    if uniform is not None and uniform > TEACHER_UNIFORM_CEIL:
        warnings.append(
            f"per-sample teacher entropy {uniform:.3f} log K > {TEACHER_UNIFORM_CEIL:g} log K: the "
            "teacher is near uniform (common early in a run; a collapse if it persists)"
        )
    features = final.get("health/feature_std_scaled")
    if features is not None and features < FEATURE_STD_NOTE:
        warnings.append(
            f"pooled encoder features spread {features:.3f} < {FEATURE_STD_NOTE:g}: near-identical "
            "for different crops (as at random init)"
        )
    return {
        "assessed": bool(keys),
        "collapsed": bool(reasons),
        "reason": "; ".join(reasons) or None,
        "reasons": reasons,
        "warnings": warnings,
        "final": final,
        "window": window,
        "thresholds": THRESHOLDS,
    }
