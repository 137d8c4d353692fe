"""The collapse verdict of a pretraining run, read from the health values it logged (``methods/health.py``).

:func:`health_verdict` turns a run's ``metrics.jsonl`` rows into the ``health`` block of its results: whether it
collapsed and why, warnings, whether its distillation was informative, and the thresholds with the measurements
that justify each (``THRESHOLDS``; figures in benchmarks/README.md, ``health_calibration.py``).
"""

from __future__ import annotations

import math
from typing import Any

from medssl.methods.health import RANK_HISTORY_MIN_ROWS, RANK_HISTORY_STEPS, SPREAD_START_STEPS

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


def _start_spread(records: list[dict[str, Any]]) -> float | None:
    """The run's starting spread: ``health/embedding_std_scaled_start`` as first logged once its
    :data:`SPREAD_START_STEPS` steps are in (at a log interval of 1 its first values average fewer steps), from
    before any resume; the latest logged value while the run is shorter."""
    key, found = "health/embedding_std_scaled_start", None
    for r in records:
        value = r.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            found = float(value)
            if int(r.get("step", SPREAD_START_STEPS)) >= SPREAD_START_STEPS:
                return found
    return found


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
    start = _start_spread(records)
    fall = start / spread if start is not None and spread is not None and spread > 0 else None
    if fall is not None and fall > SPREAD_FALL_LIMIT:
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
