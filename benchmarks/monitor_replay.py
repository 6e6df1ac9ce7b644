"""Issue 32's evidence: real breast-ultrasound traffic replayed through the real service with its prediction
log on, then the monitoring report on what was logged. Prints one JSON object (and writes it with -o).

    .venv/bin/python benchmarks/monitor_replay.py -o benchmarks/results/monitor-replay-cpu.json

1. A model for one site: `remedis adapt --backbone random` on BUS-BRA's two GE scanners (Logiq 5 and 7),
   100% of the labels, 64 px (the kit's `device` column; the Toshiba and U-Systems images are held out).
2. Every replayed image is sent as an 8-bit Ultrasound Image Storage DICOM (the PNG's pixels, the scanner's
   Manufacturer / ManufacturerModelName, a planted patient name and ID) to `bentoml serve` with
   `monitor.store` (SQLite) and embeddings on, from 8 client threads.
3. The in-distribution stretch: `--windows` windows of `--per-window` requests, drawn with replacement from
   the GE scanners' *test* split (images the model and its detector never saw), the first
   `--reference-windows` of them the reference. Then each shift, `--shift-windows` windows each, every window
   against the same reference: another site (BUSI), the held-out scanners (Toshiba Aplio 300, U-Systems), a
   contrast change (the test images at 70% contrast about their mean), and a share of another modality
   (20% NIH chest X-rays sent as DX among the test images). A window stands for a day: the rows a window's
   requests logged get that day's timestamp (the service stamps wall-clock time; the replay takes minutes).
   Counted: windows with any alarm in the stretch (false alarms per 100 windows) and, per shift, requests
   until the first alarm (windows x per-window) and the share of its windows that alarmed.
4. The estimate without labels against the truth: every logged answer gets its label by SOP Instance UID
   through `remedis monitor label` (the CSV path a site uses); per source, the report's estimated AUROC
   (CBPE, from calibrated probabilities) against the measured one; mean absolute error.
5. The logging overhead: the same model served twice, the log off and on (embeddings kept), both up at once;
   bursts of the same DICOM uploads from 32 clients alternate between them in ABBA order over several rounds.
6. A killed service: SIGKILL of the whole service mid-traffic; answers the clients received against rows in
   the store, and SQLite's `PRAGMA integrity_check`.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import http.client
import inspect
import io
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"
SECRET = "replay-site-secret-0123456789"


def us_dicom(pixels: np.ndarray, manufacturer: str, model: str, uid: str, modality: str = "US") -> bytes:
    """An 8-bit MONOCHROME2 DICOM of `pixels` (Ultrasound Image Storage; DX for the other modality) with
    planted identifiers, as a modality sends it."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_class = "1.2.840.10008.5.1.4.1.1.6.1" if modality == "US" else "1.2.840.10008.5.1.4.1.1.1.1"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber = "Replay^Planted", "PLANTED-PID-77", "19700101", "ACC-PLANTED"
    ds.Modality, ds.Manufacturer, ds.ManufacturerModelName = modality, manufacturer, model
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def grey(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("L"))


def low_contrast(px: np.ndarray, factor: float = 0.7) -> np.ndarray:
    m = px.mean()
    return np.clip(m + factor * (px.astype(np.float32) - m), 0, 255).astype(np.uint8)


def adapt_model(tmp: Path, manifest: Path, image_size: int) -> Path:
    """`remedis adapt --backbone random` on BUS-BRA's GE scanners; returns the adapted folder."""
    rows = [r for r in csv.DictReader(manifest.open()) if r["site"] == "BUS-BRA" and r["device"].startswith("GE ")]
    site = tmp / "busbra-ge.csv"
    with site.open("w", newline="") as fh:
        w = csv.DictWriter(fh, ["image", "label", "site", "patient_id", "device", "modality"])
        w.writeheader()
        for r in rows:
            w.writerow({"image": str(manifest.parent / r["image"]), "label": r["label"], "site": r["site"],
                        "patient_id": r["patient_id"], "device": r["device"], "modality": "US"})
    out = tmp / "adapt"
    subprocess.run([sys.executable, "-m", "remedis.cli", "adapt", "--backbone", "random", "--manifest", str(site),
                    "--site", "BUS-BRA", "--budget", "100%", "--config", str(ROOT / "configs" / "breast_ultrasound.yaml"),
                    "--set", f"data.image_size={image_size}", "--set", "data.site_split_fractions={}",
                    "--set", "evaluate.bootstrap=100", "-o", str(out), "--quiet"], check=True, cwd=ROOT)
    return next((out / "adapted").iterdir())


class Client:
    """Sends DICOM uploads to /predict from threads with keep-alive connections; keeps each answer's key."""

    def __init__(self, url: str, threads: int = 8):
        from urllib.parse import urlsplit

        self.where, self.threads = urlsplit(url), threads
        self.local = threading.local()

    def one(self, body: bytes) -> tuple[int, dict | None]:
        from benchmarks.bench_service import multipart

        data, headers = multipart(("i.dcm", body, "application/dicom"))
        c = getattr(self.local, "c", None)
        if c is None:
            c = self.local.c = http.client.HTTPConnection(self.where.hostname, self.where.port, timeout=120)
        try:
            c.request("POST", "/predict", body=data, headers=headers)
            resp = c.getresponse()
            text = resp.read()
            return resp.status, (json.loads(text) if resp.status == 200 else None)
        except (OSError, http.client.HTTPException):
            c.close()
            self.local.c = None
            return -1, None

    def send(self, bodies: list[bytes]) -> list[tuple[int, dict | None]]:
        with ThreadPoolExecutor(self.threads) as pool:
            return list(pool.map(self.one, bodies))


def wait_rows(db: Path, n: int, timeout: float = 120.0) -> None:
    """Poll the store until it holds `n` rows (the writer flushes in batches off the request path)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with sqlite3.connect(db) as con:
            if con.execute("select count(*) from predictions").fetchone()[0] >= n:
                return
        time.sleep(0.1)
    raise RuntimeError(f"the store did not reach {n} rows in {timeout} s")


def serving_config(tmp: Path, name: str, store: Path | None) -> Path:
    cfg = tmp / f"serving-{name}.yaml"
    monitor = f"monitor: {{store: 'sqlite:///{store}', embeddings: true}}\n" if store else ""
    cfg.write_text("resources: {cpu: 1, gpu: 0}\nbatching: {enabled: true, max_batch_size: 32, max_latency_ms: 60000}\n"
                   + monitor)
    return cfg


def send_plan(tag: str, home: Path, tmp: Path, pools: dict[str, list], plan: list[tuple[str, list[int]]], db: Path,
              env: dict[str, str]) -> dict:
    """Send each window's requests, wait until the log holds them, note the last row id of each window."""
    from serving.local import LocalServer

    bounds, sent, answered, codes = [], 0, 0, {}
    truths: dict[str, str] = {}  # key -> truth, from the answers (a key repeats when an image is drawn again)
    with LocalServer(tag, home, serving_config(tmp, "replay", db), env=env) as srv:
        client = Client(srv.url)
        t0 = time.perf_counter()
        for arm, idx in plan:
            answers = client.send([pools[arm][i] for i in idx])
            for (code, ans), i in zip(answers, idx):
                codes[code] = codes.get(code, 0) + 1
                if ans:
                    truths[ans["key"]] = pools[f"{arm}:truth"][i]
            sent += len(idx)
            answered += sum(1 for _, ans in answers if ans)
            wait_rows(db, answered)
            with sqlite3.connect(db) as con:
                bounds.append(con.execute("select max(id) from predictions").fetchone()[0])
        wall = time.perf_counter() - t0
    return {"bounds": bounds, "sent": sent, "codes": codes, "truths": truths, "wall": wall}


def replay(args, tag: str, home: Path, tmp: Path, pools: dict[str, list[bytes]]) -> dict:  # long: one story, top to bottom
    from remedis.monitor.report import monitor_report
    from remedis.monitor.store import PredictionStore

    rng = np.random.default_rng(args.seed)
    db = tmp / "replay.db"
    env = {"REMEDIS_MONITOR_SECRET": SECRET}
    plan: list[tuple[str, list[int]]] = []  # (arm, indices into its pool) per window
    for _ in range(args.reference_windows + args.windows):
        plan.append(("in-distribution", rng.integers(0, len(pools["in-distribution"]), args.per_window).tolist()))
    for arm in ("another site (BUSI)", "held-out scanners (Toshiba, U-Systems)", "contrast 70%", "20% chest X-rays (DX)"):
        for _ in range(args.shift_windows):
            plan.append((arm, rng.integers(0, len(pools[arm]), args.per_window).tolist()))
    done = send_plan(tag, home, tmp, pools, plan, db, env)
    bounds, sent, codes, truths, wall = done["bounds"], done["sent"], done["codes"], done["truths"], done["wall"]
    # Labels by key through the command a site uses (the CSV could equally carry the SOP Instance UIDs).
    labels = tmp / "labels.csv"
    with labels.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "label"])
        w.writerows(truths.items())
    subprocess.run([sys.executable, "-m", "remedis.cli", "monitor", "label", str(labels), "--store", f"sqlite:///{db}"],
                   check=True, cwd=ROOT, env={**os.environ, **env}, capture_output=True)
    store = PredictionStore(f"sqlite:///{db}")
    rows = list(store.rows(role="primary"))
    store.close()
    # planted identifiers never reach the store
    raw = db.read_bytes() + (db.with_name(db.name + "-wal").read_bytes() if db.with_name(db.name + "-wal").exists() else b"")
    leaked = [s for s in ("Replay^Planted", "PLANTED-PID-77", "19700101", "ACC-PLANTED") if s.encode() in raw]
    day0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    window_of = np.searchsorted(np.array(bounds), [r["id"] for r in rows])
    for r, w in zip(rows, window_of):
        r["time"] = (day0 + dt.timedelta(days=int(w), hours=12)).isoformat()
    report = monitor_report(rows, dt.timedelta(days=1), reference_windows=args.reference_windows, n_boot=200)
    alarms_by_window: dict[int, list[dict]] = {}
    starts = [w["start"] for w in report["windows"]]
    for a in report["alarms"]:
        alarms_by_window.setdefault(starts.index(a["window"]), []).append(a)
    stretch = range(args.reference_windows, args.reference_windows + args.windows)
    false_alarm_windows = [w for w in stretch if alarms_by_window.get(w)]
    rules_in_stretch: dict[str, int] = {}
    for w in false_alarm_windows:
        for a in alarms_by_window[w]:
            rules_in_stretch[a["figure"]] = rules_in_stretch.get(a["figure"], 0) + 1
    shifts = {}
    first = args.reference_windows + args.windows
    for k, arm in enumerate(dict.fromkeys(a for a, _ in plan[first:])):
        ws = range(first + k * args.shift_windows, first + (k + 1) * args.shift_windows)
        hit = [w for w in ws if alarms_by_window.get(w)]
        figures: dict[str, int] = {}
        for w in hit:
            for a in alarms_by_window[w]:
                figures[a["figure"]] = figures.get(a["figure"], 0) + 1
        shifts[arm] = {"windows": len(ws), "windows_alarmed": len(hit),
                       "requests_until_alarm": (hit[0] - ws[0] + 1) * args.per_window if hit else None,
                       "alarms_by_figure": figures,
                       "ood_rate": float(np.mean([report["windows"][w]["ood_rate"] for w in ws])),
                       "positive_rate": float(np.mean([report["windows"][w]["positive_rate"] for w in ws]))}
    # CBPE against the truth, per source (all of its logged rows, labels attached by the command above)
    estimate = {}
    from remedis.monitor.report import expected_performance, labeled_performance

    arm_of = [plan[w][0] for w in window_of]
    for arm in dict.fromkeys(a for a, _ in plan):
        # each distinct image once (the replay draws with replacement); the chest X-rays have no breast label
        sel = list({r["key"]: r for r, a in zip(rows, arm_of) if a == arm and r["truth"] is not None
                    and r["modality"] == "US"}.values())
        pos = sel[0]["positive_class"]
        p = np.array([r["probabilities"][pos] for r in sel])
        decided = np.array([r["label"] == pos for r in sel])
        truth = np.array([r["truth"] == pos for r in sel], dtype=int)
        est, meas = expected_performance(p, decided), labeled_performance(p, decided, truth, n_boot=200)
        estimate[arm] = {"distinct_images": int(len(p)), "positives": int(truth.sum()),
                         "estimated_auroc": est["auroc"], "measured_auroc": meas["auroc"], "measured_auroc_ci": meas["auroc_ci"],
                         "estimated_sensitivity": est["sensitivity"], "measured_sensitivity": meas["sensitivity"],
                         "estimated_specificity": est["specificity"], "measured_specificity": meas["specificity"]}
    errs = [abs(v["estimated_auroc"] - v["measured_auroc"]) for v in estimate.values()]
    held_out = [abs(v["estimated_auroc"] - v["measured_auroc"]) for k, v in estimate.items()
                if k in ("another site (BUSI)", "held-out scanners (Toshiba, U-Systems)")]
    return {"requests": sent, "status_counts": {str(k): v for k, v in codes.items()}, "rows_logged": len(rows),
            "wall_s": wall, "planted_identifiers_in_store": leaked,
            "stretch": {"windows": args.windows, "windows_with_any_alarm": len(false_alarm_windows),
                        "mean_ood_rate": float(np.mean([report["windows"][w]["ood_rate"] for w in stretch])),
                        "mean_distinct_images_per_window": float(np.mean([report["windows"][w]["n"] for w in stretch])),
                        "false_alarms_per_100_windows": 100 * len(false_alarm_windows) / args.windows,
                        "alarms_by_figure": rules_in_stretch},
            "shifts": shifts, "estimate_vs_truth": estimate, "cbpe_auroc_mae_all": float(np.mean(errs)),
            "cbpe_auroc_mae_held_out": float(np.mean(held_out)), "report_rules": report["rules"]}


def overhead(args, tag: str, home: Path, tmp: Path, bodies: list[bytes]) -> dict:
    """Saturated throughput with the log off and on: both servers up, bursts alternating in ABBA order over
    `--overhead-rounds` rounds (one server idles while the other is measured; after an "on" burst its rows are
    written before the next burst starts); images/s per burst and the ratio of the means."""
    from serving.local import LocalServer

    env = {"REMEDIS_MONITOR_SECRET": SECRET}
    store = tmp / "overhead.db"
    runs: dict[str, list[float]] = {"off": [], "on": []}
    with LocalServer(tag, home, serving_config(tmp, "overhead-off", None), env=env) as off, \
            LocalServer(tag, home, serving_config(tmp, "overhead-on", store), env=env) as on:
        servers, logged = {"off": off, "on": on}, 0
        for arm in ("off", "on"):  # warm-up: the batchers calibrate themselves
            Client(servers[arm].url, threads=32).send(bodies[:64])
        logged += 64
        for r in range(args.overhead_rounds):
            for arm in (("off", "on") if r % 2 == 0 else ("on", "off")):
                client = Client(servers[arm].url, threads=32)
                t0 = time.perf_counter()
                answers = client.send(bodies[: args.overhead_requests])
                runs[arm].append(sum(c == 200 for c, _ in answers) / (time.perf_counter() - t0))
                if arm == "on":
                    logged += args.overhead_requests
                    wait_rows(store, logged)
    on_mean, off_mean = float(np.mean(runs["on"])), float(np.mean(runs["off"]))
    return {"requests_per_burst": args.overhead_requests, "rounds": args.overhead_rounds, "clients": 32,
            "images_per_s": runs, "on_vs_off": on_mean / off_mean,
            "on_vs_off_per_round": [a / b for a, b in zip(runs["on"], runs["off"])]}


def killed(args, tag: str, home: Path, tmp: Path, bodies: list[bytes]) -> dict:
    """SIGKILL the service while 8 clients send; answers received against rows stored; integrity."""
    from remedis.monitor.writer import PredictionWriter
    from serving.local import LocalServer

    db = tmp / "killed.db"
    srv = LocalServer(tag, home, serving_config(tmp, "killed", db), env={"REMEDIS_MONITOR_SECRET": SECRET}).start()
    client, keys, stop = Client(srv.url), [], threading.Event()
    lock = threading.Lock()

    def loop(k):
        i = k
        while not stop.is_set():
            code, ans = client.one(bodies[i % len(bodies)])
            if ans:
                with lock:
                    keys.append(ans["key"])
            i += 8

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    deadline = time.time() + 300
    while len(keys) < args.kill_after and time.time() < deadline:
        time.sleep(0.01)
    srv.stop(kill=True)  # SIGKILL to the whole process group: API and model workers, no shutdown
    answered = len(keys)
    stop.set()
    for t in threads:
        t.join()
    con = sqlite3.connect(db)
    integrity = con.execute("pragma integrity_check").fetchone()[0]
    stored = {k for (k,) in con.execute("select key from predictions")}
    con.close()
    lost = [k for k in keys[:answered] if k not in stored]
    return {"answered_before_kill": answered, "rows_stored": len(stored), "answered_not_stored": len(lost),
            "integrity_check": integrity,
            "writer_flush_s": inspect.signature(PredictionWriter).parameters["flush_s"].default}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--windows", type=int, default=100, help="in-distribution windows after the reference")
    ap.add_argument("--reference-windows", type=int, default=2)
    ap.add_argument("--shift-windows", type=int, default=5)
    ap.add_argument("--per-window", type=int, default=50)
    ap.add_argument("--overhead-requests", type=int, default=800)
    ap.add_argument("--overhead-rounds", type=int, default=6)
    ap.add_argument("--kill-after", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", help="an adapted model folder to reuse (default: adapt one, about 5 min)")
    ap.add_argument("-o", "--output", type=Path)
    args = ap.parse_args()
    manifest = SHARED / "breast-ultrasound" / "manifest.csv"
    if not manifest.is_file():
        sys.exit("monitor_replay: ../shared/data/breast-ultrasound is not present")
    tmp = Path(tempfile.mkdtemp(prefix="monitor-replay-"))
    t0 = time.perf_counter()
    folder = Path(args.model) if args.model else adapt_model(tmp, manifest, args.image_size)
    adapt_s = time.perf_counter() - t0
    home = tmp / "bentoml"
    out = subprocess.run([sys.executable, "-m", "remedis.cli", "export", "--model", str(folder), "--name", "replay"],
                         env={**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"},
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    tag = out.split("model:")[1].split()[0]

    # The pools, as DICOM bytes: the site's GE test split, BUSI, the held-out scanners, contrast, chest X-rays.
    from pydicom.uid import generate_uid

    split = {r["image"]: r for r in csv.DictReader((folder.parent.parent / "manifest.csv").open())}
    rows = list(csv.DictReader(manifest.open()))
    truth = {"benign": "benign", "normal": "benign", "malignant": "malignant"}
    pools: dict[str, list] = {}

    def add(arm: str, items):
        pools[arm], pools[f"{arm}:truth"] = [], []
        for px, manu, model, label, modality in items:
            pools[arm].append(us_dicom(px, manu, model, generate_uid(), modality))
            pools[f"{arm}:truth"].append(label)

    test = [r for r in rows if split.get(str(manifest.parent / r["image"]), {}).get("split") == "test"]
    if not test:
        sys.exit("monitor_replay: no test split found in the adapted run's manifest")
    dev = {r["image"]: r["device"].split(" ", 1) for r in rows}
    id_items = [(grey(manifest.parent / r["image"]), *dev[r["image"]], truth[r["label"]], "US") for r in test]
    add("in-distribution", id_items)
    add("another site (BUSI)", ((grey(manifest.parent / r["image"]), "", "", truth[r["label"]], "US")
                                for r in rows if r["site"] == "BUSI"))
    add("held-out scanners (Toshiba, U-Systems)", ((grey(manifest.parent / r["image"]), *(dev[r["image"]] + [""])[:2],
                                                   truth[r["label"]], "US")
                                                  for r in rows if r["site"] == "BUS-BRA" and not r["device"].startswith("GE ")))
    add("contrast 70%", ((low_contrast(grey(manifest.parent / r["image"])), *dev[r["image"]], truth[r["label"]], "US") for r in test))
    chest = SHARED / "chest-xray" / "manifest.csv"
    nih = [r for r in csv.DictReader(chest.open()) if r["site"] == "NIH"][:200]
    cx = [us_dicom(grey(chest.parent / r["image"]), "", "", generate_uid(), "DX") for r in nih]
    # a 20% share: every fifth image of the pool is a chest X-ray (label: not a breast image, scored as benign)
    mixed, mixed_truth = [], []
    for i, (b, t) in enumerate(zip(pools["contrast 70%"], pools["contrast 70%:truth"])):
        mixed.append(cx[i % len(cx)] if i % 5 == 4 else pools["in-distribution"][i])
        mixed_truth.append("benign" if i % 5 == 4 else pools["in-distribution:truth"][i])
    pools["20% chest X-rays (DX)"], pools["20% chest X-rays (DX):truth"] = mixed, mixed_truth
    report_site = json.loads((folder.parent.parent / "report.json").read_text())["models"][0]["sites"]["BUS-BRA"]
    result = {"benchmark": "monitor_replay", "date": dt.date.today().isoformat(), "image_size": args.image_size,
              "model": {"backbone": "random init", "site": "BUS-BRA GE Logiq 5 + 7", "budget": "100%",
                        "adapt_s": adapt_s if not args.model else None, "folder": folder.name,
                        "test": {k: report_site.get(k) for k in ("n_images", "auroc", "auroc_ci", "ece")}},
              "pool_images": {k: len(v) for k, v in pools.items() if not k.endswith(":truth")},
              "settings": {k: getattr(args, k) for k in ("windows", "reference_windows", "shift_windows", "per_window", "seed")},
              "threads": os.cpu_count()}
    result["replay"] = replay(args, tag, home, tmp, pools)
    bodies = pools["in-distribution"] * 8
    result["overhead"] = overhead(args, tag, home, tmp, bodies)
    # every request of the kill test its own instance (its own key), so answers and rows pair one to one
    unique = [us_dicom(px, manu, model, generate_uid()) for _ in range(6) for px, manu, model, _, _ in id_items]
    result["killed"] = killed(args, tag, home, tmp, unique)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
