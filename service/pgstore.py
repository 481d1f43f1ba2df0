"""Job records in PostgreSQL, shared by several API replicas (``serve --store-url postgresql://…``).

Same interface as :class:`~onnxprune.service.store.SqliteJobStore`, plus what replicas need to share one queue:

- every replica registers itself and heartbeats (the database's clock, so replicas' clocks do not matter);
- a replica *claims* queued jobs with ``SELECT … FOR UPDATE SKIP LOCKED``, so two replicas never take one job;
- the jobs of a replica whose heartbeat stopped are taken back (:meth:`reclaim`): queued ones go back to the
  queue, running ones run again once (``max_attempts``) or fail with the reason;
- ``CancelJob`` on any replica sets ``cancel_requested``; the replica that owns the job sees it and stops it.

Each method is one transaction on a pooled connection. A lost or refused connection becomes
:class:`UnavailableError` (gRPC UNAVAILABLE: "retry later"), and the broken connection is dropped, so the store
recovers by itself when the database is back. The schema is versioned (``schema_version``); a starting replica
applies the missing migrations under an advisory lock, so replicas that start together do not race.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
from psycopg.rows import dict_row

from onnxprune.service.errors import UnavailableError
from onnxprune.service.logs import log_event
from onnxprune.service.store import (
    _COLUMNS,
    ACTIVE_STATES,
    CANCELLED,
    EXPIRED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    JobRecord,
    _decode,
    _encode,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

_MIGRATIONS: tuple[str, ...] = (
    # 1: the SQLite schema, plus ownership by replicas.
    """
    CREATE TABLE jobs (
        job_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, kind TEXT NOT NULL, state TEXT NOT NULL,
        spec TEXT NOT NULL, model_path TEXT NOT NULL, inputs TEXT NOT NULL, output_name TEXT NOT NULL,
        stage TEXT NOT NULL, fraction DOUBLE PRECISION NOT NULL, message TEXT NOT NULL, error TEXT NOT NULL,
        error_type TEXT NOT NULL, error_field TEXT NOT NULL, results TEXT NOT NULL, report TEXT,
        created DOUBLE PRECISION NOT NULL, started DOUBLE PRECISION, finished DOUBLE PRECISION,
        owner TEXT, attempts INTEGER NOT NULL DEFAULT 0, cancel_requested BOOLEAN NOT NULL DEFAULT FALSE);
    CREATE INDEX jobs_tenant ON jobs (tenant, created);
    CREATE INDEX jobs_queue ON jobs (created) WHERE state = 'QUEUED' AND owner IS NULL;
    CREATE INDEX jobs_owner ON jobs (owner) WHERE owner IS NOT NULL;
    CREATE TABLE blobs (blob_id TEXT PRIMARY KEY, size BIGINT NOT NULL, created DOUBLE PRECISION NOT NULL);
    CREATE TABLE blob_owners (tenant TEXT NOT NULL, blob_id TEXT NOT NULL, PRIMARY KEY (tenant, blob_id));
    CREATE TABLE job_blobs (job_id TEXT NOT NULL, blob_id TEXT NOT NULL, PRIMARY KEY (job_id, blob_id));
    CREATE TABLE replicas (replica_id TEXT PRIMARY KEY, address TEXT NOT NULL, started DOUBLE PRECISION NOT NULL,
        heartbeat DOUBLE PRECISION NOT NULL);
    """,
    # 2: jobs' log lines, so WatchJob on any replica streams them.
    """
    CREATE TABLE job_logs (line_id BIGSERIAL PRIMARY KEY, job_id TEXT NOT NULL, line TEXT NOT NULL);
    CREATE INDEX job_logs_job ON job_logs (job_id, line_id);
    """,
)
_NOW = "extract(epoch from clock_timestamp())"
_MIGRATION_LOCK = 0x6F6E6E78  # pg_advisory_xact_lock key: "onnx"


class PostgresJobStore:
    """Job records in PostgreSQL.

    Args:
        url: a libpq URL, ``postgresql://user:password@host:port/dbname``.
        replica_id: this server's id (owner of the jobs it claims).
        pool_size: connections kept open (each RPC or callback holds one for one transaction).
        connect_timeout: seconds before an unreachable database counts as down.

    Raises:
        UnavailableError: the database cannot be reached at start.
    """

    shared = True

    def __init__(self, url: str, *, replica_id: str, pool_size: int = 8, connect_timeout: float = 3.0) -> None:
        self.url = url
        self.replica_id = replica_id
        self._connect_timeout = connect_timeout
        self._idle: list[psycopg.Connection] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(pool_size)
        self._closed = False
        self._migrate()

    # -- connections ---------------------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection:
        return psycopg.connect(self.url, autocommit=True, row_factory=dict_row,
                               connect_timeout=max(1, int(self._connect_timeout)),
                               options="-c statement_timeout=30000 -c lock_timeout=10000")

    @contextmanager
    def _tx(self) -> Iterator[psycopg.Connection]:
        """One transaction on a pooled connection; connection failures become UnavailableError."""
        if not self._slots.acquire(timeout=30):
            raise UnavailableError("job database busy: no free connection within 30 s; retry later")
        conn: psycopg.Connection | None = None
        try:
            with self._lock:
                while self._idle and conn is None:
                    candidate = self._idle.pop()
                    conn = None if candidate.closed or candidate.broken else candidate
            try:
                if conn is None:
                    conn = self._connect()
                with conn.transaction():
                    yield conn
            except (psycopg.OperationalError, psycopg.InterfaceError) as e:
                if conn is not None:
                    conn.close()
                    conn = None
                with self._lock:  # the others most likely lost the same server: reconnect on next use
                    stale, self._idle = self._idle, []
                for other in stale:
                    other.close()
                raise UnavailableError(f"job database unreachable ({type(e).__name__}: "
                                       f"{str(e).strip()[:300]}); retry later") from e
            except BaseException:
                if conn is not None and (conn.closed or conn.broken):
                    conn = None
                raise
        finally:
            if conn is not None:
                with self._lock:
                    if self._closed:
                        conn.close()
                    else:
                        self._idle.append(conn)
            self._slots.release()

    def _run(self, fn: Callable[[psycopg.Connection], T]) -> T:
        with self._tx() as conn:
            return fn(conn)

    def _migrate(self) -> None:
        def migrate(conn: psycopg.Connection) -> None:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT max(version) AS v FROM schema_version").fetchone()
            current = (row["v"] if row else None) or 0
            for version, sql in enumerate(_MIGRATIONS[current:], start=current + 1):
                conn.execute(sql)
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
                log_event(log, "store.migrated", version=version)

        self._run(migrate)

    def ping(self) -> str | None:
        """None when the database answers, else why not (for the health service)."""
        try:
            self._run(lambda conn: conn.execute("SELECT 1").fetchone())
        except UnavailableError as e:
            return str(e)
        return None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # -- the JobStore interface --------------------------------------------------------------------------

    def create(self, record: JobRecord) -> None:
        values = [_encode(name, getattr(record, name)) for name in _COLUMNS]

        def create(conn: psycopg.Connection) -> None:
            conn.execute(f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join(['%s'] * len(_COLUMNS))})",
                         values)
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO job_blobs (job_id, blob_id) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                                [(record.job_id, b) for b in sorted(set(record.inputs.values()))])

        self._run(create)

    def get(self, job_id: str, tenant: str | None = None) -> JobRecord | None:
        """The job, or None when it does not exist or belongs to another tenant (``tenant=None``: any)."""
        row = self._run(lambda conn: conn.execute("SELECT * FROM jobs WHERE job_id = %s", (job_id,)).fetchone())
        if row is None or (tenant is not None and row["tenant"] != tenant):
            return None
        return _decode(row)

    def list_jobs(self, tenant: str | None, limit: int) -> list[JobRecord]:
        if tenant is None:
            sql, params = "SELECT * FROM jobs ORDER BY created DESC LIMIT %s", (limit,)
        else:
            sql, params = "SELECT * FROM jobs WHERE tenant = %s ORDER BY created DESC LIMIT %s", (tenant, limit)
        return [_decode(r) for r in self._run(lambda conn: conn.execute(sql, params).fetchall())]

    def update(self, job_id: str, *, only_if: Iterable[str] | None = None, owned_by: str | None = None,
               **changes: Any) -> bool:
        """Apply ``changes``; with ``only_if``, only when the job is in one of those states; with ``owned_by``,
        only while that replica still owns it (a replica that was presumed dead must not overwrite the rerun).

        Returns whether a row changed. Result blobs named in ``results`` are recorded as referenced by the job.
        """
        unknown = set(changes) - set(_COLUMNS)
        if unknown:
            raise ValueError(f"unknown job columns: {sorted(unknown)}")
        sets = ", ".join(f"{name} = %s" for name in changes)
        params: list[Any] = [_encode(name, value) for name, value in changes.items()]
        sql = f"UPDATE jobs SET {sets} WHERE job_id = %s"
        params.append(job_id)
        if only_if is not None:
            sql += " AND state = ANY(%s)"
            params.append(list(only_if))
        if owned_by is not None:
            sql += " AND owner = %s"
            params.append(owned_by)

        def update(conn: psycopg.Connection) -> bool:
            changed = conn.execute(sql, params).rowcount > 0
            if changed and "results" in changes:
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO job_blobs (job_id, blob_id) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                        [(job_id, r.sha256) for r in changes["results"]])
            return changed

        return self._run(update)

    def recover(self, reason: str) -> tuple[list[str], list[JobRecord]]:
        """Start-up recovery in a shared store: only the jobs of replicas that stopped heartbeating are touched
        (see :meth:`reclaim`); queued jobs stay in the shared queue for whichever replica claims them.

        Returns (failed job ids, []) — there is nothing to re-submit by hand.
        """
        return self.reclaim(stale_after_s=30.0, max_attempts=1, reason=reason)[1], []

    def add_blob(self, blob_id: str, size: int, tenant: str | None) -> None:
        def add(conn: psycopg.Connection) -> None:
            conn.execute(f"INSERT INTO blobs (blob_id, size, created) VALUES (%s, %s, {_NOW}) "
                         "ON CONFLICT (blob_id) DO UPDATE SET created = excluded.created", (blob_id, size))
            if tenant is not None:
                conn.execute("INSERT INTO blob_owners (tenant, blob_id) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                             (tenant, blob_id))

        self._run(add)

    def owns(self, tenant: str, blob_id: str) -> bool:
        row = self._run(lambda conn: conn.execute(
            "SELECT 1 FROM blob_owners o JOIN blobs b USING (blob_id) WHERE o.tenant = %s AND o.blob_id = %s",
            (tenant, blob_id)).fetchone())
        return row is not None

    def expire(self, finished_before: float) -> list[str]:
        """Mark jobs that ended before ``finished_before`` EXPIRED and drop their result list; returns their ids.

        One statement, so two replicas sweeping at once expire each job once.
        """
        def expire(conn: psycopg.Connection) -> list[str]:
            ids = [r["job_id"] for r in conn.execute(
                "UPDATE jobs SET state = %s, results = '[]', message = 'results expired' "
                "WHERE state = ANY(%s) AND finished < %s RETURNING job_id",
                (EXPIRED, [SUCCEEDED, FAILED, CANCELLED], finished_before)).fetchall()]
            conn.execute("DELETE FROM job_logs WHERE job_id = ANY(%s)", (ids,))
            return ids

        return self._run(expire)

    def unreferenced_blobs(self, created_before: float) -> list[str]:
        rows = self._run(lambda conn: conn.execute(
            "SELECT blob_id FROM blobs WHERE created < %s AND blob_id NOT IN ("
            " SELECT jb.blob_id FROM job_blobs jb JOIN jobs j USING (job_id) WHERE j.state != %s)",
            (created_before, EXPIRED)).fetchall())
        return [r["blob_id"] for r in rows]

    def known_blobs(self) -> set[str]:
        return {r["blob_id"] for r in self._run(lambda conn: conn.execute("SELECT blob_id FROM blobs").fetchall())}

    def forget_blob(self, blob_id: str) -> None:
        def forget(conn: psycopg.Connection) -> None:
            conn.execute("DELETE FROM blobs WHERE blob_id = %s", (blob_id,))
            conn.execute("DELETE FROM blob_owners WHERE blob_id = %s", (blob_id,))

        self._run(forget)

    def usage(self) -> int:
        """Bytes of all recorded blobs: the quota every replica checks against."""
        row = self._run(lambda conn: conn.execute("SELECT coalesce(sum(size), 0) AS n FROM blobs").fetchone())
        return int(row["n"])

    def add_logs(self, lines: list[tuple[str, str]]) -> None:
        """Append (job id, log line) pairs, in order."""
        if not lines:
            return

        def add(conn: psycopg.Connection) -> None:
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO job_logs (job_id, line) VALUES (%s, %s)", lines)

        self._run(add)

    def logs_since(self, job_id: str, after: int) -> list[tuple[int, str]]:
        """The job's log lines after position ``after`` (0: from the start), as (position, line)."""
        rows = self._run(lambda conn: conn.execute(
            "SELECT line_id, line FROM job_logs WHERE job_id = %s AND line_id > %s ORDER BY line_id",
            (job_id, after)).fetchall())
        return [(r["line_id"], r["line"]) for r in rows]

    # -- sharing the queue between replicas -------------------------------------------------------------------

    def heartbeat(self, address: str = "") -> None:
        """Register this replica or refresh its heartbeat."""
        self._run(lambda conn: conn.execute(
            f"INSERT INTO replicas (replica_id, address, started, heartbeat) VALUES (%s, %s, {_NOW}, {_NOW}) "
            f"ON CONFLICT (replica_id) DO UPDATE SET heartbeat = {_NOW}", (self.replica_id, address)))

    def claim(self, limit: int) -> list[JobRecord]:
        """Take up to ``limit`` queued jobs nobody owns, oldest first, for this replica (SKIP LOCKED: a job another
        replica is claiming at this moment is skipped, never taken twice)."""
        if limit <= 0:
            return []
        rows = self._run(lambda conn: conn.execute(
            "UPDATE jobs SET owner = %s, attempts = attempts + 1 WHERE job_id IN ("
            " SELECT job_id FROM jobs WHERE state = %s AND owner IS NULL ORDER BY created LIMIT %s"
            " FOR UPDATE SKIP LOCKED) RETURNING *", (self.replica_id, QUEUED, limit)).fetchall())
        return sorted((_decode(r) for r in rows), key=lambda r: r.created)

    def release(self, job_id: str) -> None:
        """Give a claimed job that this replica could not start back to the queue."""
        self._run(lambda conn: conn.execute(
            "UPDATE jobs SET owner = NULL, attempts = greatest(attempts - 1, 0) "
            "WHERE job_id = %s AND owner = %s AND state = %s", (job_id, self.replica_id, QUEUED)))

    def requeue(self, job_id: str, message: str) -> bool:
        """Put a job this replica was running back in the shared queue (interrupted by a graceful shutdown: that
        run does not count as an attempt)."""
        return self._run(lambda conn: conn.execute(
            "UPDATE jobs SET owner = NULL, state = %s, started = NULL, stage = '', fraction = 0, message = %s, "
            "attempts = greatest(attempts - 1, 0) WHERE job_id = %s AND owner = %s AND state = ANY(%s)",
            (QUEUED, message, job_id, self.replica_id, list(ACTIVE_STATES))).rowcount > 0)

    def request_cancel(self, job_id: str) -> bool:
        """Ask the owner of an active job to stop it; a queued job nobody runs yet is cancelled at once.

        Returns whether the job was cancelled here (True) or left for its owner (False).
        """
        def cancel(conn: psycopg.Connection) -> bool:
            row = conn.execute(
                "UPDATE jobs SET state = %s, error = 'cancelled', error_type = 'CancelledError', "
                "finished = %s, owner = NULL WHERE job_id = %s AND state = %s AND owner IS NULL RETURNING job_id",
                (CANCELLED, time.time(), job_id, QUEUED)).fetchone()
            if row is None:
                conn.execute("UPDATE jobs SET cancel_requested = TRUE WHERE job_id = %s AND state = ANY(%s)",
                             (job_id, list(ACTIVE_STATES)))
            return row is not None

        return self._run(cancel)

    def cancel_requests(self) -> list[str]:
        """Active jobs of this replica that some replica was asked to cancel."""
        rows = self._run(lambda conn: conn.execute(
            "SELECT job_id FROM jobs WHERE owner = %s AND cancel_requested AND state = ANY(%s)",
            (self.replica_id, list(ACTIVE_STATES))).fetchall())
        return [r["job_id"] for r in rows]

    def reclaim(self, *, stale_after_s: float, max_attempts: int, reason: str) -> tuple[list[str], list[str]]:
        """Take back the jobs of replicas whose heartbeat is older than ``stale_after_s``.

        Their queued jobs return to the queue. Their running jobs (whose process died with the replica, or was
        ended by Ray when its driver went away) run again while they have had fewer than ``max_attempts`` runs,
        else they fail with ``reason``. Returns (re-queued job ids, failed job ids).
        """
        def reclaim(conn: psycopg.Connection) -> tuple[list[str], list[str]]:
            dead = [r["replica_id"] for r in conn.execute(
                f"SELECT replica_id FROM replicas WHERE heartbeat < {_NOW} - %s AND replica_id != %s "
                "FOR UPDATE SKIP LOCKED", (stale_after_s, self.replica_id)).fetchall()]
            if not dead:
                return [], []
            conn.execute("UPDATE jobs SET owner = NULL, attempts = greatest(attempts - 1, 0) "
                         "WHERE owner = ANY(%s) AND state = %s", (dead, QUEUED))
            requeued = [r["job_id"] for r in conn.execute(
                "UPDATE jobs SET owner = NULL, state = %s, started = NULL, stage = '', fraction = 0, "
                "message = 'the replica running it stopped; queued again' "
                "WHERE owner = ANY(%s) AND state = %s AND attempts < %s AND NOT cancel_requested RETURNING job_id",
                (QUEUED, dead, RUNNING, max_attempts)).fetchall()]
            failed = [r["job_id"] for r in conn.execute(
                "UPDATE jobs SET owner = NULL, state = CASE WHEN cancel_requested THEN %s ELSE %s END, "
                "error = CASE WHEN cancel_requested THEN 'cancelled' ELSE %s END, "
                "error_type = CASE WHEN cancel_requested THEN 'CancelledError' ELSE 'ServerRestart' END, "
                "finished = %s WHERE owner = ANY(%s) AND state = %s RETURNING job_id",
                (CANCELLED, FAILED, reason, time.time(), dead, RUNNING)).fetchall()]
            conn.execute("DELETE FROM replicas WHERE replica_id = ANY(%s)", (dead,))
            for replica in dead:
                log_event(log, "replica.reclaimed", replica=replica, requeued=len(requeued), failed=len(failed))
            return requeued, failed

        return self._run(reclaim)

    def leave(self) -> None:
        """Unregister at a clean shutdown (queued claims go back to the queue)."""
        def leave(conn: psycopg.Connection) -> None:
            conn.execute("UPDATE jobs SET owner = NULL, attempts = greatest(attempts - 1, 0) "
                         "WHERE owner = %s AND state = %s", (self.replica_id, QUEUED))
            conn.execute("DELETE FROM replicas WHERE replica_id = %s", (self.replica_id,))

        self._run(leave)
