"""Evaluation: avg@k / pass@k with bootstrap CIs over benchmarks, reports and comparisons."""

from .harness import EvalSettings, eval_metrics, evaluate, settings_from_config, summarize
from .metrics import (
    avg_at_k,
    bootstrap_ci,
    paired_bootstrap_ci,
    pass_at_k,
    pass_at_k_mean,
    pooled_paired_bootstrap,
)
from .report import comparison_table, write_reports

__all__ = [
    "EvalSettings",
    "eval_metrics",
    "settings_from_config",
    "avg_at_k",
    "bootstrap_ci",
    "comparison_table",
    "evaluate",
    "paired_bootstrap_ci",
    "pass_at_k",
    "pass_at_k_mean",
    "pooled_paired_bootstrap",
    "summarize",
    "write_reports",
]
