"""The report stage: results of training and evaluation → ``reports/`` (see :mod:`pipeline.report.build`)."""

from pipeline.stats import Interval, PairedComparison, mean_interval, paired_comparison, sign_flip_p_value

from .build import ReportParams, ReportResult, analyse, claims, run_report
from .collect import ReportInputError, collect_eval, collect_train

__all__ = [
    "Interval",
    "PairedComparison",
    "ReportInputError",
    "ReportParams",
    "ReportResult",
    "analyse",
    "claims",
    "collect_eval",
    "collect_train",
    "mean_interval",
    "paired_comparison",
    "run_report",
    "sign_flip_p_value",
]
