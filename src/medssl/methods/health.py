"""Representation health: pure, detached diagnostics of what an SSL method trains.

Every method's ``forward`` puts these in its output dict (``SSLMethod.outputs``); the training loop logs
every scalar of that dict per step (``metrics.jsonl``) and ``train/pretrain.py`` turns the logged values into
a verdict (``methods/verdict.py``). Three kinds of signal, each on the tensor it is meaningful for:

- **Effective rank** (RankMe, Garrido et al. 2023, "RankMe: Assessing the downstream performance of
  pretrained self-supervised representations by their rank", eq. 1): ``exp(H(p))`` with
  ``p_k = s_k / sum(s) + eps`` over the singular values ``s`` of the (uncentred) batch matrix. It lies in
  ``[1, min(B, d)]``: 1 when every row is the same vector (or all rows are parallel), ``min(B, d)`` when the
  rows are orthogonal with equal norms. It is bounded by the batch size, so with the few-sample batches of a
  3D pretraining step it is reported beside ``*_rank_ratio = rank / min(B, d)`` (1 is full rank), and the
  verdict uses the **window rank** instead (:class:`RankHistory`: the same effective rank over the last
  :data:`RANK_HISTORY_STEPS` steps' within-batch-centred unit rows, ``*_window_rank``), which counts the
  directions the embeddings vary along beyond the batch size: 1 flags dimensional collapse.
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


def singular_values(rows: Tensor) -> Tensor:
    """Singular values of a (n, d) matrix from the eigenvalues of its double-precision Gram matrix on the
    smaller side (``sqrt(eig(X X^T))``): the values of ``torch.linalg.svdvals`` to about 1e-7 relative to
    the largest (float32 rows), at a fraction of its cost for wide matrices (a (64, 65536) window: 13 ms
    against 570 ms on one CPU thread; issue #10), returned as float32."""
    x = rows.double()
    gram = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x
    eig = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0.0)
    return eig.sqrt().to(rows.dtype)


def effective_rank(x: Tensor) -> Tensor:
    """RankMe's effective rank ``exp(-sum p_k log p_k)``, ``p = s / ||s||_1 + eps``, of the rows of ``x``.

    1 for identical (or parallel) rows, ``min(B, d)`` for orthogonal rows of equal norm, 0 for an all-zero
    matrix (no direction at all)."""
    rows = _rows(x)
    if not torch.isfinite(rows).all():  # the SVD would raise; the loop reports the non-finite loss itself
        return rows.new_tensor(float("nan"))
    singular = singular_values(rows)
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


RANK_HISTORY_STEPS = 16
"""Steps of embeddings :class:`RankHistory` keeps (the window its effective rank is computed over)."""

RANK_HISTORY_MIN_ROWS = 8
"""Fewest independent rows (sum over the window of batch rows - 1) before the window rank is reported:
with fewer, a healthy run cannot read far from 1 and the value means nothing."""

SPREAD_RESOLUTION = 1e-6
"""Below this RMS norm of a step's centred unit rows (float32 resolution of unit vectors) the step has no
direction to count; a window of such steps reads rank 1 (every row the same point)."""


SPREAD_START_STEPS = 3
"""Steps whose embedding spread :class:`RankHistory` averages as the run's starting spread (the randomly
initialised student and its first updates), which the verdict compares the end of the run with."""


class RankHistory:
    """A rolling buffer of the last :data:`RANK_HISTORY_STEPS` steps' embeddings for an effective rank that a
    two-sample batch does not bound, and the embedding spread of the run's first :data:`SPREAD_START_STEPS`
    steps (``health/embedding_std_scaled_start``, logged with every step so the verdict can read it whatever
    the logging interval; after a resume the verdict keeps the first run's value, the first one logged).

    RankMe on one step's batch lies in ``[1, B]`` (2 at the batch of a 3D step), so it cannot tell a healthy
    run from one whose embeddings vary along one direction only (dimensional collapse, Jing et al. 2022,
    "Understanding dimensional collapse in contrastive self-supervised learning", §3). Each step's rows are
    L2-normalised and centred on that step's batch mean (so the drift of the weights between steps, one
    direction per step, is not counted as spread) and scaled to unit RMS row norm (every step weighs the
    same, whatever its spread); the window stacks them and RankMe's effective rank
    (:func:`effective_rank`) of the stack counts the directions the batch-to-batch differences use, up to
    ``sum(B_step - 1)`` over the window. Departure from RankMe (which takes the uncentred matrix of one large
    set of embeddings from one network): centred rows from the networks of the last steps; named
    ``*_window_rank``. Not part of the state dict: after a resume the window fills again.
    """

    def __init__(self, steps: int = RANK_HISTORY_STEPS, min_rows: int = RANK_HISTORY_MIN_ROWS) -> None:
        self.steps = steps
        self.min_rows = min_rows
        self._rows: list[Tensor] = []
        self._start_spread: list[float] = []

    def clear(self) -> None:
        """Forget every step recorded (a forward that was no training step, e.g. the FLOP count's)."""
        self._rows.clear()
        self._start_spread.clear()

    def start_spread(self, spread: Tensor) -> Tensor:
        """Record ``spread`` while fewer than :data:`SPREAD_START_STEPS` steps are recorded (one host transfer
        each, then none) and return the mean of those recorded: the run's starting spread."""
        if len(self._start_spread) < SPREAD_START_STEPS and bool(torch.isfinite(spread)):
            self._start_spread.append(float(spread))
        if not self._start_spread:
            return spread.new_tensor(float("nan"))
        return spread.new_tensor(sum(self._start_spread) / len(self._start_spread))

    def add(self, x: Tensor) -> None:
        """Append one step's rows (detached, float32, on their device); the oldest step leaves a full window."""
        rows = _rows(x)
        if rows.shape[0] < 2 or not torch.isfinite(rows).all():
            return
        unit = torch.nn.functional.normalize(rows, dim=1)
        centred = unit - unit.mean(dim=0, keepdim=True)
        scale = centred.pow(2).sum(dim=1).mean().sqrt()
        # Each step scaled to unit RMS row norm, so that the step with the largest spread (the first,
        # often) does not decide the directions; a step without spread adds no direction.
        self._rows.append(centred / scale if scale >= SPREAD_RESOLUTION else torch.zeros_like(centred))
        del self._rows[: -self.steps]

    def independent_rows(self) -> int:
        return sum(r.shape[0] - 1 for r in self._rows)

    def rank(self) -> tuple[Tensor, Tensor] | None:
        """(effective rank, rank / min(independent rows, d)) of the window, None while it holds fewer than
        ``min_rows`` independent rows."""
        n = self.independent_rows()
        if n < self.min_rows:
            return None
        stack = torch.cat(self._rows)
        bound = min(n, stack.shape[1])
        rank = effective_rank(stack) if bool(stack.any()) else stack.new_tensor(1.0)
        return rank, rank / bound


def health_metrics(
    embedding: Tensor | None = None,
    features: Tensor | None = None,
    teacher_probs: Tensor | None = None,
    history: RankHistory | None = None,
    distillation_ce: Tensor | None = None,
) -> dict[str, Tensor]:
    """Detached health scalars under ``health/...`` keys for whatever is given.

    ``embedding`` (B, d): the vector the method's loss is computed on (projector/head output before
    normalisation) -> ``health/embedding_{rank,rank_ratio,std,std_scaled}``.
    ``features`` (B, C): the pooled encoder features -> ``health/feature_{rank,rank_ratio,std,std_scaled}``.
    ``teacher_probs`` (B, K): the teacher distribution after centring and temperature ->
    ``health/teacher_entropy`` (mean per-sample), ``health/teacher_batch_entropy`` (entropy of the batch mean)
    and both divided by ``log K`` (``health/teacher_entropy_ratio``, ``health/teacher_batch_entropy_ratio``).
    ``distillation_ce`` (with ``teacher_probs``): the distillation cross-entropy computed on those teacher
    probabilities, every teacher row used equally often (DINO's pairs of different views) ->
    ``health/teacher_student_kl`` = cross-entropy - mean teacher entropy, the mean KL(teacher || student)
    (the quantity DINO's paper, section 5.3 and Fig. 7, reads with the teacher entropy to see collapse).
    ``history``: the method's :class:`RankHistory`; the embedding (the features when there is none, SimMIM)
    is added to it and, once it holds enough rows, ``health/{embedding,feature}_window_rank`` and
    ``..._window_rank_ratio`` are reported (the rank ``methods/verdict.py`` uses); with an embedding,
    ``health/embedding_std_scaled_start`` is the spread of the run's first steps.
    """
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        if embedding is not None:
            out.update(_vector_health("embedding", embedding))
            if history is not None:
                out["health/embedding_std_scaled_start"] = history.start_spread(out["health/embedding_std_scaled"])
        if features is not None:
            out.update(_vector_health("feature", features))
        tracked = embedding if embedding is not None else features
        if history is not None and tracked is not None:
            history.add(tracked)
            window = history.rank()
            if window is not None:
                prefix = "embedding" if embedding is not None else "feature"
                out[f"health/{prefix}_window_rank"], out[f"health/{prefix}_window_rank_ratio"] = window
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
            if distillation_ce is not None:
                out["health/teacher_student_kl"] = distillation_ce.detach().float() - per_sample
    return out
