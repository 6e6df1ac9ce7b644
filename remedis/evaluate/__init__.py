"""Stage 4 — evaluate: per-site metrics with confidence intervals, OOD detection and the JSON + HTML report."""

from remedis.evaluate.report import build_report, write_report
from remedis.metrics import patient_bootstrap_ci, site_metrics

__all__ = ["build_report", "patient_bootstrap_ci", "site_metrics", "write_report"]
