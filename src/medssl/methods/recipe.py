"""A pretraining run's operating point: what its optimiser, batch, run length and epoch-counted knobs resolve to,
and where each value comes from.

One function, :func:`operating_point`, read by the run itself (its results' ``optimiser`` block,
``train/pretrain.py``) and by the dry run (``medssl bench CONFIG --dry-run``, its recipe table and its
``--json`` plan), so the plan shows exactly what the runs record. The published recipes and their one
learning-rate rule are ``config.OptimiserRecipe`` and ``config.LR_SCALING_RULE``.
"""

from __future__ import annotations

import math
from typing import Any

from medssl.config import PretrainConfig
from medssl.methods.base import REGISTRY

FEW_NEGATIVES = 254
"""Fewer negatives than this are flagged as small: 254 is SimCLR at batch 128, the smallest batch of its
batch-size study (Chen et al. 2020, fig. 9), where accuracy has already fallen well below the batch-4096 value."""


def _sources(config: PretrainConfig) -> dict[str, str]:
    """Where lr, weight decay, warm-up and batch come from, one short phrase each."""
    recipe = config.published_recipe
    batch = "the benchmark's pretrain.schedule.batch_size (the hardware's, every method alike)"
    if config.recipe != "published" or recipe is None:
        shared = "the shared schedule (pretrain.schedule, every method alike)"
        lr = shared
        if config.shared_lr_scale != 1.0:
            lr = f"the shared schedule's lr x {config.shared_lr_scale:g} (the benchmark's methods[].lr_scale)"
        return {"lr": lr, "weight_decay": shared, "warmup": shared, "batch_size": batch}
    own = config.method.name
    lr = f"{recipe.lr_from}'s published point" if recipe.lr_from else f"{own}'s published point"
    return {
        "lr": f"{lr}, {recipe.lr_rule(config.schedule.batch_size)}: {recipe.sources.get('base_lr', '')}".rstrip(": "),
        "weight_decay": recipe.sources.get("weight_decay", f"{own}'s published recipe"),
        "warmup": f"{recipe.warmup_fraction:.3g} of the run ({recipe.sources.get('warmup_fraction', own)})",
        "batch_size": batch,
    }


def _shared_rule(config: PretrainConfig) -> str | None:
    """The shared recipe's lr rule when a benchmark scaled it for this method (None: the shared lr as given)."""
    return f"shared lr x {config.shared_lr_scale:g}" if config.shared_lr_scale != 1.0 else None


def operating_point(config: PretrainConfig, corpus_volumes: int | None = None) -> dict[str, Any]:
    """The run's optimiser and schedule as resolved, with their sources (the ``optimiser`` block of a pretraining
    run's results, and one row of the dry run's recipe table). ``corpus_volumes``: the corpus size when known,
    for the run length in epochs (one epoch = one region of every volume at the global batch) and for the knobs
    a ``corpus_epochs`` recipe counts in passes over the corpus."""
    schedule, recipe = config.schedule, config.published_recipe
    batch, steps = schedule.batch_size, schedule.steps
    cls = REGISTRY.get(config.method.name)
    negatives = cls.negatives_per_step(batch) if cls is not None else None
    steps_per_epoch = math.ceil(corpus_volumes / batch) if corpus_volumes else None
    knobs: dict[str, int] = {}
    if cls is not None and cls.trains:
        knobs = cls.knob_steps(cls.parse_params(config.method.options), steps, steps_per_epoch)
    return {
        "recipe": config.recipe,
        "optimizer": "AdamW",
        "lr": schedule.lr,
        "min_lr": schedule.min_lr,
        "weight_decay": schedule.weight_decay,
        "weight_decay_end": schedule.weight_decay if schedule.weight_decay_end is None else schedule.weight_decay_end,
        "betas": list(schedule.betas),
        "warmup_steps": schedule.warmup_steps,
        "grad_clip": schedule.grad_clip,
        "batch_size": batch,
        "steps": steps,
        "epochs": steps * batch / corpus_volumes if corpus_volumes else None,
        "corpus_volumes": corpus_volumes,
        "knob_steps": knobs,
        "negatives_per_step": negatives,
        "few_negatives": negatives is not None and negatives < FEW_NEGATIVES,
        "published_optimizer": recipe.published_optimizer if recipe else None,
        "published_batch_size": recipe.published_batch_size if recipe else None,
        "lr_rule": recipe.lr_rule(batch) if recipe else _shared_rule(config),
        "lr_from": (recipe.lr_from or config.method.name) if recipe else None,
        "sources": _sources(config),
    }
