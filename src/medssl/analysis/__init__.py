"""Analyses of finished runs: convergence, few/many-shot gap, CT vs MRI, statistics, and CKA.

The table-based analyses are re-exported here; they need pandas/scipy only. CKA needs torch:
its estimators are ``medssl.analysis.cka``, encoder activations ``medssl.analysis.activations`` and a
CKA run (models, crops, run directory) ``medssl.analysis.cka_run`` (kept out of this module so the
report loads fast).
"""

from medssl.analysis.convergence import convergence_summary, convergence_table, normalised_auc, steps_to_fraction
from medssl.analysis.gap import budget_key, few_many_gap, gap_ranks, modality_summary, order_budgets, run_means
from medssl.analysis.stats import (
    bootstrap_ci,
    cliques,
    critical_difference_plot,
    friedman_ranks,
    nemenyi_cd,
    paired_wilcoxon,
    per_case_scores,
)

__all__ = [
    "bootstrap_ci",
    "budget_key",
    "cliques",
    "convergence_summary",
    "convergence_table",
    "critical_difference_plot",
    "few_many_gap",
    "friedman_ranks",
    "gap_ranks",
    "modality_summary",
    "nemenyi_cd",
    "normalised_auc",
    "order_budgets",
    "paired_wilcoxon",
    "per_case_scores",
    "run_means",
    "steps_to_fraction",
]
