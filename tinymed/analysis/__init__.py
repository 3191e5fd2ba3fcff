"""tinymed.analysis stage: collect evaluated variants, the Pareto front (memory ↓, accuracy ↑), plots, report."""

from tinymed.analysis.collect import ReportError, Variant, collect_variants
from tinymed.analysis.pareto import dominates, pareto_front
from tinymed.analysis.report import ACCURACY_METRICS, ReportConfig, ReportResult, VariantPoint, build_report

__all__ = [
    "ACCURACY_METRICS",
    "ReportConfig",
    "ReportError",
    "ReportResult",
    "Variant",
    "VariantPoint",
    "build_report",
    "collect_variants",
    "dominates",
    "pareto_front",
]
