"""Job records: what was asked, by whom, where it stands, what it produced.

:class:`JobStore` is the interface (so API replicas can later share a database); :class:`SqliteJobStore`
keeps records in one SQLite file so they survive restarts. The store also remembers which tenant uploaded
which blob (a tenant can only use its own uploads) and which blobs each job references (for retention).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

QUEUED, RUNNING, SUCCEEDED = "QUEUED", "RUNNING", "SUCCEEDED"
FAILED, CANCELLED, EXPIRED = "FAILED", "CANCELLED", "EXPIRED"
ACTIVE_STATES = (QUEUED, RUNNING)
TERMINAL_STATES = (SUCCEEDED, FAILED, CANCELLED, EXPIRED)


@dataclass
class ResultFile:
    name: str
    size: int
    sha256: str


@dataclass
class JobRecord:
    """One job. ``inputs`` maps relative paths in the job's input directory to blob ids."""

    job_id: str
    tenant: str
    kind: str
    spec: dict[str, Any]
    model_path: str
    inputs: dict[str, str]
    output_name: str
    state: str = QUEUED
    stage: str = ""
    fraction: float = 0.0
    message: str = ""
    error: str = ""
    error_type: str = ""
    error_field: str = ""
    results: list[ResultFile] = field(default_factory=list)
    report: dict[str, Any] | None = None
    created: float = 0.0
    started: float | None = None
    finished: float | None = None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


class JobStore(Protocol):
    def create(self, record: JobRecord) -> None: ...

    def get(self, job_id: str, tenant: str | None = None) -> JobRecord | None: ...

    def list_jobs(self, tenant: str | None, limit: int) -> list[JobRecord]: ...

    def update(self, job_id: str, *, only_if: Iterable[str] | None = None, **changes: Any) -> bool: ...

    def recover(self, reason: str) -> tuple[list[str], list[JobRecord]]: ...

    def add_blob(self, blob_id: str, size: int, tenant: str | None) -> None: ...

    def owns(self, tenant: str, blob_id: str) -> bool: ...

    def expire(self, finished_before: float) -> list[str]: ...

    def unreferenced_blobs(self, created_before: float) -> list[str]: ...

    def forget_blob(self, blob_id: str) -> None: ...

    def known_blobs(self) -> set[str]: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, kind TEXT NOT NULL, state TEXT NOT NULL,
    spec TEXT NOT NULL, model_path TEXT NOT NULL, inputs TEXT NOT NULL, output_name TEXT NOT NULL,
    stage TEXT NOT NULL, fraction REAL NOT NULL, message TEXT NOT NULL, error TEXT NOT NULL,
    error_type TEXT NOT NULL, error_field TEXT NOT NULL, results TEXT NOT NULL, report TEXT, created REAL NOT NULL,
    started REAL, finished REAL);
CREATE INDEX IF NOT EXISTS jobs_tenant ON jobs (tenant, created);
CREATE TABLE IF NOT EXISTS blobs (blob_id TEXT PRIMARY KEY, size INTEGER NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS blob_owners (tenant TEXT NOT NULL, blob_id TEXT NOT NULL, PRIMARY KEY (tenant, blob_id));
CREATE TABLE IF NOT EXISTS job_blobs (job_id TEXT NOT NULL, blob_id TEXT NOT NULL, PRIMARY KEY (job_id, blob_id));
"""
_JSON_COLUMNS = ("spec", "inputs", "results", "report")
_COLUMNS = tuple(f.name for f in fields(JobRecord))


def _encode(name: str, value: Any) -> Any:
    if name == "results":
        return json.dumps([asdict(r) if isinstance(r, ResultFile) else r for r in value])
    return json.dumps(value) if name in _JSON_COLUMNS else value


def _decode(row: sqlite3.Row) -> JobRecord:
    data = {name: row[name] for name in _COLUMNS}
    for name in _JSON_COLUMNS:
        data[name] = json.loads(data[name]) if data[name] is not None else None
    data["results"] = [ResultFile(**r) for r in data["results"]]
    return JobRecord(**data)


class SqliteJobStore:
    """Job records in one SQLite file (WAL mode), one connection guarded by a lock.

    Each write is its own transaction, so a SIGKILL leaves every record as of its last completed update.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def create(self, record: JobRecord) -> None:
        values = [_encode(name, getattr(record, name)) for name in _COLUMNS]
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute(
                f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})", values
            )
            self._db.executemany(
                "INSERT OR IGNORE INTO job_blobs (job_id, blob_id) VALUES (?, ?)",
                [(record.job_id, b) for b in set(record.inputs.values())],
            )
            self._db.execute("COMMIT")

    def get(self, job_id: str, tenant: str | None = None) -> JobRecord | None:
        """The job, or None when it does not exist or belongs to another tenant (``tenant=None``: any)."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None or (tenant is not None and row["tenant"] != tenant):
            return None
        return _decode(row)

    def list_jobs(self, tenant: str | None, limit: int) -> list[JobRecord]:
        with self._lock:
            if tenant is None:
                rows = self._db.execute("SELECT * FROM jobs ORDER BY created DESC LIMIT ?", (limit,)).fetchall()
            else:
                rows = self._db.execute(
                    "SELECT * FROM jobs WHERE tenant = ? ORDER BY created DESC LIMIT ?", (tenant, limit)
                ).fetchall()
        return [_decode(r) for r in rows]

    def update(self, job_id: str, *, only_if: Iterable[str] | None = None, **changes: Any) -> bool:
        """Apply ``changes``; with ``only_if``, only when the job is in one of those states (compare-and-set).

        Returns whether a row changed. Result blobs named in ``results`` are recorded as referenced by the job.
        """
        unknown = set(changes) - set(_COLUMNS)
        if unknown:
            raise ValueError(f"unknown job columns: {sorted(unknown)}")
        sets = ", ".join(f"{name} = ?" for name in changes)
        values = [_encode(name, value) for name, value in changes.items()]
        sql = f"UPDATE jobs SET {sets} WHERE job_id = ?"
        params: list[Any] = [*values, job_id]
        if only_if is not None:
            states = list(only_if)
            sql += f" AND state IN ({', '.join('?' * len(states))})"
            params += states
        with self._lock:
            self._db.execute("BEGIN")
            changed = self._db.execute(sql, params).rowcount > 0
            if changed and "results" in changes:
                self._db.executemany(
                    "INSERT OR IGNORE INTO job_blobs (job_id, blob_id) VALUES (?, ?)",
                    [(job_id, r.sha256) for r in changes["results"]],
                )
            self._db.execute("COMMIT")
        return changed

    def recover(self, reason: str) -> tuple[list[str], list[JobRecord]]:
        """After a restart: fail jobs that were running (their process died with the server) and return the
        queued ones to re-submit. Returns (failed job ids, queued records oldest first)."""
        now = time.time()
        with self._lock:
            failed = [r["job_id"] for r in self._db.execute("SELECT job_id FROM jobs WHERE state = ?", (RUNNING,))]
            self._db.execute(
                "UPDATE jobs SET state = ?, error = ?, error_type = ?, finished = ? WHERE state = ?",
                (FAILED, reason, "ServerRestart", now, RUNNING),
            )
            rows = self._db.execute("SELECT * FROM jobs WHERE state = ? ORDER BY created", (QUEUED,)).fetchall()
        return failed, [_decode(r) for r in rows]

    def add_blob(self, blob_id: str, size: int, tenant: str | None) -> None:
        """Record a stored blob (refreshing its retention clock) and, for uploads, the tenant that sent it."""
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute(
                "INSERT INTO blobs (blob_id, size, created) VALUES (?, ?, ?) "
                "ON CONFLICT (blob_id) DO UPDATE SET created = excluded.created",
                (blob_id, size, time.time()),
            )
            if tenant is not None:
                self._db.execute(
                    "INSERT OR IGNORE INTO blob_owners (tenant, blob_id) VALUES (?, ?)", (tenant, blob_id)
                )
            self._db.execute("COMMIT")

    def owns(self, tenant: str, blob_id: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM blob_owners o JOIN blobs b USING (blob_id) WHERE o.tenant = ? AND o.blob_id = ?",
                (tenant, blob_id),
            ).fetchone()
        return row is not None

    def expire(self, finished_before: float) -> list[str]:
        """Mark jobs that ended before ``finished_before`` EXPIRED and drop their result list; returns their ids."""
        with self._lock:
            self._db.execute("BEGIN")
            ids = [
                r["job_id"]
                for r in self._db.execute(
                    "SELECT job_id FROM jobs WHERE state IN (?, ?, ?) AND finished < ?",
                    (SUCCEEDED, FAILED, CANCELLED, finished_before),
                )
            ]
            self._db.executemany(
                "UPDATE jobs SET state = ?, results = '[]', message = 'results expired' WHERE job_id = ?",
                [(EXPIRED, i) for i in ids],
            )
            self._db.execute("COMMIT")
        return ids

    def unreferenced_blobs(self, created_before: float) -> list[str]:
        """Blobs older than ``created_before`` that no unexpired job uses (as input or result)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT blob_id FROM blobs WHERE created < ? AND blob_id NOT IN ("
                " SELECT jb.blob_id FROM job_blobs jb JOIN jobs j USING (job_id) WHERE j.state != ?)",
                (created_before, EXPIRED),
            ).fetchall()
        return [r["blob_id"] for r in rows]

    def known_blobs(self) -> set[str]:
        with self._lock:
            return {r["blob_id"] for r in self._db.execute("SELECT blob_id FROM blobs")}

    def forget_blob(self, blob_id: str) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM blobs WHERE blob_id = ?", (blob_id,))
            self._db.execute("DELETE FROM blob_owners WHERE blob_id = ?", (blob_id,))
            self._db.execute("COMMIT")
