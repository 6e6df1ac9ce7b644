"""The monitoring report's latest window as Prometheus gauges on the service's /metrics.

A thread recomputes, every `monitor.gauges.every_s` seconds, the figures and alarms of the last `window` of the
prediction log against the reference period with the report's own rules (`remedis.monitor.report.window_figures`),
so a dashboard or an alert rule sees what `remedis monitor report` would say, without a report run:

    remedis_monitor_images{model}                        answers in the latest window
    remedis_monitor_ood_rate{model}                      OOD-flag rate (expected: 0.05)
    remedis_monitor_positive_rate{model}                 positive-decision rate
    remedis_monitor_estimated{model,metric}              CBPE estimate: auroc, sensitivity, specificity
    remedis_monitor_labeled{model,metric}                where labels came: auroc, sensitivity, specificity, ece, n
    remedis_monitor_drift_p_value{model,test}            ood_score, positive_probability, embedding
    remedis_monitor_alarm{model,figure}                  1 while the latest window raises that alarm, else 0
    remedis_monitor_refreshed_timestamp_seconds{model}   when the figures were last computed

The reference is `reference_since`..`reference_until` when set, else the log's first window; the latest window
never reaches back into it (a log younger than two windows shows only its volume). The gauges are
`mostrecent` across API workers (each computes the same figures from the shared store).

Example:
    >>> gauges = ReportGauges(store, "site-b:v3", MonitorGaugeSettings(every_s=300))   # doctest: +SKIP
    >>> gauges.refresh()["images"]                                                      # doctest: +SKIP
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from typing import Any

from remedis.monitor.report import parse_duration, window_figures
from remedis.monitor.store import PredictionStore
from serving.settings import MonitorGaugeSettings

log = logging.getLogger("remedis.serving")
ALARM_FIGURES = ("ood_rate", "positive_rate", "drift:ood_score", "drift:positive_probability", "drift:embedding", "labeled_auroc")


def _utc(text: str) -> dt.datetime:
    t = dt.datetime.fromisoformat(str(text))
    return t.replace(tzinfo=dt.timezone.utc) if t.tzinfo is None else t.astimezone(dt.timezone.utc)


def _iso(t: dt.datetime) -> str:
    return t.isoformat(timespec="milliseconds")


class ReportGauges:
    """Gauges of the latest window's figures, refreshed by a daemon thread.

    Args:
        store: the prediction log.
        model: the served model's name and version (rows are read by name).
        settings: `monitor.gauges`.
        start: run the refreshing thread (tests call `refresh` themselves).
        registry: the Prometheus registry (default: the process's, which /metrics serves).
    """

    def __init__(self, store: PredictionStore, model: dict[str, str], settings: MonitorGaugeSettings, start: bool = True,
                 registry=None):
        from prometheus_client import REGISTRY, Gauge  # after BentoML has pointed it at the multiprocess directory

        self.store, self.settings = store, settings
        self.name, self.label = model.get("name"), f"{model.get('name')}:{model.get('version') or ''}"
        self.window = parse_duration(settings.window)
        mode = {"multiprocess_mode": "mostrecent", "registry": registry or REGISTRY}
        self.images = Gauge("remedis_monitor_images", "Answers in the latest monitoring window", ["model"], **mode)
        self.ood_rate = Gauge("remedis_monitor_ood_rate", "OOD-flag rate in the latest window (expected 0.05)", ["model"], **mode)
        self.positive_rate = Gauge("remedis_monitor_positive_rate", "Positive-decision rate in the latest window", ["model"], **mode)
        self.estimated = Gauge("remedis_monitor_estimated", "Performance estimated from calibrated probabilities (CBPE)",
                               ["model", "metric"], **mode)
        self.labeled = Gauge("remedis_monitor_labeled", "Performance on the latest window's labeled answers", ["model", "metric"], **mode)
        self.drift = Gauge("remedis_monitor_drift_p_value", "p-value of a drift test against the reference", ["model", "test"], **mode)
        self.alarm = Gauge("remedis_monitor_alarm", "1 while the latest window raises this alarm", ["model", "figure"], **mode)
        self.refreshed = Gauge("remedis_monitor_refreshed_timestamp_seconds", "When the monitoring gauges were computed",
                               ["model"], **mode)
        self.failures = 0
        self._reference: tuple[tuple[str, str], list[dict]] | None = None  # a closed reference period, read once
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="monitor-gauges", daemon=True)
        if start:
            self._thread.start()

    def _reference_bounds(self) -> tuple[str, str] | None:
        s = self.settings
        if s.reference_since and s.reference_until:
            return _iso(_utc(s.reference_since)), _iso(_utc(s.reference_until))
        first = self.store.first_time(self.name)
        if first is None:
            return None
        return _iso(_utc(first)), _iso(_utc(first) + self.window)

    def refresh(self, now: dt.datetime | None = None) -> dict[str, Any]:
        """Recompute the latest window's figures and set the gauges; returns them."""
        now = now or dt.datetime.now(dt.timezone.utc)
        bounds = self._reference_bounds()
        since = _iso(now - self.window)
        if bounds is not None and bounds[1] > since:
            since = bounds[1]  # the latest window never reaches back into the reference
        rows = list(self.store.rows(since=since, until=_iso(now), role="primary", model_name=self.name)) if since < _iso(now) else []
        reference = self._reference_rows(bounds, now) if bounds else []
        figures, alarms = window_figures(rows, reference)
        m = self.label
        self.images.labels(m).set(len(rows))
        for gauge, key in ((self.ood_rate, "ood_rate"), (self.positive_rate, "positive_rate")):
            gauge.labels(m).set(figures.get(key, float("nan")))
        for metric, value in (figures.get("estimated") or {}).items():
            self.estimated.labels(m, metric).set(float("nan") if value is None else value)
        labeled = figures.get("labeled") or {}
        for metric in ("auroc", "sensitivity", "specificity", "ece", "n"):
            value = labeled.get(metric)
            self.labeled.labels(m, metric).set(float("nan") if value is None else value)
        for test in ("ood_score", "positive_probability", "embedding"):
            value = (figures.get("drift") or {}).get(test, {}).get("p_value")
            self.drift.labels(m, test).set(float("nan") if value is None else value)
        raised = {a["figure"] for a in alarms}
        for figure in ALARM_FIGURES:
            self.alarm.labels(m, figure).set(1.0 if figure in raised else 0.0)
        self.refreshed.labels(m).set(now.timestamp())
        return {"images": len(rows), "reference_images": len(reference), "alarms": sorted(raised), "figures": figures}

    def _reference_rows(self, bounds: tuple[str, str], now: dt.datetime) -> list[dict]:
        """The reference period's rows; once the period has ended they cannot change, so they are read once."""
        if self._reference is not None and self._reference[0] == bounds:
            return self._reference[1]
        rows = list(self.store.rows(since=bounds[0], until=bounds[1], role="primary", model_name=self.name))
        if bounds[1] <= _iso(now):
            self._reference = (bounds, rows)
        return rows

    def _run(self) -> None:
        while True:
            try:
                self.refresh()
            except Exception as exc:  # a store that is down: the gauges keep their values, the log says why
                self.failures += 1
                log.warning("monitor gauges: refresh failed (%s)", type(exc).__name__)
            if self._stop.wait(self.settings.every_s):
                return

    def close(self) -> None:
        """Stop refreshing."""
        self._stop.set()
