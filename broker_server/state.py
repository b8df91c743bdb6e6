"""The service's durable state in SQLite: written before anything is acknowledged.

Payloads are stored as the wire bytes they arrived in (never pickle), so a restarted service
decodes exactly what it accepted. WAL journaling with ``synchronous=FULL`` means a committed
transaction survives a kill -9 of the service.

What the report counts is stored with the event that changed it, in the same transaction: an
accepted update or a rejection writes the service's byte counters (meta ``counters``) and the
device's own counters (table ``device_counters``) as they stand after it, so a restarted service
reports what the one before it had counted.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# meta keys: the fleet's training configuration (what the checkpointed global modules belong to),
# and, with a mixed fleet, each device's assigned one under ASSIGNMENT_KEY + device id
TRAIN_CONFIG_KEY = "train"
ASSIGNMENT_KEY = "assignment/"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY, hello BLOB NOT NULL, registered_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS globals (
    round INTEGER PRIMARY KEY, content_id TEXT NOT NULL, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS updates (
    round INTEGER NOT NULL, device_id TEXT NOT NULL, content_id TEXT NOT NULL,
    payload BLOB NOT NULL, PRIMARY KEY (round, device_id));
CREATE TABLE IF NOT EXISTS round_records (round INTEGER PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS residuals (round INTEGER PRIMARY KEY, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS carries (
    round INTEGER NOT NULL, name TEXT NOT NULL, payload BLOB NOT NULL, PRIMARY KEY (round, name));
CREATE TABLE IF NOT EXISTS downlink (
    round INTEGER PRIMARY KEY, payload BLOB NOT NULL, residual BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS rejections (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, client TEXT, round INTEGER,
    reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS device_counters (device_id TEXT PRIMARY KEY, counters TEXT NOT NULL);
"""


class StateStore:
    """SQLite-backed state of one aggregation service (one fleet)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, for modules that keep tables of their own in this database
        (``broker_server.async_ledger``): everything inside commits together or not at all."""
        with self._tx() as db:
            yield db

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows of one read-only statement."""
        with self._lock:
            return [tuple(row) for row in self._db.execute(sql, params).fetchall()]

    def get_meta(self, key: str, default: Any = None) -> Any:
        """A JSON value stored under ``key``."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set_meta(self, key: str, value: Any) -> None:
        """Store a JSON value under ``key``."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def save_device(self, device_id: str, hello: bytes, at: float) -> None:
        """Remember a device's latest hello."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO devices VALUES (?, ?, ?)", (device_id, hello, at))

    def devices(self) -> dict[str, bytes]:
        """Every registered device's latest hello payload."""
        with self._lock:
            rows = self._db.execute("SELECT device_id, hello FROM devices").fetchall()
        return {d: bytes(h) for d, h in rows}

    def save_global(
        self, round_: int, content_id: str, payload: bytes, downlink: tuple[bytes, bytes] | None = None
    ) -> None:
        """Checkpoint the global module of ``round_``; with ``downlink``, in the same transaction, the
        delta message published for it and the downlink's residual (see ``edge_runtime.downlink``)."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO globals VALUES (?, ?, ?)", (round_, content_id, payload))
            if downlink is not None:
                db.execute("INSERT OR REPLACE INTO downlink VALUES (?, ?, ?)", (round_, *downlink))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('round', ?)", (json.dumps(round_),))

    def latest_global(self) -> tuple[int, str, bytes] | None:
        """The newest checkpointed global module as (round, content id, payload)."""
        with self._lock:
            row = self._db.execute(
                "SELECT round, content_id, payload FROM globals ORDER BY round DESC LIMIT 1"
            ).fetchone()
        return None if row is None else (int(row[0]), str(row[1]), bytes(row[2]))

    def add_update(
        self,
        round_: int,
        device_id: str,
        content_id: str,
        payload: bytes,
        *,
        counters: Mapping[str, Any] | None = None,
        device_counters: Mapping[str, Any] | None = None,
    ) -> bool:
        """Record an accepted update, and the counters as they stand after it; False if this device
        already has one for the round."""
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO updates VALUES (?, ?, ?, ?)",
                (round_, device_id, content_id, payload),
            )
            write_counters(db, counters, device_id, device_counters)
            return cur.rowcount == 1

    def updates(self, round_: int) -> list[tuple[str, str, bytes]]:
        """Accepted updates of a round as (device, content id, payload)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT device_id, content_id, payload FROM updates WHERE round=? ORDER BY device_id",
                (round_,),
            ).fetchall()
        return [(d, c, bytes(p)) for d, c, p in rows]

    def accepted_ids(self) -> dict[tuple[str, int], str]:
        """Content id of every accepted update, by (device, round)."""
        with self._lock:
            rows = self._db.execute("SELECT device_id, round, content_id FROM updates").fetchall()
        return {(str(d), int(r)): str(c) for d, r, c in rows}

    def accepted_counts(self) -> dict[str, int]:
        """Accepted updates per device, all rounds."""
        with self._lock:
            rows = self._db.execute("SELECT device_id, COUNT(*) FROM updates GROUP BY device_id").fetchall()
        return {d: int(n) for d, n in rows}

    def add_rejection(
        self,
        client: str | None,
        round_: int | None,
        reason: str,
        at: float,
        *,
        counters: Mapping[str, Any] | None = None,
        device_counters: Mapping[str, Any] | None = None,
    ) -> None:
        """Record a rejection (``at``: wall-clock seconds), and the counters as they stand after it."""
        with self._tx() as db:
            insert_rejection(db, client, round_, reason, at)
            write_counters(db, counters, client, device_counters)

    def rejections(self) -> list[dict[str, Any]]:
        """Every recorded rejection as a report entry (client, round, reason), oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT client, round, reason FROM rejections ORDER BY seq").fetchall()
        return [{"client": c, "round": r, "reason": str(why)} for c, r, why in rows]

    def counters(self) -> dict[str, Any] | None:
        """The service's counters as the last accepted update or rejection left them (None if none)."""
        value = self.get_meta("counters")
        return None if value is None else dict(value)

    def device_counters(self) -> dict[str, dict[str, Any]]:
        """Each device's counters as its last accepted update or rejection left them."""
        with self._lock:
            rows = self._db.execute("SELECT device_id, counters FROM device_counters").fetchall()
        return {str(d): json.loads(c) for d, c in rows}

    def save_round_record(self, round_: int, record: dict[str, Any]) -> None:
        """Keep a finished round's report entry."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO round_records VALUES (?, ?)", (round_, json.dumps(record)))

    def round_records(self) -> list[dict[str, Any]]:
        """Every finished round's report entry, in order."""
        with self._lock:
            rows = self._db.execute("SELECT record FROM round_records ORDER BY round").fetchall()
        return [json.loads(r[0]) for r in rows]

    def save_residual(self, round_: int, payload: bytes) -> None:
        """The server-side residual that aggregating ``round_`` left (``--strategy exact``)."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO residuals VALUES (?, ?)", (round_, payload))

    def residual_before(self, round_: int) -> bytes | None:
        """The residual of the latest round before ``round_``: what aggregating ``round_`` starts from.

        Keyed by round, so a crash between storing a round's residual and publishing its global
        module redoes that round from the residual before it: nothing is fed back twice.
        """
        with self._lock:
            row = self._db.execute(
                "SELECT payload FROM residuals WHERE round < ? ORDER BY round DESC LIMIT 1", (round_,)
            ).fetchone()
        return None if row is None else bytes(row[0])

    def save_carry(self, round_: int, name: str, payload: bytes) -> None:
        """A server optimizer's state after aggregating ``round_`` (e.g. FedAvgM's momentum)."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO carries VALUES (?, ?, ?)", (round_, name, payload))

    def carry_before(self, round_: int, name: str) -> bytes | None:
        """The newest carry ``name`` from a round before ``round_`` (what that round starts from)."""
        with self._lock:
            row = self._db.execute(
                "SELECT payload FROM carries WHERE name = ? AND round < ? ORDER BY round DESC LIMIT 1",
                (name, round_),
            ).fetchone()
        return None if row is None else bytes(row[0])

    def downlink(self, round_: int) -> tuple[bytes, bytes] | None:
        """The delta message published for ``round_`` and the downlink residual after it, if any."""
        with self._lock:
            row = self._db.execute(
                "SELECT payload, residual FROM downlink WHERE round = ?", (round_,)
            ).fetchone()
        return None if row is None else (bytes(row[0]), bytes(row[1]))

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()


def insert_rejection(
    db: sqlite3.Connection, client: str | None, round_: int | None, reason: str, at: float
) -> None:
    """Inside a transaction: one rejection for the report."""
    db.execute(
        "INSERT INTO rejections (at, client, round, reason) VALUES (?, ?, ?, ?)", (at, client, round_, reason)
    )


def write_counters(
    db: sqlite3.Connection,
    counters: Mapping[str, Any] | None,
    device_id: str | None,
    device_counters: Mapping[str, Any] | None,
) -> None:
    """Inside a transaction: the service's counters and, for a known device, its own."""
    if counters is not None:
        db.execute("INSERT OR REPLACE INTO meta VALUES ('counters', ?)", (json.dumps(dict(counters)),))
    if device_id is not None and device_counters is not None:
        db.execute(
            "INSERT OR REPLACE INTO device_counters VALUES (?, ?)",
            (device_id, json.dumps(dict(device_counters))),
        )
