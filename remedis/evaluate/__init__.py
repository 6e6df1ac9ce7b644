"""Stage 4 — evaluate: per-site metrics with confidence intervals and the JSON + HTML report."""

from remedis.evaluate.metrics import patient_bootstrap_ci, site_metrics
from remedis.evaluate.report import build_report, write_report

__all__ = ["patient_bootstrap_ci", "site_metrics", "build_report", "write_report"]
