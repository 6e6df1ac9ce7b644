"""Stage 4 — evaluate: per-site metrics with confidence intervals and the JSON + HTML report."""

from remedis.evaluate.metrics import patient_bootstrap_ci, site_metrics
from remedis.evaluate.report import build_report, write_report

__all__ = ["build_report", "patient_bootstrap_ci", "site_metrics", "write_report"]
