"""The monitoring report (remedis.monitor.report): its estimators against independent references, and its
alarms on a simulated log: quiet on a stable stretch, raised by a shift."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score

from remedis.monitor.report import expected_performance, monitor_report, parse_duration, wilson
from remedis.monitor.store import PredictionStore

START = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)


def test_wilson_interval_equals_scipy():
    for k, n in ((0, 10), (3, 10), (50, 400), (400, 400)):
        ci = binomtest(k, n).proportion_ci(method="wilson")
        assert wilson(k, n) == pytest.approx([ci.low, ci.high], abs=1e-9)


def test_expected_performance_equals_the_average_over_labels_drawn_from_the_probabilities():
    rng = np.random.default_rng(0)
    p = np.round(rng.beta(0.7, 1.3, 400), 2)  # rounded: ties in the scores as well
    decided = p >= 0.4
    est = expected_performance(p, decided)
    aurocs, sens, spec = [], [], []
    for _ in range(1000):  # Monte Carlo: the labels a calibrated model's probabilities imply
        y = rng.random(len(p)) < p
        aurocs.append(roc_auc_score(y, p))
        sens.append(decided[y].mean())
        spec.append((~decided[~y]).mean())
    assert est["auroc"] == pytest.approx(np.mean(aurocs), abs=0.003)
    assert est["sensitivity"] == pytest.approx(np.mean(sens), abs=0.003)
    assert est["specificity"] == pytest.approx(np.mean(spec), abs=0.003)


def _rows(rng, day: int, n: int, ood: float = 0.02, shift: float = 0.0, positive_boost: float = 0.0,
          labeled: bool = False, device: str = "GE") -> list[dict]:
    out = []
    for i in range(n):
        p = float(np.clip(rng.beta(1, 3) + positive_boost, 0, 1))
        flagged = rng.random() < ood
        out.append({"time": (START + dt.timedelta(days=day, seconds=i * 60)).isoformat(timespec="milliseconds"),
                    "key": f"i-{day:04d}{i:06d}", "model_name": "site-b", "model_version": "3", "positive_class": "malignant",
                    "probabilities": {"benign": 1 - p, "malignant": p}, "label": "malignant" if p >= 0.5 else "benign",
                    "ood": flagged, "ood_score": float(rng.normal(shift, 1)), "manufacturer": device, "device_model": "X1",
                    "ood_reasons": ["modality CT, model trained on US"] if flagged else [], "caller": "api-key",
                    "embedding": rng.normal(shift, 1, 16), "truth": ("malignant" if rng.random() < p else "benign") if labeled else None})
    return out


def test_a_stable_stretch_raises_no_alarm_and_a_shift_raises_the_right_ones():
    rng = np.random.default_rng(1)
    rows = [r for day in range(8) for r in _rows(rng, day, 150, labeled=day == 3)]
    rows += _rows(rng, 8, 150, ood=0.3, shift=1.0, positive_boost=0.3)  # another scanner arrives
    report = monitor_report(rows, parse_duration("1d"), reference_windows=2)
    assert len(report["windows"]) == 9 and report["windows"][0]["reference"] and not report["windows"][2]["reference"]
    stable = [a for a in report["alarms"] if a["window"] < "2026-11-09"]
    assert stable == [], stable
    shifted = {a["figure"] for a in report["alarms"] if a["window"].startswith("2026-11-09")}
    assert {"ood_rate", "positive_rate", "drift:ood_score", "drift:embedding", "drift:positive_probability"} <= shifted
    last = report["windows"][-1]
    assert last["ood_reasons"] == {"modality": last["ood_rate"] * 150}
    labeled = report["windows"][3]["labeled"]  # labels drawn from calibrated probabilities: estimate inside the CI
    lo, hi = labeled["auroc_ci"]
    assert labeled["n"] == 150 and lo <= report["windows"][3]["estimated"]["auroc"] <= hi
    assert all(a["rule"] for a in report["alarms"])


def test_remedis_monitor_report_writes_json_and_html_without_identifiers(tmp_path, capsys):
    from remedis.cli import main

    rng = np.random.default_rng(2)
    now = dt.datetime.now(dt.timezone.utc)
    rows = _rows(rng, 0, 60) + _rows(rng, 1, 60, ood=0.5)
    # The day before yesterday (the reference window, 00:00 UTC on) and yesterday, whatever the time of day now.
    first_day = (now - dt.timedelta(days=2)).replace(hour=0, minute=0, second=0, microsecond=0)
    for i, r in enumerate(rows):
        r["time"] = (first_day + dt.timedelta(days=i // 60, minutes=20 * (i % 60))).isoformat(timespec="milliseconds")
    url = f"sqlite:///{tmp_path / 'log.db'}"
    store = PredictionStore(url)
    store.append(rows)
    store.close()
    assert main(["monitor", "report", "--store", url, "--since", "3d", "--window", "1d", "-o", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "120 answers" in out and "alarm" in out
    report = json.loads((tmp_path / "m" / "monitor.json").read_text())
    assert sum(w["n"] for w in report["windows"]) == 120 and any(a["figure"] == "ood_rate" for a in report["alarms"])
    html = (tmp_path / "m" / "monitor.html").read_text()
    assert "<script" not in html and "ood_rate" in html and "i-0000" not in html
    assert main(["monitor", "report", "--store", url, "--window", "soon", "-o", str(tmp_path / "m")]) == 2
    # an explicit reference period: the first 20 answers; then every window is tested against it
    ref_end = rows[20]["time"]
    assert main(["monitor", "report", "--store", url, "--since", "3d", "--reference-since", rows[0]["time"],
                 "--reference-until", ref_end, "-o", str(tmp_path / "r")]) == 0
    explicit = json.loads((tmp_path / "r" / "monitor.json").read_text())
    assert explicit["reference"]["explicit"] and explicit["reference"]["n"] == 20
    assert not any(w["reference"] for w in explicit["windows"])
    assert main(["monitor", "report", "--store", url, "--reference-since", "2026-01-01", "-o", str(tmp_path / "r")]) == 2
    assert main(["monitor", "report", "--store", url, "--reference-since", "1999-01-01", "--reference-until", "1999-02-01",
                 "-o", str(tmp_path / "r")]) == 2
    assert "no answers logged" in capsys.readouterr().err


def test_compare_a_shadow_version_pairs_by_key_and_matches_scikit_learn(tmp_path, capsys):
    from remedis.cli import main
    from remedis.monitor.report import compare_versions

    rng = np.random.default_rng(3)
    y = rng.random(300) < 0.3
    now = dt.datetime.now(dt.timezone.utc)
    rows = []
    for i, truth in enumerate(y):
        for version, noise, role in (("3", 1.2, "primary"), ("4", 0.5, "shadow")):  # the shadow separates better
            p = float(1 / (1 + np.exp(-(2 * truth - 1 + rng.normal(0, noise)))))
            rows.append({"time": (now - dt.timedelta(minutes=300 - i)).isoformat(timespec="milliseconds"),
                         "key": f"i-{i:032d}", "model_name": "site-b", "model_version": version, "role": role,
                         "positive_class": "malignant", "probabilities": {"benign": 1 - p, "malignant": p},
                         "label": "malignant" if p >= 0.5 else "benign", "ood": bool(rng.random() < 0.05), "ood_reasons": []})
    url = f"sqlite:///{tmp_path / 'c.db'}"
    store = PredictionStore(url)
    store.append(rows + [{**rows[0], "key": "i-only-primary"}])
    store.attach_labels([(f"i-{i:032d}", "malignant" if t else "benign") for i, t in enumerate(y[:200])])
    logged = list(store.rows())
    store.close()
    result = compare_versions(logged, "site-b:3", "site-b:4", n_boot=300)
    assert result["paired_images"] == 300 and result["only_primary"] == 1 and result["labeled"]["n"] == 200
    by = {(r["key"], r["model_version"]): r["probabilities"]["malignant"] for r in rows}
    expected = (roc_auc_score(y[:200], [by[(f"i-{i:032d}", "4")] for i in range(200)])
                - roc_auc_score(y[:200], [by[(f"i-{i:032d}", "3")] for i in range(200)]))
    lab = result["labeled"]
    assert lab["auroc_difference"] == pytest.approx(expected, abs=1e-9)
    assert lab["auroc_difference_ci"][0] > 0  # the better version is shown better, with its CI
    assert 0.5 < result["decision_agreement"] < 1
    assert main(["monitor", "compare", "--store", url, "--primary", "site-b:3", "--shadow", "site-b:4",
                 "-o", str(tmp_path / "c.json")]) == 0
    assert "300 images answered by both" in capsys.readouterr().out and (tmp_path / "c.json").is_file()
    assert main(["monitor", "compare", "--store", url, "--primary", "site-b:3", "--shadow", "site-b:9"]) == 2


def test_monitor_report_against_an_explicit_reference_period_tests_every_window():
    rng = np.random.default_rng(2)
    reference = [r for day in range(2) for r in _rows(rng, day, 150)]
    rows = [r for day in range(2, 5) for r in _rows(rng, day, 150)] + _rows(rng, 5, 150, ood=0.3, shift=1.0)
    report = monitor_report(rows, parse_duration("1d"), reference_rows=reference)
    assert report["reference"]["explicit"] and report["reference"]["n"] == 300
    assert not any(w["reference"] for w in report["windows"]) and len(report["windows"]) == 4
    assert {a["window"][:10] for a in report["alarms"]} == {"2026-11-06"}


def test_service_gauges_show_the_latest_window_with_the_report_rules(tmp_path):
    """serving.monitor_gauges: the gauges of the latest window equal window_figures on the same rows, and the
    alarm gauges are 1 exactly for the alarms the report raises."""
    from prometheus_client import CollectorRegistry

    from remedis.monitor.report import window_figures
    from serving.monitor_gauges import ReportGauges
    from serving.settings import MonitorGaugeSettings

    rng = np.random.default_rng(3)
    store = PredictionStore(f"sqlite:///{tmp_path / 'log.db'}")
    first_day = _rows(rng, 0, 200)  # the log's first window: the reference by default
    quiet = _rows(rng, 5, 200)
    store.append(first_day + quiet)
    registry = CollectorRegistry()
    gauges = ReportGauges(store, {"name": "site-b", "version": "3"}, MonitorGaugeSettings(every_s=300, window="1d"),
                          start=False, registry=registry)

    def value(name, **labels):
        return registry.get_sample_value(name, {"model": "site-b:3", **labels})

    now = START + dt.timedelta(days=6)
    out = gauges.refresh(now)
    assert out["images"] == 200 and out["reference_images"] == 200 and out["alarms"] == []
    figures, _ = window_figures(quiet, first_day)
    assert value("remedis_monitor_images") == 200
    assert value("remedis_monitor_ood_rate") == pytest.approx(figures["ood_rate"])
    assert value("remedis_monitor_estimated", metric="auroc") == pytest.approx(figures["estimated"]["auroc"])
    assert value("remedis_monitor_drift_p_value", test="embedding") == pytest.approx(figures["drift"]["embedding"]["p_value"])
    assert value("remedis_monitor_alarm", figure="ood_rate") == 0.0
    # a new scanner on day 7: the OOD-rate and drift alarms go to 1
    store.append(_rows(rng, 7, 200, ood=0.3, shift=1.0, positive_boost=0.3))
    out = gauges.refresh(START + dt.timedelta(days=8))
    assert {"ood_rate", "positive_rate", "drift:embedding"} <= set(out["alarms"])
    assert value("remedis_monitor_alarm", figure="ood_rate") == 1.0 and value("remedis_monitor_alarm", figure="positive_rate") == 1.0
    assert value("remedis_monitor_ood_rate") > 0.2
    # an explicit reference period; a young log's window never reaches back into it
    young = ReportGauges(store, {"name": "site-b", "version": "3"}, MonitorGaugeSettings(window="1d"), start=False,
                         registry=CollectorRegistry())
    assert young.refresh(START + dt.timedelta(hours=20))["images"] == 0
    store.close()


def test_an_image_sent_again_is_one_observation_not_drift():
    """A site re-sends images (retries, second reads): windows drawn with replacement from one pool of images.
    Counted per request, a repeated image lands in both folds of the classifier test and passes for drift; counted
    once per key (`distinct`), the stable stretch raises no drift alarm."""
    from remedis.monitor.report import distinct

    rng = np.random.default_rng(4)
    pool = _rows(rng, 0, 120)
    rows = []
    for day in range(12):
        for i in rng.integers(0, len(pool), 60):
            rows.append({**pool[i], "time": (START + dt.timedelta(days=day, minutes=int(rng.integers(0, 1400))))
                         .isoformat(timespec="milliseconds")})
    rows.sort(key=lambda r: r["time"])
    assert len(distinct(rows)) <= 120 < len(rows)
    report = monitor_report(rows, parse_duration("1d"), reference_windows=2)
    assert not [a for a in report["alarms"] if a["figure"].startswith("drift")], report["alarms"]
    assert all(w["n"] < w["answers"] for w in report["windows"])


def test_mmd_test_matches_scikit_learn_kernels_holds_its_level_and_finds_a_shift():
    from sklearn.metrics.pairwise import euclidean_distances, rbf_kernel

    from remedis.monitor.report import mmd_test

    rng = np.random.default_rng(5)
    a, b = rng.normal(0, 1, (40, 16)), rng.normal(0, 1, (30, 16))
    out = mmd_test(a, b, n_perm=200)
    x = np.concatenate([a, b])
    d2 = euclidean_distances(x, squared=True)
    gamma = 1 / np.median(d2[np.triu_indices(len(x), 1)])
    kxx, kyy, kxy = rbf_kernel(a, a, gamma=gamma), rbf_kernel(b, b, gamma=gamma), rbf_kernel(a, b, gamma=gamma)
    assert out["statistic"] == pytest.approx(kxx.mean() + kyy.mean() - 2 * kxy.mean(), rel=1e-9)
    # its level: same distribution, 200 repeats of small windows; p < 0.05 about 5% of the time
    ps = [mmd_test(rng.normal(0, 1, (40, 16)), rng.normal(0, 1, (30, 16)), n_perm=100, seed=i)["p_value"] for i in range(200)]
    assert np.mean(np.array(ps) < 0.05) < 0.1
    assert mmd_test(rng.normal(0, 1, (40, 16)), rng.normal(0.5, 1, (30, 16)))["p_value"] < 0.01
