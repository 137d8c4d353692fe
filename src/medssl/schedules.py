"""Per-step schedules: learning rate, weight decay, EMA momentum, teacher temperatures, epoch-counted knobs.

Every schedule is a NumPy array with one value per optimiser step, precomputed once (DINO's ``main_dino.py``
habit: ``utils.cosine_scheduler`` returns the per-iteration array), so any step's value is an array look-up
(:func:`schedule_at`), identical after a resume and on every process. Pretraining and fine-tuning take their
learning rate and weight decay from :func:`lr_schedule` and :func:`weight_decay_schedule` (``train/step.py``
builds the optimiser with them); the SSL methods take their EMA momentum, teacher temperatures and masking
start from the functions below (``methods/``).

Epoch-counted knobs. The published recipes count warm-ups and starts in epochs of their own run (DINO's
teacher-temperature warm-up: 30 of 300 epochs); medssl trains by steps. :func:`published_fraction_steps` keeps
each knob's *fraction* of the published run: ``round(epochs / published_epochs * total_steps)``, so a run of
any length has the reference's schedule shape. :func:`corpus_epoch_steps` is the literal reading instead
(``round(epochs * steps_per_epoch)``, one epoch one pass over this run's corpus), which stretches the knobs
over a short run or a small corpus (30 epochs of a 77-epoch run are 39 % of it).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from medssl.config import ScheduleConfig

ShortRunWarmup = Literal["truncate", "compress"]


def cosine_schedule(
    base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """Per-step values: linear warm-up from ``warmup_start`` to ``base``, then cosine to ``final``."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(int(warmup_steps), total_steps)
    warm = np.linspace(warmup_start, base, warmup_steps, endpoint=False) if warmup_steps else np.array([])
    rest = total_steps - warmup_steps
    t = np.arange(rest)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / max(rest - 1, 1))) if rest > 1 else np.full(rest, base)
    return np.concatenate([warm, cos]).astype(np.float64)


def lr_schedule(schedule: ScheduleConfig, total_steps: int) -> np.ndarray:
    """The learning rate of every step of a run (pretraining and fine-tuning alike): linear warm-up from 0
    over ``schedule.warmup_steps``, then cosine from ``schedule.lr`` to ``schedule.min_lr``."""
    return cosine_schedule(schedule.lr, schedule.min_lr, total_steps, schedule.warmup_steps)


def weight_decay_schedule(schedule: ScheduleConfig, total_steps: int) -> np.ndarray:
    """The weight decay of every step: cosine from ``weight_decay`` to ``weight_decay_end`` (DINO's
    ``--weight_decay 0.04 -> --weight_decay_end 0.4``), constant when no end is given."""
    end = schedule.weight_decay if schedule.weight_decay_end is None else schedule.weight_decay_end
    return cosine_schedule(schedule.weight_decay, end, total_steps)


def linear_warmup_then_constant(
    start: float, end: float, warmup_steps: int, total_steps: int, short_run: ShortRunWarmup = "truncate"
) -> np.ndarray:
    """DINO's teacher temperature: linear from ``start`` to ``end`` over warm-up, then constant.

    A run shorter than the warm-up: ``truncate`` keeps the warm-up's slope and stops where the run
    ends, so every step has the value DINO's ``DINOLoss.teacher_temp_schedule`` gives it (DINO itself
    refuses such a run: its ``np.ones(nepochs - warmup_teacher_temp_epochs)`` is negative);
    ``compress`` squeezes the whole warm-up into the run, reaching ``end`` by its last step (medssl's
    schedule up to commit 7e8c2e7; no reference does this).
    """
    total_steps = max(int(total_steps), 1)
    warmup_steps = max(int(warmup_steps), 0)
    if short_run == "compress":
        warmup_steps = min(warmup_steps, total_steps)
    warm = np.linspace(start, end, warmup_steps)[:total_steps] if warmup_steps else np.array([])
    return np.concatenate([warm, np.full(total_steps - len(warm), end)]).astype(np.float64)


def held_then_warmed(
    start: float,
    end: float,
    hold_steps: int,
    warmup_steps: int,
    total_steps: int,
    short_run: ShortRunWarmup = "truncate",
) -> np.ndarray:
    """Per-step patch teacher temperature as iBOT's ``iBOTLoss.teacher_temp2_schedule`` (and SMIT's
    ``Cls_Patch_Loss``): ``start`` for ``hold_steps`` (the masked-prediction start), then linear to
    ``end`` over ``warmup_steps``, then ``end``; ``short_run`` as :func:`linear_warmup_then_constant`."""
    total_steps = max(int(total_steps), 1)
    hold = np.full(min(max(int(hold_steps), 0), total_steps), start, dtype=np.float64)
    if len(hold) == total_steps:
        return hold
    rest = linear_warmup_then_constant(start, end, warmup_steps, total_steps - len(hold), short_run)
    return np.concatenate([hold, rest])


def schedule_at(schedule: np.ndarray, step: int) -> float:
    """Value at ``step``, holding the last value past the end (for steps beyond the plan)."""
    return float(schedule[min(max(step, 0), len(schedule) - 1)])


EpochKnobs = Literal["published_fraction", "corpus_epochs"]
"""How a recipe's epoch counts become steps: the same fraction of the run as in the published run
(:func:`published_fraction_steps`), or passes over this run's corpus (:func:`corpus_epoch_steps`)."""


def published_fraction_steps(epochs: float, published_epochs: float, total_steps: int) -> int:
    """``epochs`` of a published run of ``published_epochs`` epochs as the same fraction of a run of
    ``total_steps`` steps (30 of 300 epochs: the first 10 % of the steps)."""
    return int(round(max(float(epochs), 0.0) / float(published_epochs) * max(int(total_steps), 1)))


def corpus_epoch_steps(epochs: float, steps_per_epoch: int) -> int:
    """``epochs`` passes over this run's corpus at ``steps_per_epoch`` steps each."""
    return int(round(max(float(epochs), 0.0) * max(int(steps_per_epoch), 1)))
