"""Asynchronous (FedBuff) state in SQLite: versions, jobs and the buffer, written before any ack.

The synchronous rounds keep their state in :class:`~broker_server.state.StateStore`'s tables; the
asynchronous mode adds three of its own to the same database, so that a service killed at any
point and restarted on the same state folder loses no acknowledged update and counts none twice:

- ``async_jobs``: every job (which device was given which version, under which content id),
  written *before* the module is published, so an update trained on it is recognised after a
  restart; ``answered`` once its update came, the device failed it, or a newer job replaced it.
- ``async_updates``: every accepted update (its wire bytes, in order of arrival), written with the
  counters it changed *before* its ack; ``consumed_in`` names the version it went into, ``dropped``
  marks one the staleness bound rejected (written with that rejection).
- ``async_versions``: each version's global module (fp32 wire bytes) and its report record. A
  version is written in one transaction with the ``consumed_in`` marks of the buffer it consumed,
  so after a crash either both are there or neither is, and the buffer is aggregated again.

The content id of an accepted update is its key for redeliveries: a device that resends an update
whose ack a crash ate gets the ack again and the update counts once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker_server.state import StateStore, insert_rejection, write_counters

_SCHEMA = """
CREATE TABLE IF NOT EXISTS async_versions (
    version INTEGER PRIMARY KEY, payload BLOB NOT NULL, record TEXT);
CREATE TABLE IF NOT EXISTS async_jobs (
    job INTEGER PRIMARY KEY, device_id TEXT NOT NULL, version INTEGER NOT NULL,
    content_id TEXT NOT NULL, nbytes INTEGER NOT NULL, start REAL NOT NULL,
    answered INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS async_updates (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job INTEGER NOT NULL UNIQUE, device_id TEXT NOT NULL,
    content_id TEXT NOT NULL, payload BLOB NOT NULL, arrival REAL NOT NULL,
    consumed_in INTEGER, dropped INTEGER NOT NULL DEFAULT 0);
"""


@dataclass(frozen=True)
class StoredJob:
    """A job as the ledger keeps it."""

    job: int
    device: str
    version: int
    content_id: str
    nbytes: int
    start: float
    answered: bool
    updated: bool  # an update for it was accepted


@dataclass(frozen=True)
class StoredUpdate:
    """An accepted update not yet aggregated nor dropped: the buffer to rebuild, in arrival order."""

    job: int
    device: str
    content_id: str
    payload: bytes
    arrival: float


@dataclass
class AsyncSnapshot:
    """What a restarted service takes back: the newest version and everything around it."""

    version: int
    payload: bytes  # the newest version's global module, fp32
    records: list[dict[str, Any]]  # the report records of versions 1..version
    jobs: list[StoredJob]
    waiting: list[StoredUpdate]
    accepted_ids: dict[tuple[str, int], str] = field(default_factory=dict)
    accepted_counts: dict[str, int] = field(default_factory=dict)


class AsyncLedger:
    """The asynchronous mode's tables in a :class:`StateStore`; see the module docstring."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        with store.transaction() as db:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                db.execute(statement)

    def open_job(
        self, job: int, device: str, version: int, content_id: str, nbytes: int, start: float
    ) -> None:
        """Record a job before its module goes out."""
        with self.store.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO async_jobs VALUES (?, ?, ?, ?, ?, ?, 0)",
                (job, device, version, content_id, nbytes, start),
            )

    def close_job(self, job: int) -> None:
        """The service no longer waits for ``job`` (failed, replaced by a newer one, or given up)."""
        with self.store.transaction() as db:
            db.execute("UPDATE async_jobs SET answered = 1 WHERE job = ?", (job,))

    def accept(
        self,
        job: int,
        device: str,
        content_id: str,
        payload: bytes,
        arrival: float,
        *,
        counters: Mapping[str, Any],
        device_counters: Mapping[str, Any],
    ) -> None:
        """Record an accepted update (before its ack), its job answered, and the counters after it."""
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO async_updates (job, device_id, content_id, payload, arrival) "
                "VALUES (?, ?, ?, ?, ?)",
                (job, device, content_id, payload, arrival),
            )
            db.execute("UPDATE async_jobs SET answered = 1 WHERE job = ?", (job,))
            write_counters(db, counters, device, device_counters)

    def drop(
        self,
        job: int,
        device: str,
        version: int,
        reason: str,
        at: float,
        *,
        counters: Mapping[str, Any],
        device_counters: Mapping[str, Any] | None,
    ) -> None:
        """An accepted update too stale to aggregate: marked dropped, with its rejection, at once."""
        with self.store.transaction() as db:
            db.execute("UPDATE async_updates SET dropped = 1 WHERE job = ?", (job,))
            insert_rejection(db, device, version, reason, at)
            write_counters(db, counters, device, device_counters)

    def save_version(
        self,
        version: int,
        payload: bytes,
        record: Mapping[str, Any] | None,
        consumed: Sequence[int],
        counters: Mapping[str, Any] | None = None,
    ) -> None:
        """A new version, the jobs whose updates it consumed, and its record, in one transaction."""
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO async_versions VALUES (?, ?, ?)",
                (version, payload, None if record is None else json.dumps(dict(record))),
            )
            db.executemany(
                "UPDATE async_updates SET consumed_in = ? WHERE job = ? AND consumed_in IS NULL",
                [(version, job) for job in consumed],
            )
            write_counters(db, counters, None, None)

    def version_payload(self, version: int) -> bytes | None:
        """The stored global module of ``version`` (fp32), if that version was saved."""
        rows = self.store.query("SELECT payload FROM async_versions WHERE version = ?", (version,))
        return bytes(rows[0][0]) if rows else None

    def restore(self) -> AsyncSnapshot | None:
        """Everything a restart needs, or None if no version was ever saved."""
        rows = self.store.query("SELECT version, payload FROM async_versions ORDER BY version DESC LIMIT 1")
        if not rows:
            return None
        version, payload = int(rows[0][0]), bytes(rows[0][1])
        records = [
            json.loads(r[0])
            for r in self.store.query(
                "SELECT record FROM async_versions WHERE record IS NOT NULL ORDER BY version"
            )
        ]
        updated = {int(r[0]) for r in self.store.query("SELECT job FROM async_updates")}
        jobs = [
            StoredJob(int(j), str(d), int(v), str(c), int(n), float(s), bool(a), int(j) in updated)
            for j, d, v, c, n, s, a in self.store.query(
                "SELECT job, device_id, version, content_id, nbytes, start, answered "
                "FROM async_jobs ORDER BY job"
            )
        ]
        waiting = [
            StoredUpdate(int(j), str(d), str(c), bytes(p), float(t))
            for j, d, c, p, t in self.store.query(
                "SELECT job, device_id, content_id, payload, arrival FROM async_updates "
                "WHERE consumed_in IS NULL AND dropped = 0 ORDER BY seq"
            )
        ]
        accepted = self.store.query("SELECT device_id, job, content_id FROM async_updates")
        counts: dict[str, int] = {}
        for device, _, _ in accepted:
            counts[str(device)] = counts.get(str(device), 0) + 1
        return AsyncSnapshot(
            version,
            payload,
            records,
            jobs,
            waiting,
            accepted_ids={(str(d), int(j)): str(c) for d, j, c in accepted},
            accepted_counts=counts,
        )
