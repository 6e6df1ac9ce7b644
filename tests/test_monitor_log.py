"""The prediction log (remedis.monitor): the store, the background writer, crash safety, labels that come later."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from remedis.config import ConfigError
from remedis.monitor.keys import bytes_key, instance_key
from remedis.monitor.store import PredictionStore
from remedis.monitor.writer import PredictionWriter

ROOT = Path(__file__).resolve().parent.parent
SECRET = b"site-secret-0123456789"


def _row(i: int, **kw) -> dict:
    return {"key": f"i-{i:032d}", "model_name": "site-b", "model_version": "1", "caller": "api-key", "modality": "US",
            "probabilities": {"benign": 1 - i / 100, "malignant": i / 100}, "label": "benign", "decision": "operating_point",
            "ood": i % 7 == 0, "ood_score": float(i), "ood_reasons": ["size"] if i % 7 == 0 else [], **kw}


def test_store_round_trip_in_wal_mode_and_labels_join_all_or_nothing(tmp_path):
    store = PredictionStore(str(tmp_path / "p.db"))  # a bare path is a SQLite file
    emb = np.linspace(-1, 1, 8)
    assert store.append([_row(i, embedding=emb if i == 1 else None) for i in range(5)]) == 5
    with sqlite3.connect(tmp_path / "p.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    rows = list(store.rows())
    assert [r["key"] for r in rows] == [f"i-{i:032d}" for i in range(5)] and store.count() == 5
    assert rows[3]["probabilities"] == {"benign": 0.97, "malignant": 0.03} and rows[0]["ood_reasons"] == ["size"]
    assert rows[1]["embedding"].dtype == np.float16 and np.allclose(rows[1]["embedding"], emb, atol=1e-3)
    # An unknown key: nothing attached, the unknown one named.
    assert store.attach_labels([(rows[0]["key"], "malignant"), ("i-nope", "benign")]) == (0, ["i-nope"])
    assert all(r["truth"] is None for r in store.rows())
    assert store.attach_labels([(rows[0]["key"], "malignant"), (rows[2]["key"], "benign")], source="pathology") == (2, [])
    assert store.attach_labels([(rows[0]["key"], "benign")]) == (1, [])  # a later read replaces the earlier one
    assert [r["truth"] for r in store.rows()] == ["benign", None, "benign", None, None]
    assert [r["key"] for r in store.rows(role="shadow")] == []
    with pytest.raises(ValueError, match="pseudonymous key"):
        store.append([_row(9, key="")])
    store.close()


def test_keys_are_hmacs_that_need_the_secret():
    uid = "1.2.826.0.1.3680043.8.498.12345"
    assert instance_key(uid, SECRET) == instance_key(uid + "\x00", SECRET) != instance_key(uid, SECRET + b"x")
    assert uid not in instance_key(uid, SECRET) and len(instance_key(uid, SECRET)) == 34
    assert bytes_key(b"png bytes", SECRET).startswith("b-") and bytes_key(b"png bytes", SECRET) != bytes_key(b"png byte", SECRET)
    with pytest.raises(ValueError):
        instance_key(" ", SECRET)


def test_writer_batches_off_the_caller_and_counts_what_it_cannot_keep(tmp_path):
    store = PredictionStore(f"sqlite:///{tmp_path / 'w.db'}")
    writer = PredictionWriter(store, capacity=10_000, flush_s=0.05)
    t0 = time.perf_counter()
    assert all(writer.submit(_row(i)) for i in range(2000))
    assert time.perf_counter() - t0 < 2.0  # submit only queues
    assert writer.flush(30) and store.count() == 2000 and writer.stats()["written"] == 2000
    writer.close()

    class Down(PredictionStore):
        def append(self, rows):
            raise OSError("store down")

    down = PredictionWriter(Down(f"sqlite:///{tmp_path / 'd.db'}"), capacity=3, flush_s=0.01, max_attempts=2)
    accepted = sum(down.submit(_row(i)) for i in range(50))
    assert down.flush(30)
    stats = down.stats()
    assert stats["written"] == 0 and stats["dropped"] == 50 and accepted < 50 and stats["failed_batches"] >= 1
    down.close()


def test_a_killed_writer_loses_only_rows_not_yet_committed_and_never_corrupts_the_store(tmp_path):
    db = tmp_path / "kill.db"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from remedis.monitor.store import PredictionStore
        from remedis.monitor.writer import PredictionWriter
        w = PredictionWriter(PredictionStore({str(db)!r}), flush_s=0.02)
        i = 0
        while True:
            for _ in range(50):
                w.submit({{"key": "k-%d" % i, "probabilities": {{"a": 0.5, "b": 0.5}}, "label": "a"}})
                i += 1
            print(w.written, flush=True)
            time.sleep(0.005)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    committed = 0
    deadline = time.time() + 60
    while committed < 2000 and time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        committed = int(line)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert committed >= 2000, "the writer did not commit in time"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = conn.execute("SELECT COUNT(*) FROM predictions").fetchone()[0]
    assert stored >= committed  # everything reported committed survived the kill
    store = PredictionStore(str(db))  # and the store opens and takes rows again
    assert store.append([_row(1)]) == 1 and store.count() == stored + 1
    store.close()


def test_remedis_monitor_label_by_key_or_uid_all_or_nothing(tmp_path, monkeypatch, capsys):
    from remedis.cli import main

    url = f"sqlite:///{tmp_path / 'l.db'}"
    store = PredictionStore(url)
    uid = "1.2.840.10008.999.1"
    store.append([_row(1), _row(2, key=instance_key(uid, SECRET))])
    (tmp_path / "by-key.csv").write_text(f"key,label\n{_row(1)['key']},malignant\n")
    (tmp_path / "by-uid.csv").write_text(f"sop_instance_uid,label,source\n{uid},benign,pathology\n")
    (tmp_path / "typo.csv").write_text(f"key,label\n{_row(1)['key']},benign\ni-typo,benign\n")
    (tmp_path / "bad.csv").write_text("patient,label\nx,benign\n")
    assert main(["monitor", "label", str(tmp_path / "by-key.csv"), "--store", url]) == 0
    monkeypatch.delenv("REMEDIS_MONITOR_SECRET", raising=False)
    assert main(["monitor", "label", str(tmp_path / "by-uid.csv"), "--store", url]) == 2  # a UID needs the secret
    assert "needs the site's secret" in capsys.readouterr().err
    monkeypatch.setenv("REMEDIS_MONITOR_SECRET", SECRET.decode())
    assert main(["monitor", "label", str(tmp_path / "by-uid.csv"), "--store", url]) == 0
    assert "1 attached" in capsys.readouterr().out
    assert main(["monitor", "label", str(tmp_path / "typo.csv"), "--store", url]) == 2
    assert "1 of 2 row(s) match no logged prediction" in capsys.readouterr().err
    assert main(["monitor", "label", str(tmp_path / "bad.csv"), "--store", url]) == 2
    assert [r["truth"] for r in store.rows()] == ["malignant", "benign"]  # the typo file changed nothing
    with pytest.raises(ConfigError, match="shorter than 16"):
        from remedis.monitor.labels import read_secret

        (tmp_path / "short").write_text("abc\n")
        read_secret(str(tmp_path / "short"))
    store.close()
