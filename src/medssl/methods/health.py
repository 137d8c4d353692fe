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
    singular = torch.linalg.svdvals(rows)
    total = singular.sum()
    if not torch.isfinite(total):
        return rows.new_tensor(float("nan"))
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
            out.update({
                "health/teacher_entropy": per_sample,
                "health/teacher_batch_entropy": batch_mean,
                "health/teacher_entropy_ratio": per_sample / log_k,
                "health/teacher_batch_entropy_ratio": batch_mean / log_k,
            })
    return out
