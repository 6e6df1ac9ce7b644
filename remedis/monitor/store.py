"""The prediction log: every answer a deployed model gave, in a SQL store, joinable to labels that come later.

One row per answer (a table `predictions`): when, which model (name, version, weights hash, role: primary or
shadow), who asked (an API client or an AE title), header facts (modality, manufacturer, device model,
photometric interpretation, rows, columns; never a patient identifier), the calibrated probabilities, the
decision, the OOD flag, score and reasons, optionally the embedding in float16, and a pseudonymous key (an
HMAC of the SOP Instance UID, or of the upload's bytes, with the site's secret: `remedis.monitor.keys`).
Labels (a radiologist's read, a pathology result) arrive later in a table `labels`, joined by that key.

The store is a SQLAlchemy URL: a SQLite file by default (`sqlite:///predictions.db`, in WAL mode with
synchronous NORMAL, so a killed process loses at most the rows not yet committed and never corrupts the
file), PostgreSQL (`postgresql+psycopg://...`) when several replicas write to one store.

Example:
    >>> store = PredictionStore("sqlite:///:memory:")
    >>> store.append([{"key": "k1", "model_name": "site-b", "probabilities": {"benign": 0.8, "malignant": 0.2},
    ...                "label": "benign", "ood": False}])
    1
    >>> store.attach_labels([("k1", "malignant")], source="pathology")
    (1, [])
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from sqlalchemy import (
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    insert,
    select,
    text,
)
from sqlalchemy.engine import Engine

METADATA = MetaData()
PREDICTIONS = Table(
    "predictions", METADATA,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("time", String(32), nullable=False, index=True),  # UTC ISO 8601: sorts as text on every backend
    Column("key", String(64), nullable=False, index=True),
    Column("model_name", String(200)), Column("model_version", String(200)), Column("weights_sha256", String(64)),
    Column("role", String(16), nullable=False, default="primary"),  # primary (answered) or shadow (logged only)
    Column("caller", String(200)),
    Column("modality", String(16)), Column("manufacturer", String(200)), Column("device_model", String(200)),
    Column("photometric", String(32)), Column("rows", Integer), Column("columns", Integer),
    Column("probabilities", Text, nullable=False),  # JSON {class: probability}
    Column("label", String(200)), Column("decision", String(32)),
    Column("positive_class", String(200)),  # binary models: the class the operating point decides for
    Column("ood", Boolean), Column("ood_score", Float), Column("ood_reasons", Text),  # reasons: JSON list
    Column("embedding", LargeBinary),  # float16 bytes, when the service is set to keep them
)
LABELS = Table(
    "labels", METADATA,
    Column("key", String(64), primary_key=True),
    Column("label", String(200), nullable=False),
    Column("source", String(200)),
    Column("time", String(32), nullable=False),
)
Index("predictions_model_time", PREDICTIONS.c.model_name, PREDICTIONS.c.time)
FIELDS = [c.name for c in PREDICTIONS.columns if c.name != "id"]


def now_iso() -> str:
    """The current UTC time as the store writes it."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer; a crash keeps committed rows
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def open_engine(url: str) -> Engine:
    """A SQLAlchemy engine for `url` (a bare path means a SQLite file); SQLite in WAL mode."""
    if "://" not in url:
        url = f"sqlite:///{url}"
    kw: dict[str, Any] = {}
    if url.startswith("sqlite") and (url.endswith(":memory:") or url.rstrip("/") == "sqlite:"):
        from sqlalchemy.pool import StaticPool  # one shared in-memory database across threads (tests, examples)

        kw = {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
    try:
        engine = create_engine(url, pool_pre_ping=not url.startswith("sqlite"), **kw)
    except Exception as exc:  # an unknown dialect or a driver that is not installed
        raise ValueError(f"monitor store {url.split('://')[0]}://...: {exc}") from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


_SCHEMA_LOCK = 0x72656D6564  # a fixed PostgreSQL advisory-lock id for creating remedis' tables ("remed")


def create_tables(engine: Engine) -> None:
    """Create the tables that are missing. On PostgreSQL the replicas that start together take an advisory
    lock first: two concurrent `CREATE TABLE IF NOT EXISTS` of one table collide on the catalog (a unique
    violation on `pg_class`), and the replica that loses would log nothing."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _SCHEMA_LOCK})
        METADATA.create_all(conn)


class PredictionStore:
    """The prediction log and its labels in one SQL store (tables created when missing).

    Args:
        url: a SQLAlchemy URL (`sqlite:///path.db`, `postgresql+psycopg://user@host/db`) or a SQLite file path.
    """

    def __init__(self, url: str):
        self.engine = open_engine(url)
        create_tables(self.engine)

    def append(self, rows: Iterable[dict[str, Any]]) -> int:
        """Insert answers (dicts with the fields of `FIELDS`; probabilities and reasons as Python objects,
        the embedding as an array) in one transaction; returns how many."""
        values = [self._encode(r) for r in rows]
        if values:
            with self.engine.begin() as conn:
                conn.execute(insert(PREDICTIONS), values)
        return len(values)

    @staticmethod
    def _encode(row: dict[str, Any]) -> dict[str, Any]:
        out = {k: row.get(k) for k in FIELDS}
        out["time"] = row.get("time") or now_iso()
        out["role"] = row.get("role") or "primary"
        out["probabilities"] = json.dumps(row.get("probabilities") or {})
        out["ood_reasons"] = json.dumps(list(row.get("ood_reasons") or []))
        emb = row.get("embedding")
        out["embedding"] = None if emb is None else np.asarray(emb, dtype=np.float16).tobytes()
        if not out["key"]:
            raise ValueError("a logged prediction needs its pseudonymous key")
        return out

    def known_keys(self, keys: Iterable[str]) -> set[str]:
        """Which of `keys` have a logged prediction."""
        keys = list(dict.fromkeys(keys))
        found: set[str] = set()
        with self.engine.connect() as conn:
            for i in range(0, len(keys), 500):
                chunk = keys[i:i + 500]
                found.update(conn.execute(select(PREDICTIONS.c.key).where(PREDICTIONS.c.key.in_(chunk))).scalars())
        return found

    def attach_labels(self, pairs: Iterable[tuple[str, str]], source: str = "") -> tuple[int, list[str]]:
        """Attach ground truth to logged predictions by key (a later label for the same key replaces the
        earlier one). Returns (labels attached, keys with no logged prediction); nothing is written when
        any key is unknown, so a file with a typo is fixed and sent again whole."""
        pairs = list(pairs)
        unknown = sorted({k for k, _ in pairs} - self.known_keys(k for k, _ in pairs))
        if unknown or not pairs:
            return 0, unknown
        when = now_iso()
        latest = {k: v for k, v in pairs}
        with self.engine.begin() as conn:
            conn.execute(LABELS.delete().where(LABELS.c.key.in_(list(latest))))
            conn.execute(insert(LABELS), [{"key": k, "label": v, "source": source or None, "time": when}
                                          for k, v in latest.items()])
        return len(latest), []

    def rows(self, since: str | None = None, until: str | None = None, role: str | None = None,
             model_name: str | None = None) -> Iterator[dict[str, Any]]:
        """Logged answers in time order (with `truth`: the attached label or None), decoded."""
        q = select(PREDICTIONS, LABELS.c.label.label("truth")).join(
            LABELS, LABELS.c.key == PREDICTIONS.c.key, isouter=True).order_by(PREDICTIONS.c.time, PREDICTIONS.c.id)
        if since:
            q = q.where(PREDICTIONS.c.time >= since)
        if until:
            q = q.where(PREDICTIONS.c.time < until)
        if role:
            q = q.where(PREDICTIONS.c.role == role)
        if model_name:
            q = q.where(PREDICTIONS.c.model_name == model_name)
        with self.engine.connect() as conn:
            for r in conn.execute(q).mappings():
                row = dict(r)
                row["probabilities"] = json.loads(row["probabilities"])
                row["ood_reasons"] = json.loads(row["ood_reasons"] or "[]")
                if row["embedding"] is not None:
                    row["embedding"] = np.frombuffer(row["embedding"], dtype=np.float16)
                yield row

    def first_time(self, model_name: str | None = None) -> str | None:
        """The time of the earliest logged primary answer (of one model), or None for an empty log."""
        from sqlalchemy import func

        q = select(func.min(PREDICTIONS.c.time)).where(PREDICTIONS.c.role == "primary")
        if model_name:
            q = q.where(PREDICTIONS.c.model_name == model_name)
        with self.engine.connect() as conn:
            return conn.execute(q).scalar_one()

    def count(self) -> int:
        """Logged answers in the store."""
        from sqlalchemy import func

        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(PREDICTIONS)).scalar_one())

    def close(self) -> None:
        """Release the store's connections."""
        self.engine.dispose()
