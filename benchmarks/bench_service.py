"""Service throughput and latency under concurrency, against the raw model forward (same process,
best batch size) and against the same service with batching off. Prints one JSON object.

    .venv/bin/python benchmarks/bench_service.py [--image-size 128] [--clients 16] [--saturate 64] [--requests 400] [--load 1000]

Everything runs on this machine over loopback: a small adapted model (resnetv2_18_bit, random
weights: speed does not depend on them) is exported to a temporary BentoML store and served by
`bentoml serve` three times (batching on; on without the API worker's request coalescing; off).
The clients send PNG uploads; the raw reference is `ModelRuntime.forward` on preprocessed tensors
(no decode, no HTTP), so the service/raw ratio is the share of the model's own speed the whole
serving path keeps. 16 clients measure latency under
concurrency; `--saturate N` clients measure throughput when the batcher can fill its batches (the
raw reference is the best batch size, which 16 clients cannot form). Targets (issue 7): throughput at
saturation >= 0.8x raw (`saturated_vs_raw_forward`), batched >= 2x unbatched. `--load N` adds the
mixed good/bad load run (0 5xx, 0 lost expected).
"""

from __future__ import annotations

import argparse
import json
import os
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


def make_model(tmp: Path, image_size: int, gpu: int) -> tuple[Path, str, Path]:
    import torch

    from remedis.adapt.model import AdaptedModel
    from remedis.adapt.ood import fit_ood_detector
    from remedis.data.contract import InputContract, SourceInfo
    from remedis.data.preprocess import Preprocessing
    from remedis.models import Classifier

    torch.manual_seed(0)
    pre = Preprocessing(image_size=image_size)
    model = AdaptedModel(Classifier("resnetv2_18_bit", 2, in_chans=1), ["benign", "malignant"], pre)
    # A complete folder, as `remedis adapt` writes it (export refuses one without its OOD gate): an input contract
    # and a Mahalanobis detector fitted on noise images like the ones the clients send.
    pixels = torch.rand(64, 1, image_size, image_size, generator=torch.Generator().manual_seed(0))
    model.input_contract = InputContract.fit([SourceInfo("png", None, "MONOCHROME2", 1, image_size, image_size, 1)] * 64, pixels)
    with torch.inference_mode():
        x = pre.normalize(pixels)
        emb, logits = model.embed(x).numpy(), model.logits(x).numpy()
    folder = model.save(tmp / "adapted")
    fit_ood_detector("mahalanobis", emb[:48], (logits[:48].argmax(1)), logits[48:], emb[48:]).save(folder)
    home = tmp / "bentoml"
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    out = subprocess.run([sys.executable, "-m", "remedis.cli", "export", "--model", str(folder), "--name", "bench"],
                         env=env, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return folder, out.split("model:")[1].split()[0], home


def raw_forward(folder: Path, image_size: int, gpu: int, seconds: float = 3.0) -> dict:
    import torch

    from serving.runtime import ModelRuntime

    rt = ModelRuntime.load(folder, gpu=gpu, threads=1 if gpu == 0 else None)
    by_batch = {}
    for bs in (1, 4, 8, 16, 32):
        x = np.random.default_rng(0).standard_normal((bs, 1, image_size, image_size)).astype(np.float32)
        rt.forward(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 5:
            rt.forward(x)
            n += bs
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        by_batch[bs] = n / (time.perf_counter() - t0)
    best = max(by_batch, key=by_batch.get)
    return {"device": str(rt.device), "best_batch": best, "images_per_s": by_batch[best],
            "by_batch": {str(k): round(v, 1) for k, v in by_batch.items()}}


def raw_at(raw: dict, batch: float | None) -> float:
    """Raw images/s at the largest measured batch size not above `batch` (best batch when unknown)."""
    sizes = sorted(int(k) for k in raw["by_batch"])
    if batch is None:
        return raw["images_per_s"]
    return raw["by_batch"][str(max([s for s in sizes if s <= batch] or sizes[:1]))]


def pngs(image_size: int, n: int = 16) -> list[bytes]:
    import io

    from PIL import Image

    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray((rng.random((image_size, image_size)) * 255).astype(np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def multipart(file: tuple[str, bytes, str]) -> tuple[bytes, dict]:
    """A multipart/form-data body with one `image` field, and its headers."""
    name, data, ctype = file
    boundary = "remedis-bench-7d1e3f"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            f"Content-Type: {ctype}\r\n\r\n").encode()
    body = head + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": str(len(body))}


def drive(url: str, bodies: list[tuple[str, tuple]], clients: int) -> dict:
    """Send every (route, file) from `clients` threads, each with its own keep-alive connection.

    The load generator shares this machine's cores with the service, so it is kept light: bodies are
    encoded before the clock starts and sent with the standard library's http.client (httpx took
    0.25-0.33 of a core at 64 clients, this 0.04-0.05). `client_cores` records what it used.
    """
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(url)
    work = [(f"/{route}", *multipart(file)) for route, file in bodies]
    local = threading.local()
    lat, codes, lock = [], [], threading.Lock()

    def call(item):
        path, body, headers = item
        if getattr(local, "c", None) is None:
            local.c = http.client.HTTPConnection(where.hostname, where.port, timeout=120)
        t0 = time.perf_counter()
        try:
            local.c.request("POST", path, body=body, headers=headers)
            resp = local.c.getresponse()
            resp.read()  # drain, so the connection can carry the next request
            code = resp.status
        except (OSError, http.client.HTTPException):
            code = -1
            local.c.close()
            local.c = None
        with lock:
            lat.append(time.perf_counter() - t0)
            codes.append(code)

    t0, cpu0 = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(call, work))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    ms = np.array(lat) * 1000
    return {"requests": len(bodies), "answered": len(codes) - codes.count(-1), "lost": codes.count(-1),
            "status_5xx": sum(1 for c in codes if c >= 500), "status_200": codes.count(200),
            "images_per_s": codes.count(200) / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "wall_s": wall, "client_cores": cpu / wall}


def batch_counts(url: str) -> tuple[float, float]:
    """(forward passes, images) the model worker has run so far, from the Prometheus metrics."""
    import re
    import urllib.request

    text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    # the model worker's own histogram: BentoML's adaptive_batch_size counts calls, which carry
    # several requests each when the API worker coalesces them
    c = sum(map(float, re.findall(r'^remedis_forward_batch_images_count(?:\{[^}]*\})? ([0-9.e+]+)', text, re.M)))
    s = sum(map(float, re.findall(r'^remedis_forward_batch_images_sum(?:\{[^}]*\})? ([0-9.e+]+)', text, re.M)))
    return c, s


def mean_batch(url: str) -> float | None:
    c, s = batch_counts(url)
    return s / c if c else None


def serve_and_measure(tag: str, home: Path, tmp: Path, batching: bool, args, files: list[bytes],
                      coalesce: int = 2) -> dict:
    from serving.local import LocalServer

    cfg = tmp / f"serving-{'on' if batching else 'off'}-{coalesce}.yaml"
    cfg.write_text(f"batching: {{enabled: {str(batching).lower()}, max_batch_size: {args.max_batch}, max_latency_ms: 60000, "
                   f"coalesce_in_flight: {coalesce}}}\n"
                   f"resources: {{cpu: 1, gpu: {args.gpu}}}\n")
    with LocalServer(tag, home, cfg) as srv:
        warm = [("predict", ("a.png", files[i % len(files)], "image/png")) for i in range(2 * args.clients)]
        drive(srv.url, warm, args.clients)  # BentoML's batcher calibrates itself on its first requests
        body = [("predict", ("a.png", files[i % len(files)], "image/png")) for i in range(args.requests)]
        result = drive(srv.url, body, args.clients)
        result["mean_batch"] = mean_batch(srv.url)
        if batching and args.saturate:
            # Throughput at saturation: enough clients in flight that the batcher can fill max_batch_size
            # while earlier answers travel back (16 clients keep ~8 images queued, see mean_batch).
            drive(srv.url, warm, args.saturate)
            before = batch_counts(srv.url)
            body = [("predict", ("a.png", files[i % len(files)], "image/png")) for i in range(2 * args.requests)]
            sat = drive(srv.url, body, args.saturate)
            after = batch_counts(srv.url)
            sat["clients"] = args.saturate
            sat["mean_batch"] = (after[1] - before[1]) / (after[0] - before[0]) if after[0] > before[0] else None
            result["saturated"] = sat
        if batching and args.load:
            good = [("a.png", f, "image/png") for f in files]
            bad = [("x.png", b"garbage" * 20, "image/png"), ("x.dcm", b"\0" * 128 + b"DICM" + b"\1" * 64, "application/dicom")]
            mixed = [("embed" if i % 7 == 3 else "predict", bad[i % 2] if i % 5 == 4 else good[i % len(good)])
                     for i in range(args.load)]
            load = drive(srv.url, mixed, args.clients)
            load["expected_200"] = sum(1 for i in range(args.load) if i % 5 != 4)
            result["load"] = load
    return result


def run(reduced: bool) -> dict:
    """Entry point for benchmarks/run.py: three service start-ups cost ~3 minutes, so full mode only."""
    if reduced:
        return {"skipped": "the service benchmark runs in full mode only (three server start-ups)"}
    return measure(argparse.Namespace(image_size=128, clients=16, requests=400, max_batch=32, gpu=0, load=0, saturate=64,
                                      compare_coalescing=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--gpu", type=int, default=0)
    p.add_argument("--saturate", type=int, default=64,
                   help="also measure the batched service with this many clients (0 = skip)")
    p.add_argument("--load", type=int, default=0, help="also send this many mixed good/bad requests (e.g. 1000)")
    p.add_argument("--no-compare-coalescing", dest="compare_coalescing", action="store_false",
                   help="skip the batched run with the API worker's request coalescing off")
    print(json.dumps(measure(p.parse_args()), indent=2))


def measure(args) -> dict:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-service-") as d:
        tmp = Path(d)
        folder, tag, home = make_model(tmp, args.image_size, args.gpu)
        files = pngs(args.image_size)
        raw = raw_forward(folder, args.image_size, args.gpu)
        print(json.dumps({"raw_forward": raw}), file=sys.stderr)
        batched = serve_and_measure(tag, home, tmp, True, args, files)
        print(json.dumps({"service_batched": batched}), file=sys.stderr)
        # the same batched service, one model-worker call per request (the API worker's coalescing off)
        uncoalesced = serve_and_measure(tag, home, tmp, True, args, files, coalesce=0) if args.compare_coalescing else None
        unbatched = serve_and_measure(tag, home, tmp, False, args, files)
    return {
        "benchmark": "service", "image_size": args.image_size, "clients": args.clients, "requests": args.requests,
        "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
        "raw_forward": raw, "service_batched": batched, "service_unbatched": unbatched,
        **({"service_batched_uncoalesced": uncoalesced} if uncoalesced else {}),
        "ratios": {"batched_vs_raw_forward": batched["images_per_s"] / raw["images_per_s"],
                   "batched_vs_unbatched": batched["images_per_s"] / unbatched["images_per_s"],
                   # the raw forward at the batch size the clients actually formed (largest measured <= it)
                   "batched_vs_raw_at_formed_batch": batched["images_per_s"] / raw_at(raw, batched.get("mean_batch")),
                   # what batching alone can buy on this device: the raw forward at the formed batch vs batch 1
                   "raw_formed_batch_vs_raw_batch1": raw_at(raw, batched.get("mean_batch")) / raw["by_batch"]["1"],
                   **({"saturated_vs_raw_forward": batched["saturated"]["images_per_s"] / raw["images_per_s"]}
                      if "saturated" in batched else {}),
                   **({"coalesced_vs_uncoalesced": batched["images_per_s"] / uncoalesced["images_per_s"]}
                      if uncoalesced else {})},
        "targets": {"saturated_vs_raw_forward": 0.8, "batched_vs_unbatched": 2.0},
    }


if __name__ == "__main__":
    main()
