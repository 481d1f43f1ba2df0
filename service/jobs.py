"""The job lifecycle: validate and record submissions, run them on the executor, feed watchers, expire results.

:class:`JobManager` is what the servicer calls; it speaks in plain Python values (no protobuf) and raises
onnxprune / service errors, which the servicer maps to statuses. Every state change is one structured log line.

With a shared store (``store.shared``: PostgreSQL, several API replicas) a submission only records the job; each
replica's dispatcher thread heartbeats, takes back the jobs of replicas that stopped heartbeating, claims queued
jobs up to its executor's free capacity and stops the jobs it owns that any replica was asked to cancel. Watchers
of a job another replica runs follow its record in the database.
"""

from __future__ import annotations

import logging
import posixpath
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from onnxprune import errors as onnxprune_errors
from onnxprune.errors import BadInputError, OnnxpruneError
from onnxprune.progress import Progress
from onnxprune.spec import DATA_OPTIONS, PruneSpec
from onnxprune.service.blobs import BlobInfo, BlobStore, check_blob_id
from onnxprune.service.errors import (
    JobCrashedError,
    NotFoundError,
    NotReadyError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
)
from onnxprune.service.executor import INTERRUPTED, ExecJob, Executor, Outcome
from onnxprune.service.logs import log_event
from onnxprune.service.modelcheck import check_model
from onnxprune.service.store import (
    ACTIVE_STATES,
    CANCELLED,
    EXPIRED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    JobRecord,
    JobStore,
    ResultFile,
)
from onnxprune.service.tasks import ANALYZE, PRUNE, TaskRequest

log = logging.getLogger(__name__)

_PLAIN_NAME = re.compile(r"^[A-Za-z0-9._+-][A-Za-z0-9._+ -]{0,199}$")
_FEED_LIMIT = 2000  # events kept per running job for late watchers
_FEED_KEEP_S = 60.0  # how long a finished job's feed stays for watchers that are catching up
_DB_PROGRESS_INTERVAL_S = 0.5
_REMOTE_WATCH_POLL_S = 0.3  # how often a watcher of a job another replica runs re-reads its record
_FINISH_RETRY_S = 600.0  # how long a finished job's outcome is retried while the database is down
_SHARED_LOG_LIMIT = 2000  # log lines per job written to a shared store, for watchers on other replicas
_ERROR_TYPES: dict[str, type[OnnxpruneError]] = {
    name: cls
    for name, cls in vars(onnxprune_errors).items()
    if isinstance(cls, type) and issubclass(cls, OnnxpruneError)
}


@dataclass(frozen=True)
class SharingOptions:
    """How a replica takes part in a shared queue (only used with a shared store).

    ``heartbeat_s``: how often it says it is alive and looks for work; ``replica_timeout_s``: silence after which
    a replica counts as dead and its jobs are taken back; ``max_attempts``: runs a job may get when replicas
    running it die (2: it is re-run once, then fails with the reason).
    """

    heartbeat_s: float = 2.0
    replica_timeout_s: float = 20.0
    max_attempts: int = 2
    address: str = ""


@dataclass(frozen=True)
class Limits:
    max_tensor_bytes: int
    retention_s: float
    quota_bytes: int
    metric_modules: frozenset[str] = frozenset()
    """Modules whose functions jobs may use as ``--metric python:MODULE:FUNC`` (``serve --allow-metric-module``)."""


def check_metric_allowed(spec: PruneSpec, allowed: frozenset[str]) -> None:
    """Refuse a ``python:`` metric unless the server was started allowing its module (exact module names).

    A user metric is code the worker imports and runs: accepting any module name from a client would let the
    client run whatever is importable on the server, so the operator names the modules.

    Raises:
        PermissionDeniedError: the module is not on the server's list.
    """
    choice = spec.metric_choice
    if choice is None or not choice.is_python or choice.module in allowed:
        return
    assert choice.module is not None
    how = (f"this server allows {', '.join(sorted(allowed))}" if allowed
           else "this server allows none; start it with `onnxprune serve --allow-metric-module MODULE`")
    raise PermissionDeniedError(
        f"--metric {choice}: python: metrics run code on the server, and module {choice.module!r} is not allowed "
        f"({how}); use a built-in metric or run the prune locally",
        reason="METRIC_MODULE_NOT_ALLOWED", metadata={"module": choice.module, "allowed": ",".join(sorted(allowed))})


@dataclass(frozen=True)
class FeedEvent:
    state: str
    stage: str
    fraction: float
    message: str
    log_line: str = ""


@dataclass
class _Feed:
    """Recent events of one job and a condition watchers wait on."""

    events: list[FeedEvent] = field(default_factory=list)
    dropped: int = 0  # events trimmed from the front
    closed_at: float | None = None
    cond: threading.Condition = field(default_factory=threading.Condition)

    def push(self, event: FeedEvent, close: bool = False) -> None:
        with self.cond:
            self.events.append(event)
            if len(self.events) > _FEED_LIMIT:
                cut = len(self.events) - _FEED_LIMIT
                del self.events[:cut]
                self.dropped += cut
            if close:
                self.closed_at = time.monotonic()
            self.cond.notify_all()

    def since(self, seq: int, timeout: float) -> tuple[list[FeedEvent], int, bool]:
        """Events after absolute position ``seq`` (waiting up to ``timeout``), the new position, closed."""
        with self.cond:
            end = self.dropped + len(self.events)
            if seq >= end and self.closed_at is None:
                self.cond.wait(timeout)
                end = self.dropped + len(self.events)
            start = max(seq, self.dropped)
            return self.events[start - self.dropped :], end, self.closed_at is not None


def check_relative_path(path: str, field_name: str) -> str:
    """Input paths become files under the job's directory: refuse absolute paths and ``..``.

    Raises:
        BadInputError: naming ``field_name``.
    """
    norm = posixpath.normpath(path or "")
    if (
        not path
        or path.startswith(("/", "\\"))
        or "\\" in path
        or "\0" in path
        or norm == "."
        or norm == ".."
        or norm.startswith("../")
        or ".." in path.split("/")
    ):
        raise BadInputError(
            f"{field_name} must be a relative path inside the job, got {path[:200]!r}", field=field_name
        )
    return norm


class JobManager:
    """Owns job records, blob ownership checks, watcher feeds and retention; delegates running to the executor."""

    def __init__(self, store: JobStore, blobs: BlobStore, executor: Executor, limits: Limits,
                 sharing: SharingOptions | None = None) -> None:
        self._store = store
        self._blobs = blobs
        self._executor = executor
        self._limits = limits
        self._feeds: dict[str, _Feed] = {}
        self._last_db_write: dict[str, float] = {}
        self._lock = threading.Lock()
        self._accepting = True
        self._shared: Any = store if getattr(store, "shared", False) else None
        self._sharing = sharing or SharingOptions()
        self._owner: str | None = self._shared.replica_id if self._shared is not None else None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._dispatcher: threading.Thread | None = None
        self._cancel_sent: set[str] = set()
        self._log_buffer: list[tuple[str, str]] = []  # shared store: lines not yet written
        self._log_counts: dict[str, int] = {}
        self._log_flush = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Recover records of a previous run, then start the executor and re-queue waiting jobs.

        Jobs that were RUNNING when the server died are marked FAILED (their process died with it; re-running
        a job that may have crashed the server could crash it again). QUEUED jobs never started and run now.
        """
        if self._shared is not None:
            self._start_shared()
            return
        failed, queued = self._store.recover("server stopped while the job was running; submit it again")
        for job_id in failed:
            log_event(log, "job.failed", job=job_id, reason="server restarted while running")
        known = self._store.known_blobs()
        for blob_id in self._blobs.list_ids():
            if blob_id not in known:  # stored just before a crash, never recorded: let retention remove it
                self._store.add_blob(blob_id, self._blobs.size(blob_id) or 0, None)
                log_event(log, "blob.adopted", blob=blob_id)
        self._executor.start(self)
        for record in queued:
            if not self._still_allowed(record):
                continue
            self._feeds[record.job_id] = _Feed()
            self._executor.submit(self._exec_job(record))
            log_event(log, "job.requeued", job=record.job_id, tenant=record.tenant)

    def _start_shared(self) -> None:
        self._shared.heartbeat(self._sharing.address)
        self._adopt_blobs()
        self._executor.start(self)
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="onnxprune-dispatcher", daemon=True)
        self._dispatcher.start()

    def _adopt_blobs(self) -> None:
        known = self._store.known_blobs()
        for blob_id in self._blobs.list_ids():
            if blob_id not in known:  # stored just before a crash, never recorded: let retention remove it
                self._store.add_blob(blob_id, self._blobs.size(blob_id) or 0, None)
                log_event(log, "blob.adopted", blob=blob_id)

    def _dispatch_loop(self) -> None:
        """Shared store: heartbeat, take back dead replicas' jobs, claim work, forward cancel requests."""
        opts = self._sharing
        last_beat = 0.0
        while not self._stopping.is_set():
            try:
                if time.monotonic() - last_beat >= opts.heartbeat_s:
                    self._shared.heartbeat(opts.address)
                    last_beat = time.monotonic()
                    requeued, failed = self._shared.reclaim(
                        stale_after_s=opts.replica_timeout_s, max_attempts=opts.max_attempts,
                        reason="the replica running the job stopped, and the job had no runs left; submit it again")
                    for job_id in requeued:
                        log_event(log, "job.requeued", job=job_id, reason="replica lost")
                    for job_id in failed:
                        log_event(log, "job.failed", job=job_id, reason="replica lost")
                self._flush_logs()
                self._forward_cancels()
                if self._accepting:
                    self._claim_work()
            except UnavailableError as e:
                log_event(log, "dispatch.unavailable", logging.WARNING, error=str(e)[:300])
            except Exception as e:  # noqa: BLE001 - the dispatcher must outlive one bad round
                log_event(log, "dispatch.error", logging.ERROR, error=repr(e)[:500])
                log.debug("dispatcher error", exc_info=e)
            self._wake.wait(min(opts.heartbeat_s, 0.5))
            self._wake.clear()

    def _claim_work(self) -> None:
        claimed = self._shared.claim(self._executor.capacity())
        for i, record in enumerate(claimed):
            if not self._still_allowed(record):
                continue
            with self._lock:
                self._feeds[record.job_id] = _Feed()
            try:
                self._executor.submit(self._exec_job(record))
            except OnnxpruneError as e:  # full or stopping: this one and the rest go back for others to take
                for rest in claimed[i:]:
                    self._shared.release(rest.job_id)
                    log_event(log, "job.released", job=rest.job_id, reason=str(e)[:200])
                return
            log_event(log, "job.claimed", job=record.job_id, replica=self._owner)

    def _forward_cancels(self) -> None:
        for job_id in self._shared.cancel_requests():
            if job_id in self._cancel_sent:
                continue
            self._cancel_sent.add(job_id)
            self._executor.cancel(job_id)
            if self._store.update(job_id, only_if=[QUEUED], owned_by=self._owner, state=CANCELLED,
                                  error="cancelled", error_type="CancelledError", finished=time.time()):
                self._publish(job_id, FeedEvent(CANCELLED, "", 0.0, "cancelled"), close=True)
                self._cancel_sent.discard(job_id)  # it never started: no outcome will clear it
            log_event(log, "job.cancel_forwarded", job=job_id)

    def _flush_logs(self) -> None:
        """Write buffered log lines to the shared store (put back in front if it is down); one flush at a time,
        so lines keep their order."""
        with self._log_flush:
            with self._lock:
                lines, self._log_buffer = self._log_buffer, []
            try:
                self._shared.add_logs(lines)
            except UnavailableError:
                with self._lock:
                    self._log_buffer[:0] = lines[-_SHARED_LOG_LIMIT:]
                raise

    def _update_own(self, job_id: str, *, only_if: Iterable[str] | None = None, **changes: Any) -> bool:
        """Update a job this server runs; with a shared store, only while this replica still owns it."""
        if self._owner is None:
            return self._store.update(job_id, only_if=only_if, **changes)
        return self._store.update(job_id, only_if=only_if, owned_by=self._owner, **changes)  # type: ignore[call-arg]

    def _still_allowed(self, record: JobRecord) -> bool:
        """A queued job from before a restart runs only if this server's policy still accepts it."""
        try:
            check_metric_allowed(PruneSpec.from_dict(record.spec), self._limits.metric_modules)
        except PermissionDeniedError as e:
            self._update_own(record.job_id, state=FAILED, error=str(e), error_type=type(e).__name__,
                             finished=time.time())
            log_event(log, "job.failed", job=record.job_id, reason="metric module no longer allowed")
            return False
        return True

    def set_address(self, address: str) -> None:
        """The address this replica serves on, as other replicas' operators see it in the replicas table."""
        self._sharing = replace(self._sharing, address=address)

    def stop_accepting(self) -> None:
        self._accepting = False

    def shutdown(self, grace: float) -> None:
        self._accepting = False
        self._stopping.set()
        self._wake.set()
        if self._dispatcher is not None:
            self._dispatcher.join(timeout=30)
        self._executor.shutdown(grace)
        if self._shared is not None:
            try:
                self._shared.leave()
            except UnavailableError as e:  # the others take our claims back once our heartbeat is stale
                log_event(log, "replica.leave_failed", logging.WARNING, error=str(e)[:300])

    # -- requests ------------------------------------------------------------------------------------------

    def upload(self, tenant: str, name: str, size: int, sha256: str, chunks: Iterable[bytes]) -> BlobInfo:
        """Store one upload for ``tenant`` (see DirBlobStore.put_stream for the checks)."""
        self._check_accepting()
        info = self._blobs.put_stream(chunks, size=size, sha256=sha256)
        self._store.add_blob(info.blob_id, info.size, tenant)
        log_event(log, "blob.uploaded", tenant=tenant, blob=info.blob_id, size=info.size, name=name[:200])
        return info

    def submit(
        self,
        tenant: str,
        *,
        model_path: str,
        files: Mapping[str, str],
        spec: PruneSpec,
        inputs: Mapping[str, str] | None = None,
        output_name: str = "",
        kind: str = PRUNE,
    ) -> JobRecord:
        """Validate a job and queue it.

        Raises:
            BadInputError: bad paths, unknown blobs, an unsafe model, data options naming no uploaded file.
            PermissionDeniedError: a ``python:`` metric whose module the server does not allow.
            ResourceExhaustedError: store over quota or queue full.
            UnavailableError: shutting down.
        """
        self._check_accepting()
        check_metric_allowed(spec, self._limits.metric_modules)
        all_inputs = self._check_inputs(tenant, model_path, files, inputs or {})
        model_rel = check_relative_path(model_path, "model.model_path")
        self._check_model(model_rel, all_inputs)
        data = spec.to_dict()
        for key in DATA_OPTIONS:
            if data.get(key) and not (key == "calib" and data[key] == "random"):
                data[key] = self._check_data_path(data[key], key, all_inputs)
        output_name = output_name or "pruned.onnx"
        if not _PLAIN_NAME.match(output_name) or output_name in (".", ".."):
            raise BadInputError(
                f"output_name must be a plain file name, got {output_name[:200]!r}", field="output_name"
            )
        if self._blobs.usage() >= self._limits.quota_bytes:
            raise ResourceExhaustedError("store is full; wait for results to expire or raise the quota")
        record = JobRecord(
            job_id=uuid.uuid4().hex,
            tenant=tenant,
            kind=kind,
            spec=data,
            model_path=model_rel,
            inputs=dict(all_inputs),
            output_name=output_name,
            created=time.time(),
        )
        self._store.create(record)
        if self._shared is not None:  # whichever replica has room claims it
            self._wake.set()
            log_event(log, "job.submitted", job=record.job_id, tenant=tenant, kind=kind, model=model_rel,
                      inputs=len(all_inputs))
            return record
        with self._lock:
            self._feeds[record.job_id] = _Feed()
        try:
            self._executor.submit(self._exec_job(record))
        except OnnxpruneError as e:  # queue full or shutting down: the job never ran
            self._store.update(record.job_id, state=FAILED, error=str(e), error_type=type(e).__name__,
                               finished=time.time())
            raise
        log_event(log, "job.submitted", job=record.job_id, tenant=tenant, kind=kind, model=model_rel,
                  inputs=len(all_inputs))
        return record

    def get(self, tenant: str | None, job_id: str) -> JobRecord:
        """Raises NotFoundError for unknown jobs and for other tenants' jobs alike."""
        record = self._store.get(job_id, tenant)
        if record is None:
            raise NotFoundError(f"job {job_id[:100]!r} not found")
        return record

    def list_jobs(self, tenant: str | None, limit: int) -> list[JobRecord]:
        return [r for r in self._store.list_jobs(tenant, limit if limit > 0 else 100) if r.kind == PRUNE]

    def cancel(self, tenant: str | None, job_id: str) -> JobRecord:
        """Cancel a queued job at once or ask a running one to stop; finished jobs are returned unchanged."""
        record = self.get(tenant, job_id)
        if record.state in ACTIVE_STATES and self._shared is not None:
            if self._shared.request_cancel(job_id):
                self._publish(job_id, FeedEvent(CANCELLED, record.stage, record.fraction, "cancelled"), close=True)
            self._wake.set()  # this replica may be the owner: forward at once
            log_event(log, "job.cancel_requested", job=job_id, tenant=record.tenant, state=record.state)
        elif record.state in ACTIVE_STATES:
            self._executor.cancel(job_id)
            if self._store.update(job_id, only_if=[QUEUED], state=CANCELLED, error="cancelled",
                                  error_type="CancelledError", finished=time.time()):
                self._publish(job_id, FeedEvent(CANCELLED, record.stage, record.fraction, "cancelled"), close=True)
            log_event(log, "job.cancel_requested", job=job_id, tenant=record.tenant, state=record.state)
        return self.get(tenant, job_id)

    def watch(self, tenant: str | None, job_id: str, active: Callable[[], bool]) -> Iterator[tuple[JobRecord, str]]:
        """Yield (job snapshot, log line) from now until the job ends or ``active()`` turns False."""
        record = self.get(tenant, job_id)
        yield record, ""
        with self._lock:
            feed = self._feeds.get(job_id)
        if record.terminal:
            return
        if feed is None:
            if self._shared is not None:  # another replica runs it (or none has claimed it yet)
                yield from self._watch_record(tenant, record, active)
            return
        seq = 0
        while active():
            events, seq, closed = feed.since(seq, timeout=1.0)
            for ev in events:
                record = replace(record, state=ev.state, stage=ev.stage, fraction=ev.fraction, message=ev.message)
                if not ev.log_line and ev.state not in ACTIVE_STATES:
                    continue  # the final snapshot below carries results and errors
                yield record, ev.log_line
            if closed and not events:
                yield self.get(tenant, job_id), ""
                return

    def _watch_record(self, tenant: str | None, record: JobRecord,
                      active: Callable[[], bool]) -> Iterator[tuple[JobRecord, str]]:
        """Follow a job through its database record (state, stage, progress) and its log lines until it ends."""
        last = (record.state, record.stage, record.fraction, record.message)
        seen = 0
        while active():
            time.sleep(_REMOTE_WATCH_POLL_S)
            current = self.get(tenant, record.job_id)
            lines = self._shared.logs_since(record.job_id, seen)
            for seen, line in lines:
                yield current, line
            if current.terminal:
                yield current, ""
                return
            key = (current.state, current.stage, current.fraction, current.message)
            if key != last:
                last = key
                yield current, ""

    def open_result(self, tenant: str | None, job_id: str, name: str) -> tuple[ResultFile, Iterator[bytes]]:
        """The result file's metadata and its chunks.

        Raises:
            NotFoundError: unknown job, unknown file, or results expired.
            NotReadyError: the job has not succeeded.
        """
        record = self.get(tenant, job_id)
        if record.state == EXPIRED:
            raise NotFoundError(f"results of job {job_id} expired (retention)")
        if record.state != SUCCEEDED:
            raise NotReadyError(f"job {job_id} is {record.state}; results exist only for SUCCEEDED jobs")
        for result in record.results:
            if result.name == name:
                return result, self._blobs.read(result.sha256)
        raise NotFoundError(f"job {job_id} has no result {name[:200]!r}; it has {[r.name for r in record.results]}")

    def analyze(
        self, tenant: str, *, model_path: str, files: Mapping[str, str], shapes: dict[str, list[int]],
        active: Callable[[], bool],
    ) -> dict:
        """Run the analysis as an (unlisted) job on the worker pool and wait for it.

        Raises:
            The job's own error (BadInputError, UnsupportedOpError, …) when it fails.
        """
        spec = PruneSpec(shapes=shapes).validate()
        record = self.submit(tenant, model_path=model_path, files=files, spec=spec, kind=ANALYZE)
        for snapshot, _ in self.watch(tenant, record.job_id, active):
            record = snapshot
        if not record.terminal:
            self.cancel(tenant, record.job_id)
            raise onnxprune_errors.CancelledError("analysis cancelled: the client went away")
        if record.state != SUCCEEDED:
            raise self.job_error(record)
        return record.report or {}

    @staticmethod
    def job_error(record: JobRecord) -> OnnxpruneError:
        """Rebuild the exception a failed job recorded, so synchronous RPCs map it like any other.

        A type outside onnxprune's error tree (a bug in the job, a dead worker) becomes JobCrashedError: it is
        reported as INTERNAL with the job's message, not hidden like a bug in the server itself.
        """
        cls = _ERROR_TYPES.get(record.error_type)
        if cls is None or cls is OnnxpruneError:
            return JobCrashedError(record.error or "the job failed without a reason",
                                   error_type=record.error_type or "Unknown")
        if cls is BadInputError:
            return BadInputError(record.error, field=record.error_field or None)
        return cls(record.error)

    # -- executor callbacks ----------------------------------------------------------------------------------

    def on_start(self, job_id: str) -> bool:
        try:
            started = self._update_own(job_id, only_if=[QUEUED], state=RUNNING, started=time.time())
        except UnavailableError as e:  # shared store down: leave it queued; its claim is taken back later
            log_event(log, "job.start_failed", logging.WARNING, job=job_id, error=str(e)[:300])
            return False
        if started:
            self._publish(job_id, FeedEvent(RUNNING, "", 0.0, "started"))
            log_event(log, "job.started", job=job_id)
        return started

    def on_progress(self, job_id: str, progress: Progress) -> None:
        now = time.monotonic()
        with self._lock:
            feed = self._feeds.get(job_id)
            last_stage = feed.events[-1].stage if feed and feed.events else ""
            write = now - self._last_db_write.get(job_id, 0.0) > _DB_PROGRESS_INTERVAL_S or progress.stage != last_stage
            if write:
                self._last_db_write[job_id] = now
        if write:
            try:
                self._update_own(job_id, stage=progress.stage, fraction=progress.fraction, message=progress.message)
            except UnavailableError:  # progress is advisory; the feed below still has it
                pass
        if progress.stage != last_stage:
            log_event(log, "job.stage", job=job_id, stage=progress.stage)
        self._publish(job_id, FeedEvent(RUNNING, progress.stage, progress.fraction, progress.message))

    def on_log(self, job_id: str, line: str) -> None:
        with self._lock:
            feed = self._feeds.get(job_id)
            last = feed.events[-1] if feed and feed.events else FeedEvent(RUNNING, "", 0.0, "")
        self._publish(job_id, replace(last, log_line=line))
        if self._shared is not None:
            with self._lock:
                count = self._log_counts[job_id] = self._log_counts.get(job_id, 0) + 1
                if count <= _SHARED_LOG_LIMIT:
                    self._log_buffer.append((job_id, line))

    def on_finish(self, job_id: str, outcome: Outcome) -> None:
        self._with_retry(job_id, lambda: self._record_finish(job_id, outcome))

    def _with_retry(self, job_id: str, write: Callable[[], None]) -> None:
        """A job's outcome must not be lost to a database outage: retry the write until it is back."""
        deadline = time.monotonic() + _FINISH_RETRY_S
        delay = 0.2
        while True:
            try:
                write()
                return
            except UnavailableError as e:
                if time.monotonic() > deadline:
                    log_event(log, "job.finish_lost", logging.ERROR, job=job_id, error=str(e)[:300])
                    raise
                log_event(log, "job.finish_retry", logging.WARNING, job=job_id, error=str(e)[:200])
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _record_finish(self, job_id: str, outcome: Outcome) -> None:
        if self._shared is not None:  # other replicas' watchers get the last lines before the end
            self._flush_logs()
            with self._lock:
                self._log_counts.pop(job_id, None)
        now = time.time()
        if outcome.state == INTERRUPTED:
            message = "interrupted by server shutdown; will run again after restart"
            if self._shared is not None:
                self._shared.requeue(job_id, message)  # another replica may take it at once
            else:
                self._store.update(job_id, state=QUEUED, started=None, stage="", fraction=0.0, message=message)
            log_event(log, "job.interrupted", job=job_id)
            return
        for result in outcome.results:
            self._store.add_blob(result.sha256, result.size, None)
        changes: dict[str, Any] = dict(
            state=outcome.state, finished=now, error=outcome.error, error_type=outcome.error_type,
            error_field=outcome.error_field or "", results=outcome.results, report=outcome.report,
        )
        if outcome.state == SUCCEEDED:
            changes.update(stage="done", fraction=1.0, message="")
        if not self._update_own(job_id, only_if=ACTIVE_STATES if self._shared is not None else None, **changes):
            log_event(log, "job.outcome_dropped", logging.WARNING, job=job_id, state=outcome.state,
                      reason="the job is no longer this server's (taken back or already ended)")
        self._cancel_sent.discard(job_id)
        with self._lock:
            self._last_db_write.pop(job_id, None)
        self._publish(job_id, FeedEvent(outcome.state, "", 1.0, outcome.error), close=True)
        log_event(log, "job.finished", job=job_id, state=outcome.state, error_type=outcome.error_type or None,
                  error=outcome.error[:500] or None, results=len(outcome.results),
                  peak_rss_mb=round(outcome.peak_rss_kb / 1024, 1))

    # -- retention -------------------------------------------------------------------------------------------

    def sweep(self, now: float | None = None) -> tuple[int, int]:
        """Expire results older than the retention time and delete blobs nothing live uses.

        Returns (jobs expired, blobs deleted).
        """
        now = time.time() if now is None else now
        cutoff = now - self._limits.retention_s
        expired = self._store.expire(cutoff)
        for job_id in expired:
            log_event(log, "job.expired", job=job_id)
        deleted = 0
        for blob_id in self._store.unreferenced_blobs(cutoff):
            self._blobs.delete(blob_id)
            self._store.forget_blob(blob_id)
            deleted += 1
        with self._lock:
            mono = time.monotonic()
            for job_id in [j for j, f in self._feeds.items() if f.closed_at and mono - f.closed_at > _FEED_KEEP_S]:
                del self._feeds[job_id]
        if expired or deleted:
            log_event(log, "store.sweep", expired=len(expired), blobs_deleted=deleted, usage=self._blobs.usage())
        return len(expired), deleted

    # -- helpers ----------------------------------------------------------------------------------------------

    def _check_accepting(self) -> None:
        if not self._accepting:
            raise UnavailableError("server is shutting down; retry against the restarted server")

    def _exec_job(self, record: JobRecord) -> ExecJob:
        return ExecJob(record.job_id, TaskRequest(record.kind, record.spec, record.model_path, record.output_name),
                       record.inputs)

    def _publish(self, job_id: str, event: FeedEvent, close: bool = False) -> None:
        with self._lock:
            feed = self._feeds.get(job_id)
        if feed is not None:
            feed.push(event, close)

    def _check_inputs(
        self, tenant: str, model_path: str, files: Mapping[str, str], inputs: Mapping[str, str]
    ) -> dict[str, str]:
        merged: dict[str, str] = {}
        for group, items in (("model.files", files), ("inputs", inputs)):
            for path, blob_id in items.items():
                rel = check_relative_path(path, group)
                check_blob_id(blob_id)
                if not self._store.owns(tenant, blob_id):
                    raise BadInputError(f"{group}: blob {blob_id} for {path!r} was not uploaded (or has expired)",
                                        field=group)
                if rel in merged and merged[rel] != blob_id:
                    raise BadInputError(f"{group}: two different files for {rel!r}", field=group)
                merged[rel] = blob_id
        if check_relative_path(model_path, "model.model_path") not in merged:
            raise BadInputError(f"model.model_path {model_path!r} is not among model.files", field="model.model_path")
        return merged

    def _check_model(self, model_rel: str, inputs: Mapping[str, str]) -> None:
        sizes = {rel: self._blobs.size(blob_id) or 0 for rel, blob_id in inputs.items()}
        check_model(self._blobs.local_path(inputs[model_rel]), model_path=model_rel, files=sizes,
                    max_tensor_bytes=self._limits.max_tensor_bytes)

    @staticmethod
    def _check_data_path(value: str, key: str, inputs: Mapping[str, str]) -> str:
        rel = check_relative_path(value, key)
        if rel in inputs or any(p.startswith(rel + "/") for p in inputs):
            return rel
        raise BadInputError(f"{key} {value!r} names no uploaded input file or directory", field=key)

