"""Running jobs: a bounded queue feeding a fixed number of worker slots, each job in its own process.

:class:`Executor` is the interface (submit, cancel, status, capacity), so an executor for a fleet
(:class:`~onnxprune.service.rayexec.RayExecutor`) replaces the local pool without touching job records or the
servicer. :class:`LocalProcessExecutor` runs every job in a fresh ``spawn``-ed process, so

- CPU-heavy pruning never holds the server's GIL or its gRPC threads;
- cancellation is cooperative first (an Event the pipeline checks at stage and batch boundaries) and forced
  after a grace period (terminate, then kill), and either way the process's memory goes back to the OS;
- a job that crashes or is OOM-killed fails alone; the server keeps serving.

The executor knows blobs (to place inputs and collect results) but not job records: it reports what happens
through a :class:`Listener`, and the job manager decides what to record.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

from onnxprune.progress import Progress
from onnxprune.service.blobs import BlobStore
from onnxprune.service.errors import ResourceExhaustedError, UnavailableError
from onnxprune.service.logs import log_event
from onnxprune.service.store import CANCELLED, FAILED, SUCCEEDED, ResultFile
from onnxprune.service.tasks import TaskFn, TaskRequest
from onnxprune.service.worker import CANCEL, encode_job

log = logging.getLogger(__name__)

INTERRUPTED = "INTERRUPTED"  # stopped by server shutdown; the manager re-queues it


@dataclass(frozen=True)
class ExecJob:
    job_id: str
    request: TaskRequest
    inputs: Mapping[str, str]  # relative path in the input directory → blob id


@dataclass
class Outcome:
    """How a job ended: ``state`` is SUCCEEDED, FAILED, CANCELLED or INTERRUPTED."""

    state: str
    results: list[ResultFile] = field(default_factory=list)
    report: dict[str, Any] | None = None
    error: str = ""
    error_type: str = ""
    error_field: str | None = None
    peak_rss_kb: int = 0


class Listener(Protocol):
    def on_start(self, job_id: str) -> bool:
        """Called when a worker picks the job up; return False to skip it (cancelled meanwhile)."""
        ...

    def on_progress(self, job_id: str, progress: Progress) -> None: ...

    def on_log(self, job_id: str, line: str) -> None: ...

    def on_finish(self, job_id: str, outcome: Outcome) -> None: ...


class Executor(Protocol):
    def start(self, listener: Listener) -> None: ...

    def submit(self, job: ExecJob) -> None: ...

    def cancel(self, job_id: str) -> bool: ...

    def status(self, job_id: str) -> str | None: ...

    def capacity(self) -> int:
        """How many more jobs it would start now (a replica sharing a queue claims no more than this)."""
        ...

    def shutdown(self, grace: float) -> None: ...


class JobSlots:
    """``status`` and ``capacity`` of an executor that keeps its queued and running job ids under ``_lock`` and runs
    at most ``_slots`` jobs at once (the local process pool and the Ray executor alike)."""

    _lock: threading.Lock
    _queued: Collection[str]
    _running: Collection[str]
    _slots: int

    def status(self, job_id: str) -> str | None:
        with self._lock:
            if job_id in self._running:
                return "running"
            if job_id in self._queued:
                return "queued"
        return None

    def capacity(self) -> int:
        with self._lock:
            return max(0, self._slots - len(self._running) - len(self._queued))


class LocalProcessExecutor(JobSlots):
    """``workers`` job slots fed by a queue of at most ``queue_size`` waiting jobs.

    Args:
        task: the job function (module-level, picklable); tests pass small real functions.
        blobs: where inputs come from and results go.
        work_root: scratch space; one directory per running job, removed when it ends.
        cancel_grace: seconds a cancelled job gets to stop on its own before it is terminated.
    """

    def __init__(
        self,
        task: TaskFn,
        blobs: BlobStore,
        work_root: Path,
        *,
        workers: int = 2,
        queue_size: int = 256,
        cancel_grace: float = 10.0,
    ) -> None:
        self._task = task
        self._blobs = blobs
        self._work_root = Path(work_root)
        shutil.rmtree(self._work_root, ignore_errors=True)  # leftovers of a killed server
        self._work_root.mkdir(parents=True)
        self._slots = workers
        self._queue: queue.Queue[ExecJob | None] = queue.Queue(maxsize=queue_size)
        self._cancel_grace = cancel_grace
        self._lock = threading.Lock()
        self._queued: set[str] = set()
        self._running: dict[str, threading.Event] = {}  # job id → its cancel request
        self._cancelled: set[str] = set()
        self._stopping = threading.Event()
        self._interrupt = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listener: Listener | None = None

    def start(self, listener: Listener) -> None:
        self._listener = listener
        for i in range(self._slots):
            t = threading.Thread(target=self._worker, name=f"onnxprune-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def submit(self, job: ExecJob) -> None:
        """Queue a job.

        Raises:
            ResourceExhaustedError: the queue is full.
            UnavailableError: the executor is shutting down.
        """
        if self._stopping.is_set():
            raise UnavailableError("server is shutting down; submit again later")
        with self._lock:
            self._queued.add(job.job_id)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            with self._lock:
                self._queued.discard(job.job_id)
            raise ResourceExhaustedError(
                f"job queue is full ({self._queue.maxsize} waiting); retry later"
            ) from None

    def cancel(self, job_id: str) -> bool:
        """Ask a queued or running job to stop; False when this executor does not have it."""
        with self._lock:
            if job_id in self._running:
                self._cancelled.add(job_id)
                self._running[job_id].set()
                return True
            if job_id in self._queued:
                self._cancelled.add(job_id)
                return True
        return False

    def shutdown(self, grace: float) -> None:
        """Stop taking jobs; let running ones finish for ``grace`` seconds, then interrupt them.

        Queued jobs are left alone (their records stay QUEUED and a restarted server runs them).
        """
        self._stopping.set()
        for _ in self._threads:
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with self._lock:
                if not self._running:
                    break
            time.sleep(0.05)
        self._interrupt.set()
        for t in self._threads:
            t.join(timeout=self._cancel_grace + 5)

    # -- worker side -------------------------------------------------------------------------------------

    def _worker(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                job = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if job is None or self._stopping.is_set():
                return
            with self._lock:
                self._queued.discard(job.job_id)
                if job.job_id in self._cancelled:
                    self._cancelled.discard(job.job_id)
                    continue
                # Registered before anything slow happens, so a cancel arriving while inputs are copied counts.
                cancel = self._running[job.job_id] = threading.Event()
            if not self._listener.on_start(job.job_id):
                with self._lock:
                    self._running.pop(job.job_id, None)
                continue
            try:
                outcome = self._run(job, cancel)
            except Exception as e:  # noqa: BLE001 - one broken job must not take a worker slot down
                log_event(log, "job.executor_error", logging.ERROR, job=job.job_id, error=repr(e))
                log.debug("executor error", exc_info=e)
                outcome = Outcome(FAILED, error=f"job could not run: {e}", error_type=type(e).__name__)
            self._listener.on_finish(job.job_id, outcome)

    def _run(self, job: ExecJob, cancel: threading.Event) -> Outcome:
        work = self._work_root / job.job_id
        in_dir, out_dir = work / "in", work / "out"
        out_dir.mkdir(parents=True)
        try:
            for rel, blob_id in job.inputs.items():
                self._blobs.materialize(blob_id, in_dir / rel)
            outcome = self._run_process(job, in_dir, out_dir, cancel)
            if outcome.state == SUCCEEDED:
                outcome.results = [self._collect(out_dir, name) for name in outcome.results]  # type: ignore[arg-type]
            return outcome
        finally:
            with self._lock:
                self._running.pop(job.job_id, None)
                self._cancelled.discard(job.job_id)
            shutil.rmtree(work, ignore_errors=True)

    def _collect(self, out_dir: Path, name: str) -> ResultFile:
        info = self._blobs.put_file(out_dir / name)
        return ResultFile(name=name, size=info.size, sha256=info.blob_id)

    def _spawn(self, job: ExecJob, in_dir: Path, out_dir: Path) -> tuple[subprocess.Popen[bytes], Connection]:
        read_fd, write_fd = os.pipe()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        try:  # the job's stray prints go to the server's stderr, never into its stdout
            stdout: int | None = sys.stderr.fileno()
        except (AttributeError, ValueError, OSError):
            stdout = None
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "onnxprune.service.worker", str(write_fd)],
                stdin=subprocess.PIPE, stdout=stdout, pass_fds=(write_fd,), env=env,
            )
        finally:
            os.close(write_fd)
        assert proc.stdin is not None
        proc.stdin.write(encode_job((self._task, job.request, str(in_dir), str(out_dir))))
        proc.stdin.flush()
        return proc, Connection(read_fd, writable=False)

    def _run_process(self, job: ExecJob, in_dir: Path, out_dir: Path, cancel: threading.Event) -> Outcome:
        assert self._listener is not None
        proc, conn = self._spawn(job, in_dir, out_dir)
        outcome: Outcome | None = None
        peak = 0
        stop_sent: float | None = None
        try:
            while True:
                if conn.poll(0.1):
                    try:
                        msg = conn.recv()
                    except EOFError:
                        break
                    kind = msg[0]
                    if kind == "progress":
                        self._listener.on_progress(job.job_id, Progress(msg[1], msg[2], msg[3]))
                    elif kind == "log":
                        self._listener.on_log(job.job_id, msg[1])
                    elif kind == "peak":
                        peak = int(msg[1])
                    elif kind == "done":
                        outcome = Outcome(SUCCEEDED, results=msg[1], report=msg[2])
                    elif kind == "error":
                        outcome = Outcome(FAILED, error=msg[2], error_type=msg[1], error_field=msg[3])
                elif proc.poll() is not None:
                    if conn.poll(0):  # its last message landed after the poll above timed out: read it first
                        continue
                    break
                if self._interrupt.is_set() or cancel.is_set():
                    if stop_sent is None:
                        cancel.set()
                        stop_sent = time.monotonic()
                        self._tell(proc, CANCEL)
                    elif time.monotonic() - stop_sent > self._cancel_grace and proc.poll() is None:
                        log_event(log, "job.terminate", job=job.job_id, reason="did not stop within grace")
                        proc.terminate()
                        try:
                            proc.wait(2)
                        except subprocess.TimeoutExpired:
                            proc.kill()
                        break
        finally:
            conn.close()
            self._tell(proc, b"")
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        interrupted = self._interrupt.is_set() and job.job_id not in self._cancelled
        if outcome is not None and outcome.state == SUCCEEDED:
            outcome.peak_rss_kb = peak
            return outcome
        if interrupted:
            return Outcome(INTERRUPTED, error="server shut down before the job finished")
        if cancel.is_set() or (outcome is not None and outcome.error_type == "CancelledError"):
            return Outcome(CANCELLED, error="cancelled", error_type="CancelledError", peak_rss_kb=peak)
        if outcome is None:
            return Outcome(
                FAILED,
                error=f"job process died without a result (exit code {proc.returncode}); out of memory?",
                error_type="WorkerDied",
            )
        outcome.peak_rss_kb = peak
        return outcome

    @staticmethod
    def _tell(proc: subprocess.Popen[bytes], message: bytes) -> None:
        """Send a control byte to the job (empty: close its stdin, which also means stop)."""
        if proc.stdin is None or proc.stdin.closed:
            return
        try:
            if message:
                proc.stdin.write(message)
                proc.stdin.flush()
            else:
                proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
