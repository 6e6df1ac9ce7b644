"""report.html in a real browser: headless Chromium (Debian's `chromium`, installed by `make test` when
running as root) renders it with no console error, every plot image decodes, no network request is
made (Chromium's own NetLog is checked), and a screenshot is kept as a test artifact
(`runs/test-artifacts/report-screenshot.png`, or $REMEDIS_TEST_ARTIFACTS)."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from remedis.evaluate.cka import linear_cka
from remedis.evaluate.report import build_report, write_report
from remedis.metrics import site_metrics

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (make test installs Debian's chromium when run as root)")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-default-apps", "--disable-extensions", "--hide-scrollbars",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--disable-features=NetworkTimeServiceQuerying,OptimizationHints,MediaRouter,Translate",
         "--enable-logging=stderr", "--v=0"]


def _report(folder: Path) -> Path:
    """A report with every section, from real metric computations on synthetic scores."""
    rng = np.random.default_rng(0)
    models = []
    for backbone, fraction, images, shift in (("remedis", 0.1, 20, 1.2), ("remedis", 1.0, 200, 1.6),
                                              ("supervised", 0.1, 20, 0.8), ("supervised", 1.0, 200, 1.4)):
        sites = {}
        for site, s in (("site-A", shift), ("site-B", shift * 0.9), ("site-C", shift * 0.6)):
            y = rng.integers(0, 2, 90)
            p1 = 1 / (1 + np.exp(-(rng.normal(size=90) + s * (2 * y - 1))))
            p = np.stack([1 - p1, p1], 1)
            sharp = p ** 2 / (p ** 2).sum(1, keepdims=True)
            sites[site] = site_metrics(y, p, np.repeat(np.arange(30), 3), n_boot=50, threshold=0.4,
                                       probs_uncalibrated=sharp, class_names=["benign", "malignant"])
        x = rng.normal(size=(40, 16))
        layers = ["stem.conv", "stages.0", "stages.1", "stages.2", "stages.3", "embedding"]
        feats = [x @ rng.normal(size=(16, 16)) * 0 + x + i * 0.6 * rng.normal(size=(40, 16)) for i in range(len(layers))]
        matrix = [[linear_cka(feats[i], feats[j]) for j in range(len(layers))] for i in range(len(layers))]
        ood = {"in_distribution": {"site": "site-B", "n_images": 90}, "detector": {
            "method": "mahalanobis", "threshold": 12.5, "accept_rate": 0.95, "rule": "fixed", "test_accepted_in_distribution": 0.94},
            "sets": {n: {"kind": k, "n_images": 64,
                         "methods": {m: {"auroc": float(rng.uniform(0.5, 1)), "fpr95": float(rng.uniform(0, 0.9))}
                                     for m in ("msp", "max_logit", "energy", "mahalanobis", "knn")}}
                     for n, k in (("site-A", "near"), ("site-C", "near"), ("synthetic-noise", "far"))}}
        models.append({"name": f"{backbone}@{fraction:g}", "backbone": backbone, "fraction": fraction, "train_images": images,
                       "temperature": 1.3, "operating_point": {"threshold": 0.4, "chosen_on": "validation"},
                       "sites": sites, "subgroups": {}, "ood": ood,
                       "representation": {"cka": {"layers": layers, "matrix": matrix, "diagonal": [matrix[i][i] for i in range(6)]},
                                          "embedding_distance": {"site-A": {"site-A": 0.0, "site-B": 0.3},
                                                                 "site-B": {"site-A": 0.3, "site-B": 0.0}}},
                       "provenance": {"weights_sha256": "a" * 64}})
    sites = {"site-A": {"role": "source", "test_images": 90, "test_patients": 30},
             "site-B": {"role": "target", "test_images": 90, "test_patients": 30},
             "site-C": {"role": "ood", "test_images": 90, "test_patients": 30}}
    report = build_report(models, sites, {"manifest_sha256": "b" * 64, "seed": 0}, title="browser test",
                          task={"class_names": ["benign", "malignant"], "positive_class": "malignant", "target_site": "site-B"})
    return write_report(report, folder)[1]


def _chromium(args: list[str], tmp: Path, timeout: int = 90) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], check=False, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HOME": str(tmp)})


def test_report_renders_offline_in_chromium(tmp_path):
    from PIL import Image

    page = _report(tmp_path / "report")
    shot, netlog = tmp_path / "report.png", tmp_path / "netlog.json"
    proc = _chromium([f"--screenshot={shot}", "--window-size=1200,2000", f"--log-net-log={netlog}",
                      "--virtual-time-budget=5000", page.resolve().as_uri()], tmp_path)
    assert shot.is_file(), proc.stderr[-3000:]
    # Console errors (Chromium logs page console messages as CONSOLE lines) and failed loads.
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Failed to load resource" in line]
    assert not console, console
    # Non-blank: a white page has one colour; the report has text, tables and plots.
    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert img.shape[:2] == (2000, 1200) and img.std() > 10 and (img < 128).mean() > 0.005
    # No network request from the page: Chromium's NetLog records every request with its initiator;
    # the browser's own background services (updater, time) show "not an origin", the page its origin.
    assert netlog.is_file()
    page_requests = {e["params"]["url"] for e in json.loads(netlog.read_text())["events"]
                     if "url" in e.get("params", {}) and "initiator" in e["params"]
                     and e["params"]["initiator"] != "not an origin"}
    remote = {u for u in page_requests if not u.startswith(("file:", "data:"))}
    assert not remote, remote

    # Every <img> decodes: a copy of the page with a check script reports into its title (the report
    # itself carries no script).
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", """<script>
addEventListener('load', () => {
  const imgs = [...document.images];
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  const net = performance.getEntriesByType('resource').filter(e => !e.name.startsWith('data:')).length;
  document.title = `CHECK imgs=${imgs.length} bad=${bad} net=${net}`;
});
</script></body>"""))
    dom = _chromium(["--dump-dom", "--virtual-time-budget=5000", probe.resolve().as_uri()], tmp_path).stdout
    found = re.search(r"CHECK imgs=(\d+) bad=(\d+) net=(\d+)", dom)
    assert found, dom[:500]
    n_imgs, bad, net = map(int, found.groups())
    assert n_imgs >= 3 and bad == 0 and net == 0

    artifacts = Path(os.environ.get("REMEDIS_TEST_ARTIFACTS", ROOT / "runs" / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, artifacts / "report-screenshot.png")
    shutil.copy(page, artifacts / "report.html")
    assert json.loads((page.parent / "report.json").read_text())["schema_version"] == 2


def test_monitoring_report_renders_offline_in_chromium(tmp_path):
    """`remedis monitor report`'s HTML (remedis.monitor.report.render_html) in headless Chromium: rendered, not
    blank, no console error, no request beyond the file itself."""
    import datetime as dt

    from PIL import Image

    from remedis.monitor.report import monitor_report, render_html

    rng = np.random.default_rng(0)
    start = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
    rows = []
    for day in range(5):
        shifted = day == 4
        for i in range(80):
            p = float(np.clip(rng.beta(1, 3) + (0.3 if shifted else 0), 0, 1))
            flagged = rng.random() < (0.3 if shifted else 0.03)
            rows.append({"time": (start + dt.timedelta(days=day, minutes=i * 10)).isoformat(), "key": f"i-{day}-{i}",
                         "model_name": "site-b", "model_version": "3", "positive_class": "malignant",
                         "probabilities": {"benign": 1 - p, "malignant": p}, "label": "malignant" if p >= 0.5 else "benign",
                         "ood": flagged, "ood_score": float(rng.normal(1.0 if shifted else 0, 1)),
                         "ood_reasons": ["modality CT, model trained on US"] if flagged else [],
                         "manufacturer": "GE" if i % 2 else "Toshiba", "device_model": "X1",
                         "embedding": rng.normal(1.0 if shifted else 0, 1, 8),
                         "truth": ("malignant" if rng.random() < p else "benign") if day == 3 else None})
    report = monitor_report(rows, dt.timedelta(days=1))
    assert report["alarms"]
    page = tmp_path / "monitor.html"
    page.write_text(render_html(report))
    shot, netlog = tmp_path / "monitor.png", tmp_path / "netlog.json"
    proc = _chromium([f"--screenshot={shot}", "--window-size=1200,1600", f"--log-net-log={netlog}",
                      "--virtual-time-budget=3000", page.resolve().as_uri()], tmp_path)
    assert shot.is_file(), proc.stderr[-3000:]
    assert not [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Failed to load resource" in line]
    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert img.std() > 10 and (img < 128).mean() > 0.002
    requests = {e["params"]["url"] for e in json.loads(netlog.read_text())["events"]
                if "url" in e.get("params", {}) and "initiator" in e["params"] and e["params"]["initiator"] != "not an origin"}
    assert not {u for u in requests if not u.startswith(("file:", "data:"))}
