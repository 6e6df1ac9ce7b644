"""The prediction log on PostgreSQL, as several service replicas share it: Debian's postgresql, a throwaway
cluster started by the test (a Unix socket only, no TCP), two writer processes at once.

Skips without PostgreSQL's server binaries; `make test` installs Debian's `postgresql` when it runs as root,
so in CI it runs."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BINDIR = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))


@pytest.fixture(scope="module")
def postgres():
    pytest.importorskip("psycopg")
    if not BINDIR:
        pytest.skip("PostgreSQL server binaries not found (Debian package postgresql)")
    bindir = Path(BINDIR[-1]).parent
    base = Path(tempfile.mkdtemp(prefix="remedis-pg-"))  # short: a socket path must stay under 107 bytes
    run_as: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root: the package's postgres user runs it
        shutil.chown(base, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    data, sock = base / "data", base
    subprocess.run([*run_as, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "remedis", "--no-sync"],
                   check=True, capture_output=True, timeout=120)
    subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-w", "-t", "60", "-l", str(base / "log"),
                    "-o", f"-k {sock} -c listen_addresses='' -c fsync=off", "start"], check=True, capture_output=True, timeout=120)
    try:
        yield f"postgresql+psycopg://remedis@/postgres?host={sock}"
    finally:
        subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def test_two_replicas_log_into_one_postgresql_store_and_labels_join(postgres):
    from remedis.monitor.store import PredictionStore

    writer = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from remedis.monitor.store import PredictionStore
        from remedis.monitor.writer import PredictionWriter
        replica = sys.argv[1]
        w = PredictionWriter(PredictionStore({postgres!r}), flush_s=0.05)
        for i in range(500):
            w.submit({{"key": f"i-{{replica}}-{{i}}", "model_name": "site-b", "caller": replica,
                       "probabilities": {{"benign": 0.4, "malignant": 0.6}}, "label": "malignant", "ood": False,
                       "embedding": [0.5] * 8}})
        w.close()
        print(w.stats()["written"])
    """)
    procs = [subprocess.Popen([sys.executable, "-c", writer, name], stdout=subprocess.PIPE, text=True) for name in ("a", "b")]
    written = [int(p.communicate(timeout=300)[0].strip() or 0) for p in procs]
    assert written == [500, 500] and all(p.returncode == 0 for p in procs)
    store = PredictionStore(postgres)
    assert store.engine.dialect.name == "postgresql" and store.count() == 1000
    assert store.attach_labels([("i-a-7", "benign"), ("i-b-9", "malignant")], source="pathology") == (2, [])
    assert store.attach_labels([("i-c-1", "benign")]) == (0, ["i-c-1"])
    rows = {r["key"]: r for r in store.rows()}
    assert rows["i-a-7"]["truth"] == "benign" and rows["i-b-9"]["truth"] == "malignant" and rows["i-a-8"]["truth"] is None
    assert rows["i-b-0"]["probabilities"] == {"benign": 0.4, "malignant": 0.6} and len(rows["i-b-0"]["embedding"]) == 8
    assert {r["caller"] for r in rows.values()} == {"a", "b"}
    store.close()


def test_replicas_starting_together_create_the_tables_once(postgres):
    """Eight replicas open one fresh database at the same instant: every one gets its store (two concurrent
    `CREATE TABLE IF NOT EXISTS` collide on PostgreSQL's catalog unless they are serialised)."""
    import threading

    import sqlalchemy

    from remedis.monitor.store import PredictionStore

    admin = sqlalchemy.create_engine(postgres, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text("CREATE DATABASE fresh_start"))
    admin.dispose()
    url = postgres.replace("/postgres?", "/fresh_start?")
    barrier, errors, stores = threading.Barrier(8), [], []

    def start():
        barrier.wait(timeout=60)
        try:
            stores.append(PredictionStore(url))
        except Exception as exc:  # what a replica that lost the race would raise
            errors.append(repr(exc))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and len(stores) == 8
    assert stores[0].append([{"key": "k", "probabilities": {"a": 1.0}, "label": "a"}]) == 1 and stores[1].count() == 1
    for s in stores:
        s.close()
