"""Representation health: pure, detached diagnostics of what an SSL method trains.

Every method's ``forward`` puts ``**health_metrics(...)`` in its output dict; the training loop logs
every scalar of that dict per step (``metrics.jsonl``) and ``train/pretrain.py`` turns the logged
values into a verdict (``health_verdict``). Three kinds of signal, each on the tensor it is meaningful for:

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
    ``..._window_rank_ratio`` are reported (the rank :func:`health_verdict` uses); with an embedding,
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


# --------------------------------------------------------------------------- verdict
# What flags a run, and why (measured with ``benchmarks/health_calibration.py``: tiny preset, 32^3 crops,
# global batch 2, the phantom corpus; values at step 1 are the randomly initialised networks).

HEALTH_WINDOW = 3
"""The verdict reads the mean of the last this-many logged values of each key (one noisy step is no verdict)."""

SPREAD_FALL_LIMIT = 10.0
"""``health/embedding_std_scaled_start`` (the spread of the run's first steps) over the tail mean of
``health/embedding_std_scaled`` above this flags a collapsing student: its outputs are converging onto one
point, whatever their absolute spread (which depends on the head's width and the batch). Calibrated both ways
at demo scale (``SPREAD_FALL_CALIBRATION``, 40 steps, batch 4): at the shared lr 5e-4 the students of DINO,
iBOT and SMIT fall 125x, 87x and 22x (their teachers end at 0.998 log K, KL 0.05-0.06 nats), while DINO, iBOT
and SMIT at their own recipes (lr 7.8e-6) fall 1.5x, 0.9x and 1.0x and the other methods at 5e-4 at most 1.75x
(SimCLR; RotNet and SwinUNETR-SSL spread out, 0.2x and 0.7x). The limit lies 5.7x above the largest healthy
fall and 2.2x under the smallest collapse."""

SPREAD_FALL_CALIBRATION = (
    "benchmarks/health_calibration.py (40 steps, batch 4, 32^3, the demo's heads): see benchmarks/README.md"
)

TEACHER_UNINFORMATIVE = 0.99
"""A teacher whose per-sample entropy stays at or above this fraction of log K at every logged step of the
second half of the run (after the teacher-temperature warm-up and the first updates) gives the student a
near-uniform target whatever the input: the run's distillation was uninformative (``uninformative_distillation``
in the verdict: reported, not a collapse by itself; a student can keep its spread under such a teacher)."""

EMBEDDING_STD_FLOOR = 3e-3
"""``health/embedding_std_scaled`` below this flags collapse onto one point whatever the run's start (constant
embeddings read 0 to float precision). Recalibrated on healthy runs (``SPREAD_FALL_CALIBRATION``, 40 steps,
batch 4): the lowest value any healthy run logged at any step is 0.036 (SwinUNETR-SSL at lr 5e-4; RotNet's
4-way logits 0.08), the lowest healthy tail mean 0.12-0.14 (SMIT at its own recipe), while the collapsed
students end at 0.0018 (DINO) and 0.0026 (iBOT) and SMIT's at 0.006 (flagged by the fall). The floor lies 12x
under the lowest healthy step. (It was 1e-5, set from runs that had already collapsed, and flagged none.)"""

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
absorbs the near-identical outputs of a young encoder, so flagging it would flag them; it is a collapse once
the student matches it as well (``TEACHER_UNIFORM_COLLAPSE_CEIL``)."""

TEACHER_UNIFORM_COLLAPSE_CEIL = 0.999
TEACHER_STUDENT_KL_FLOOR = 0.01
"""Uniform collapse, DINO's other failure (Caron et al. 2021, section 5.3, Fig. 7: centring without enough
sharpening makes the output uniform whatever the input; collapse is where KL(teacher || student) reaches 0):
flagged when ``health/teacher_entropy_ratio`` is above ``TEACHER_UNIFORM_COLLAPSE_CEIL`` *and*
``health/teacher_student_kl`` below ``TEACHER_STUDENT_KL_FLOOR`` nats, i.e. every teacher row is uniform and
the student matches it, so no target is left. Measured (``benchmarks/pretrain_curves.py``, the demo's heads,
K = 1024, 32^3, batch 2): random init 0.72-0.74 log K; DINO at step 21 0.989 log K with KL 0.13 nats, step 41
0.9986 / 0.011, step 61 0.9995 / 0.003, steps 181-200 0.99999 / 1e-4 (its loss log K to four decimals), and
the same for iBOT and SMIT's global term; the 30-step runs end at 0.990-0.995 with KL 0.20-0.23 (not flagged).
A near-uniform teacher with a student still far from it is the early phase and only warns."""

FEATURE_STD_NOTE = 1e-3
"""``health/feature_std_scaled`` (pooled encoder features) is reported, never flagged: a randomly initialised
tiny Swin gives near-identical pooled features for different crops (0.11-0.54 at batch 2, where a spread-out
embedding reads about 1), and healthy 20-step runs went down to 0.010 (RotNet, DINO), so no floor separates
random init or healthy runs from collapse. Below this value the verdict adds a note."""

WINDOW_RANK_FLOOR = 1.5
"""``health/{embedding,feature}_window_rank`` (:class:`RankHistory`: centred unit rows of the last
``RANK_HISTORY_STEPS`` steps, reported once they hold ``RANK_HISTORY_MIN_ROWS`` independent rows) below this
flags dimensional collapse: the batch-to-batch differences of the embeddings use fewer than ~1.5 directions
(one direction reads 1, a collapse onto a point 1 by definition). Not read from a single batch, whose rank is
bounded by its 2-4 rows. Measured (``WINDOW_RANK_CALIBRATION``): the first reported value (step 3-8, near
random init) 3.1 (RotNet, whose 4-class logits bound it by 4) to 6.4; after 30 steps 3.4 (RotNet), 13.6
(SimMIM's features, bound 16), 24.6-37.5 of 48 for the others; DINO without centring at lr 1e-3: 10
(its collapse is onto one prototype, caught by the teacher entropy, not a dimensional one); embeddings that
vary along one direction read 1.00-1.05 (``tests/methods/test_health.py``)."""

WINDOW_RANK_CALIBRATION = (
    "benchmarks/pretrain_curves.py --short (the demo's phantom corpus and heads, 32^3, batch 2, 30 steps) and "
    "benchmarks/health_calibration.py --short: see benchmarks/README.md"
)

THRESHOLDS: dict[str, dict[str, Any]] = {
    "spread_fall_limit": {
        "key": "health/embedding_std_scaled_start / health/embedding_std_scaled",
        "flags": "above",
        "value": SPREAD_FALL_LIMIT,
        "why": "a student whose outputs converge onto one point; calibrated by " + SPREAD_FALL_CALIBRATION,
    },
    "window_rank_floor": {
        "key": "health/embedding_window_rank (health/feature_window_rank without an embedding)",
        "flags": "below",
        "value": WINDOW_RANK_FLOOR,
        "why": "embeddings varying along one direction only read 1; computed over the last "
        f"{RANK_HISTORY_STEPS} steps' within-batch-centred unit rows (>= {RANK_HISTORY_MIN_ROWS} rows), since "
        "one batch of 2-4 rows bounds the rank; calibrated by " + WINDOW_RANK_CALIBRATION,
    },
    "embedding_std_floor": {
        "key": "health/embedding_std_scaled",
        "flags": "below",
        "value": EMBEDDING_STD_FLOOR,
        "why": "constant embeddings read 0; the lowest healthy value measured (every method at demo scale, 40 "
        "steps, batch 4) was 0.036 at one step, collapsed students end at 0.0018-0.006; calibrated by "
        + SPREAD_FALL_CALIBRATION,
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
    "teacher_uniform_collapse": {
        "key": "health/teacher_entropy_ratio and health/teacher_student_kl",
        "flags": "above and below",
        "value": [TEACHER_UNIFORM_COLLAPSE_CEIL, TEACHER_STUDENT_KL_FLOOR],
        "why": "a uniform teacher that the student matches (KL near 0) is DINO's uniform collapse (paper section "
        "5.3); random init reads 0.72-0.74 log K, 30-step runs 0.990-0.995 with KL 0.20-0.23 nats, DINO after "
        "60-200 steps on the phantom corpus 0.9995-0.99999 with KL 3e-3 to 1e-4",
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


def _first(records: list[dict[str, Any]], key: str) -> float | None:
    for r in records:
        value = r.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            return float(value)
    return None


def _values(records: list[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in records if isinstance(r.get(key), int | float) and math.isfinite(r[key])]


def _uninformative_distillation(records: list[dict[str, Any]], reasons: list[str]) -> str | None:
    """A sentence when a teacher-student run's distillation carried no target, None otherwise (and without one)."""
    entropies = _values(records, "health/teacher_entropy_ratio")
    if not entropies:
        return None
    if reasons:
        return "the distillation was uninformative: the run collapsed (" + reasons[0].split(":")[0] + ")"
    second_half = entropies[len(entropies) // 2 :]
    if len(second_half) >= HEALTH_WINDOW and min(second_half) >= TEACHER_UNINFORMATIVE:
        return (
            f"the distillation was uninformative: the teacher stayed at >= {TEACHER_UNINFORMATIVE:g} log K "
            f"(lowest {min(second_half):.4f}) at every logged step of the run's second half, a near-uniform "
            "target whatever the input"
        )
    return None


def health_verdict(records: list[dict[str, Any]], window: int = HEALTH_WINDOW) -> dict[str, Any]:
    """The ``health`` block of a pretraining run's results from its logged metrics (``metrics.jsonl`` rows).

    ``collapsed`` is True when the embedding spread fell under ``EMBEDDING_STD_FLOOR`` or by more than
    ``SPREAD_FALL_LIMIT`` from the run's first steps, the batch-mean teacher entropy under
    ``TEACHER_BATCH_ENTROPY_FLOOR``, the teacher became uniform with the student matching it
    (``TEACHER_UNIFORM_COLLAPSE_CEIL``, ``TEACHER_STUDENT_KL_FLOOR``) or the window effective rank (of the
    embedding, else of the features) under ``WINDOW_RANK_FLOOR`` (each the mean of the last ``window`` logs),
    or a health value became non-finite. ``final`` holds every ``health/...`` key's tail mean; ``reasons`` why
    it is flagged, ``warnings`` what is worth a look but is seen in healthy short runs too;
    ``uninformative_distillation`` a sentence when a teacher-student run's distillation carried no target
    (collapsed, or a teacher at >= ``TEACHER_UNINFORMATIVE`` log K throughout), else None; ``thresholds`` the
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
    start = _first(records, "health/embedding_std_scaled_start")
    fall = start / spread if start is not None and spread is not None and spread > 0 else None
    if fall is not None and fall > SPREAD_FALL_LIMIT and not reasons:
        reasons.append(
            f"embedding spread fell {fall:.0f}x from the run's first steps ({start:.3g} -> {spread:.2e}; limit "
            f"{SPREAD_FALL_LIMIT:g}x): the student's outputs are converging onto one point"
        )
    batch_entropy = final.get("health/teacher_batch_entropy_ratio")
    if batch_entropy is not None and (not math.isfinite(batch_entropy) or batch_entropy < TEACHER_BATCH_ENTROPY_FLOOR):
        reasons.append(
            f"batch-mean teacher entropy {batch_entropy:.3f} log K < {TEACHER_BATCH_ENTROPY_FLOOR:g} log K: "
            "the teacher puts every sample on the same prototype"
        )
    for prefix in ("embedding", "feature"):
        rank = final.get(f"health/{prefix}_window_rank")
        if rank is not None and (not math.isfinite(rank) or rank < WINDOW_RANK_FLOOR):
            reasons.append(
                f"{prefix} effective rank over the last {RANK_HISTORY_STEPS} steps {rank:.2f} < "
                f"{WINDOW_RANK_FLOOR:g}: the {prefix}s vary along one direction (dimensional collapse)"
            )
            break
    uniform = final.get("health/teacher_entropy_ratio")
    kl = final.get("health/teacher_student_kl")
    if (
        uniform is not None
        and kl is not None
        and uniform > TEACHER_UNIFORM_COLLAPSE_CEIL
        and kl < TEACHER_STUDENT_KL_FLOOR
    ):
        reasons.append(
            f"per-sample teacher entropy {uniform:.5f} log K > {TEACHER_UNIFORM_COLLAPSE_CEIL:g} log K and "
            f"KL(teacher || student) {kl:.1e} < {TEACHER_STUDENT_KL_FLOOR:g} nats: teacher and student are "
            "uniform whatever the input (DINO's uniform collapse), no target is left"
        )
    elif uniform is not None and uniform > TEACHER_UNIFORM_CEIL:
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
        "spread_fall": fall,
        "uninformative_distillation": _uninformative_distillation(records, reasons),
        "final": final,
        "window": window,
        "thresholds": THRESHOLDS,
    }
