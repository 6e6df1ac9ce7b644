"""The DICOM gateway (issue 19): instances/s through it against the service's own throughput on the same
files, and seconds from C-STORE to the SR being visible in a real PACS (Orthanc). JSON to --out.

  service      the service's code path in this process (`serving.gateway.inference.LocalInference`:
               decode, contract check, forward, calibrated answer) over the same files, in batches of
               `batch_size`: images/s. The reference.
  gateway      the same files sent by C-STORE over 4 parallel associations (TCP_NODELAY, as dcmtk and
               Orthanc send) until every SR is acknowledged by the destination (Orthanc): instances/s
               and its ratio to the service (target >= 0.8x). Includes spooling with fsync, the quiet
               period, SR building (highdicom) and the C-STORE of the SRs to Orthanc.
  latency      one-instance studies sent one after another; seconds from the C-STORE to the SR found
               in Orthanc by QIDO-RS (polled every 50 ms): p50 / p99, with the quiet period stated.

Real CT pixels (../shared/data/ct-dicom, cropped to --size), a model like the tests' (resnet18 at
--model-size px, linear head fitted on 12 CT images). Orthanc needs root (it binds every interface, so
it runs in a private network namespace: this script re-runs itself under `unshare --net`).

    .venv/bin/python benchmarks/bench_gateway.py --out benchmarks/results/gateway-cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from gateway_support import ct_files, dcmtk_tool, free_port, make_model, study_from, wait_until  # noqa: E402
from netns.orthanc_gateway import Orthanc  # noqa: E402

from benchmarks._common import environment, fig  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def _bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def measure(args) -> dict:
    from pynetdicom import AE, StoragePresentationContexts

    from serving.gateway.inference import LocalInference
    from serving.gateway.send import tcp_nodelay
    from serving.gateway.settings import load_gateway_settings

    tmp = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    model = make_model(tmp / "model", ct_files(SHARED, 12), size=args.model_size, arch=args.arch)
    source = ct_files(SHARED, 1)[0]
    per_series = max(1, args.instances // args.series)
    storescu = dcmtk_tool("storescu") if args.sender == "dcmtk" else None
    if args.sender == "dcmtk" and storescu is None:
        raise RuntimeError("--sender dcmtk needs dcmtk's storescu (apt install dcmtk), or use --sender pynetdicom")

    def make_round(k: int) -> dict:
        """New studies (new UIDs) for one round: the datasets, their bytes and, for dcmtk, 4 folders of files."""
        instances = [ds for _ in range(args.series) for ds in study_from(source, per_series, series=1, size=args.size)]
        blobs = [_bytes(ds) for ds in instances]
        files = []  # written before any clock starts
        for j in range(4 if storescu else 0):
            folder = tmp / "send" / f"{k}-{j}"
            folder.mkdir(parents=True)
            for i, data in enumerate(blobs[j::4]):
                (folder / f"{i:05d}.dcm").write_bytes(data)
            files.append(sorted(str(f) for f in folder.iterdir()))
        return {"instances": instances, "blobs": blobs, "chunks": [instances[j::4] for j in range(4)], "files": files}

    def send_to(port: int, ae_title: str, chunk) -> list[int]:
        ae = AE(ae_title="BENCH")
        ae.requested_contexts = StoragePresentationContexts
        a = ae.associate("127.0.0.1", port, ae_title=ae_title)
        try:
            return [a.send_c_store(ds).Status for ds in chunk]
        finally:
            a.release()

    def send_all(r: dict, port: int, ae_title: str) -> tuple[float, float]:
        """A round's instances over 4 parallel associations: (wall seconds, sender CPU ms per instance)."""
        t0, c0 = time.perf_counter(), time.process_time()
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        with ThreadPoolExecutor(4) as pool:
            if storescu:  # one storescu process per association, as a modality or a PACS's forwarding job sends
                codes = list(pool.map(lambda f: subprocess.run(
                    [storescu, "-aet", "BENCH", "-aec", ae_title, "-to", "60", "-ta", "60", "-td", "60",
                     "127.0.0.1", str(port), *f], capture_output=True).returncode, r["files"]))
                assert codes == [0] * len(codes), f"storescu exit codes {codes}"
            else:
                statuses = [s for c in pool.map(lambda c: send_to(port, ae_title, c), r["chunks"]) for s in c]
                assert statuses == [0] * len(statuses), sorted(set(statuses))
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        children = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
        return wall, 1000 * (time.process_time() - c0 + children) / len(r["instances"])

    local = LocalInference(model, threads=args.threads)
    orthanc = Orthanc(tmp / "orthanc", free_port()).start()  # its "gw" modality is unused here
    tcp_nodelay()
    config = {
        "port": free_port(), "spool": str(tmp / "spool"), "quiet_seconds": args.quiet, "batch_size": args.batch_size,
        "workers": args.workers,
        "routes": [{"model": str(model), "modalities": ["CT"]}], "stow": {"enabled": False},
        "destination": {"kind": "dimse", "port": orthanc.dicom, "ae_title": "ORTHANC"}}
    settings = load_gateway_settings(None, config)
    rounds, received = [], 0
    try:
        with _gateway(settings, config, tmp, args.in_process, args.py_spy) as (status, cpu_s):
            def send(chunk):  # the latency studies: one instance at a time, from this process
                return send_to(settings.port, settings.ae_title, chunk)

            for k in range(args.rounds):  # each round: both references, then the gateway, on new studies
                r = make_round(k)
                n, blobs = len(r["instances"]), r["blobs"]
                local.predict(blobs[:args.batch_size])  # warm-up
                t0, c0 = time.perf_counter(), time.process_time()
                for i in range(0, n, args.batch_size):
                    local.predict(blobs[i:i + args.batch_size])
                service = {"ips": n / (time.perf_counter() - t0), "cpu_ms": 1000 * (time.process_time() - c0) / n}
                # The PACS-side anchor: Orthanc (C++) receiving the same instances over the same 4 associations,
                # each acknowledged once stored (its index and storage on this machine's disk).
                before = httpx.get(f"{orthanc.url}/statistics", timeout=30).json()["CountInstances"]
                orthanc_s, sender_ms = send_all(r, orthanc.dicom, "ORTHANC")
                stored = httpx.get(f"{orthanc.url}/statistics", timeout=30).json()["CountInstances"] - before
                assert stored == n, f"Orthanc stored {stored} of {n} instances"

                profiler = _start_profile() if args.profile else None
                t0, c0 = time.perf_counter(), cpu_s()
                t_sent, _ = send_all(r, settings.port, settings.ae_title)
                received += n
                counts = status()
                assert counts["received"] == received and counts["refused"] == 0, counts
                wait_until(lambda: status()["processed"] >= received and status()["results_unsent"] == 0,
                           timeout=3600, what="all results delivered")
                gateway_s = time.perf_counter() - t0
                gateway_ms, receiving_ms = (1000 * (c - c_0) / n for c, c_0 in zip(cpu_s(), c0))
                rounds.append({"service_ips": service["ips"], "service_cpu_ms": service["cpu_ms"],
                               "orthanc_ips": n / orthanc_s, "sender_cpu_ms": sender_ms, "gateway_ips": n / gateway_s,
                               "accepted_ips": n / t_sent, "gateway_cpu_ms": gateway_ms, "receiving_cpu_ms": receiving_ms,
                               "profile": _stop_profile(profiler, gateway_s) if profiler else None})
                rounds[-1]["ratio"] = rounds[-1]["gateway_ips"] / min(service["ips"], n / orthanc_s)
                print(f"round {k + 1}: gateway {rounds[-1]['gateway_ips']:.1f}/s, service {service['ips']:.1f}/s, "
                      f"Orthanc {n / orthanc_s:.1f}/s, ratio {rounds[-1]['ratio']:.3f}", flush=True)

            latencies = []
            for _ in range(args.latency_studies):
                ds = study_from(source, 1, size=args.size)[0]
                t0 = time.perf_counter()
                assert send([ds]) == [0]
                wait_until(lambda: orthanc.dicomweb().search_for_series(ds.StudyInstanceUID, search_filters={"Modality": "SR"}),
                           timeout=120, what="the SR in Orthanc")
                latencies.append(time.perf_counter() - t0)
            setup = []  # a modality often sends each study on an association of its own
            for _ in range(20):
                t0 = time.perf_counter()
                assert send([]) == []
                setup.append(time.perf_counter() - t0)
            final = status()
    finally:
        orthanc.stop()
    # A run that succeeded leaves nothing behind (Orthanc's storage, the spool, the files sent: a few hundred MB);
    # a failed one keeps the folder, with the gateway's and Orthanc's logs.
    shutil.rmtree(tmp, ignore_errors=True)
    lat = np.array(latencies)
    med = {k: float(np.median([r[k] for r in rounds])) for k in rounds[0] if k != "profile"}
    slower = min(med["service_ips"], med["orthanc_ips"])
    per_round = {"per_round": [round(r["ratio"], 4) for r in rounds]}
    return {
        "benchmark": "gateway", "environment": environment(), "instances": len(rounds) and received // len(rounds),
        "rounds": len(rounds), "series": args.series, "image_size": args.size, "model_size": args.model_size,
        "arch": args.arch, "workers": args.workers, "batch_size": args.batch_size, "quiet_seconds": args.quiet,
        "sender": args.sender, "summary": "figures are medians over the rounds; each round measured both references "
        "and the gateway on new studies, one after another",
        "figures": [
            fig("service images/s (in process, same files)", med["service_ips"], "images/s"),
            fig("service CPU per image (in process, its threads)", med["service_cpu_ms"], "ms"),
            fig("Orthanc receiving the same instances (C-STORE, 4 associations)", med["orthanc_ips"], "instances/s"),
            fig("gateway instances/s (C-STORE in to SR acknowledged by Orthanc)", med["gateway_ips"], "instances/s",
                reference=slower, reference_name="the slower of: service images/s, Orthanc receiving", goal=">= 0.8x"),
            fig("gateway / the slower reference, median of the rounds' ratios", med["ratio"], "ratio", **per_round),
            fig("gateway / service in process", med["gateway_ips"], "instances/s", reference=med["service_ips"],
                reference_name="service images/s"),
            fig("gateway / Orthanc receiving", med["gateway_ips"], "instances/s", reference=med["orthanc_ips"],
                reference_name="Orthanc receiving"),
            fig("C-STORE accepted (4 associations)", med["accepted_ips"], "instances/s"),
            fig(f"sender CPU per instance ({args.sender}, to Orthanc)", med["sender_cpu_ms"], "ms"),
            fig("gateway CPU per instance, all its processes" + (" (and the sender's)" if args.in_process else ""),
                med["gateway_cpu_ms"], "ms"),
            *([] if args.in_process else [fig("gateway CPU per instance, the receiving process (not its workers)",
                                              med["receiving_cpu_ms"], "ms")]),
            fig("C-STORE to SR in Orthanc p50", float(np.percentile(lat, 50)), "s", quiet_seconds=args.quiet),
            fig("C-STORE to SR in Orthanc p99", float(np.percentile(lat, 99)), "s", quiet_seconds=args.quiet),
            fig("association set-up and release (128 storage contexts proposed), median of 20",
                1000 * float(np.median(setup)), "ms"),
        ],
        "round_figures": [{k: v for k, v in r.items() if k != "profile"} for r in rounds],
        "gateway": "in the benchmark's process" if args.in_process else "its own process (remedis-gateway serve), as deployed",
        "gateway_status": {k: final[k] for k in ("received", "processed", "sent", "failed", "refused")},
        "profile": rounds[-1]["profile"],
    }


@contextlib.contextmanager
def _gateway(settings, config: dict, tmp: Path, in_process: bool, py_spy: str | None = None):
    """The gateway under test, yielding a function that reads its counters. By default its own process, started
    as deployed (`remedis-gateway serve --config`), so that the benchmark's senders do not share its
    interpreter; `in_process`: a `Gateway` in this process (what `--profile` needs)."""
    if in_process:
        from serving.gateway.app import Gateway

        with Gateway(settings) as gw:
            yield gw.status, lambda: (time.process_time(), time.process_time())
        return
    import yaml
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from serving.gateway.spool import Spool

    cfg = tmp / "gateway.yaml"
    cfg.write_text(yaml.safe_dump(config))
    log = open(tmp / "gateway.log", "w")
    cmd = [sys.executable, "-m", "serving.gateway.cli", "serve", "--config", str(cfg)]
    if py_spy:  # sampled stacks of every thread and worker process, as collapsed stacks (flame graph input)
        cmd = [str(Path(sys.executable).parent / "py-spy"), "record", "--format", "raw", "--threads", "--subprocesses",
               "--rate", "100", "--output", py_spy, "--", *cmd]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def echo() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway exited ({proc.returncode}); see {tmp / 'gateway.log'}")
        ae = AE(ae_title="BENCH")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", settings.port, ae_title=settings.ae_title)
        if not assoc.is_established:
            return False
        ok = assoc.send_c_echo().Status == 0
        assoc.release()
        return ok

    try:
        wait_until(echo, timeout=120, what="the gateway answering C-ECHO", every=0.2)
        yield (lambda: Spool(settings.spool).status()), lambda: (_cpu_seconds(proc.pid), _cpu_seconds(proc.pid, False))
    finally:
        proc.send_signal(signal.SIGINT if py_spy else signal.SIGTERM)  # py-spy writes its file on SIGINT
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _cpu_seconds(pid: int, children: bool = True) -> float:
    """User and system CPU seconds of a process and its threads (/proc), with its children's (`children`: its
    live child processes, recursively, and those it waited for)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    if not children:
        return sum(int(v) for v in fields[11:13]) / ticks  # utime, stime
    total = sum(int(v) for v in fields[11:15]) / ticks  # utime, stime, cutime, cstime
    kids = {c for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()}
    for child in kids:
        try:
            total += _cpu_seconds(int(child))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def _start_profile():
    """CPU time per function in every thread of this process (yappi: cProfile sees one thread only)."""
    import yappi

    yappi.set_clock_type("cpu")
    yappi.start(builtins=True)
    return yappi


def _stop_profile(yappi, wall_s: float, top: int = 30) -> dict:
    """The gateway run's CPU by thread and the functions with the most own CPU time (seconds), and by stage."""
    yappi.stop()
    funcs = yappi.get_func_stats()
    threads = yappi.get_thread_stats()
    rows = sorted(((f.tsub, f.ttot, f.ncall, f"{Path(f.module).name}:{f.name}") for f in funcs), reverse=True)
    stages = {"pynetdicom (receive, send)": "pynetdicom", "pydicom": "pydicom", "highdicom (SR)": "highdicom",
              "torch (forward)": "torch", "gateway spool": "spool", "posix (fsync, write, ...)": "posix",
              "socket": "socket"}
    by_stage = {k: 0.0 for k in stages}
    for f in funcs:
        for name, needle in stages.items():
            if needle in f.module:
                by_stage[name] += f.tsub
                break
    out = {"clock": "cpu", "wall_s": wall_s, "cpu_s_total": sum(t.ttot for t in threads),
           "threads": sorted(({"name": t.name, "cpu_s": t.ttot} for t in threads), key=lambda t: -t["cpu_s"])[:12],
           "own_cpu_s_by_module": by_stage,
           "top_functions": [{"function": n, "own_cpu_s": round(a, 3), "total_cpu_s": round(b, 3), "calls": c}
                             for a, b, c, n in rows[:top]]}
    yappi.clear_stats()
    return out


def run(reduced: bool) -> dict:
    """For `benchmarks/run.py`: this benchmark in its own network namespace (reduced: 120 instances)."""
    out = Path(tempfile.mkdtemp(prefix="bench-gateway-out-")) / "gateway.json"
    sizes = ["--instances", "120", "--rounds", "1", "--latency-studies", "10"] if reduced else []
    if main([*sizes, "--out", str(out)]) != 0 or not out.is_file():
        raise RuntimeError("bench_gateway failed (it needs root, unshare, Orthanc and ../shared/data)")
    return json.loads(out.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--instances", type=int, default=600, help="instances per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds of (service, Orthanc, gateway) on new studies; "
                   "figures are their medians (this machine's speed drifts by 15%% between minutes)")
    p.add_argument("--series", type=int, default=12)
    p.add_argument("--size", type=int, default=256, help="source pixels (cropped from real CT)")
    p.add_argument("--model-size", type=int, default=64)
    p.add_argument("--arch", default="resnet18", help="the model's backbone (the issue's large arm: resnet50 at 224)")
    p.add_argument("--workers", type=int, default=2, help="the gateway's `workers` (0: batches in its own thread)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sender", choices=["dcmtk", "pynetdicom"], default="dcmtk",
                   help="what sends the instances, to Orthanc and to the gateway alike: dcmtk's storescu, one "
                   "process per association (C++, as modalities and PACS send; default), or pynetdicom threads "
                   "in this process (stalled now and then with ResNet-50 on 2 cores: see docs/gateway.md)")
    p.add_argument("--quiet", type=float, default=0.5, help="the gateway's quiet_seconds")
    p.add_argument("--latency-studies", type=int, default=30)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--in-process", action="store_true", help="run the gateway in this process (default: its own, as deployed)")
    p.add_argument("--profile", action="store_true", help="CPU profile of the gateway run by thread and function "
                   "(pip install yappi; implies --in-process)")
    p.add_argument("--py-spy", metavar="FILE", help="sample the gateway process with py-spy into FILE (collapsed "
                   "stacks by thread; pip install py-spy)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gateway-cpu.json"))
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.in_process = args.in_process or args.profile
    if not args.inner:
        if os.geteuid() != 0:
            print("bench_gateway: needs root for a private network namespace (Orthanc binds every interface)", file=sys.stderr)
            return 2
        cmd = f"ip link set lo up && exec {sys.executable} {Path(__file__).resolve()} --inner " + " ".join(argv or sys.argv[1:])
        return subprocess.run(["unshare", "--net", "sh", "-c", cmd]).returncode
    result = measure(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["figures"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
