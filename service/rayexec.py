"""Running jobs on a Ray cluster (``serve --executor ray``, the ``ray`` extra).

Each job is one Ray task, placed by Ray on a node with the resources the spec asks for: ``device=cuda`` asks for
one GPU, every job for ``cpus_per_job`` CPUs. Nothing assumes a shared filesystem:

- the server puts the input files into Ray's object store (``ray.put``) and the task writes them into its own
  scratch folder on whichever node runs it;
- the task returns the result files' bytes, which come back through the object store and go into the blob store;
- progress and log lines go from the task to a small per-server actor (no CPU) as they happen; the server's
  event thread drains it several times a second and feeds the job manager, so ``WatchJob`` streams live.

``CancelJob`` ends the task's process (``ray.cancel(force=True)``). A task whose worker or node dies fails with
the reason, or is re-run by Ray ``max_retries`` times. Every Ray call happens on the executor's own thread (or the
health probe's), never in a gRPC handler: ``submit``, ``cancel``, ``status`` and ``capacity`` only touch local state.
"""

from __future__ import annotations

import logging
import os
import queue
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import exceptions as ray_errors
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from onnxprune.errors import OnnxpruneError
from onnxprune.progress import Progress
from onnxprune.service.blobs import BlobStore
from onnxprune.service.errors import ResourceExhaustedError, UnavailableError
from onnxprune.service.executor import INTERRUPTED, ExecJob, JobSlots, Listener, Outcome
from onnxprune.service.logs import log_event
from onnxprune.service.store import CANCELLED, FAILED, SUCCEEDED, ResultFile
from onnxprune.service.tasks import TaskFn, TaskRequest

log = logging.getLogger(__name__)

_POLL_S = 0.2
_HEAD_RESOURCE = "node:__internal_head__"
_PING_TIMEOUT_S = 3.0
_PROGRESS_MIN_INTERVAL_S = 0.1  # progress events per job sent at most this often (stage changes always)
_WORKER_LOST = (ray_errors.WorkerCrashedError, ray_errors.NodeDiedError, ray_errors.LocalRayletDiedError,
                ray_errors.ObjectLostError, ray_errors.OwnerDiedError)


@ray.remote(num_cpus=0, max_restarts=0)
class EventSink:
    """Collects (job id, event) pairs from running tasks until the server drains them."""

    def __init__(self) -> None:
        self._events: list[tuple[str, tuple[Any, ...]]] = []

    def push(self, job_id: str, event: tuple[Any, ...]) -> None:
        self._events.append((job_id, event))

    def drain(self) -> list[tuple[str, tuple[Any, ...]]]:
        out, self._events = self._events, []
        return out

    def ping(self) -> bool:
        return True


class _SinkLogHandler(logging.Handler):
    def __init__(self, send: Callable[[tuple[Any, ...]], None]) -> None:
        super().__init__(logging.INFO)
        self._send = send
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("ray"):
            return
        try:
            self._send(("log", self.format(record)))
        except Exception:  # noqa: BLE001 - a lost event must not break the job
            self.handleError(record)


def run_on_worker(task: TaskFn, request: TaskRequest, job_id: str, sink: Any, names: list[str],
                  *contents: bytes) -> dict[str, Any]:
    """The body of one job's Ray task: inputs in, ``{"state": "done"|"error", …}`` out (never raises for a job
    failure, so Ray does not retry a job that failed on its own; only lost workers are retried)."""
    send = lambda event: sink.push.remote(job_id, event)  # noqa: E731 - fire and forget
    send(("node", ray.get_runtime_context().get_node_id(), os.getpid()))
    work = Path(tempfile.mkdtemp(prefix=f"onnxprune-{job_id[:12]}-"))
    in_dir, out_dir = work / "in", work / "out"
    out_dir.mkdir(parents=True)
    handler = _SinkLogHandler(send)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    last = {"t": 0.0, "stage": None}

    def progress(p: Progress) -> None:
        now = time.monotonic()
        if p.stage != last["stage"] or now - last["t"] >= _PROGRESS_MIN_INTERVAL_S:
            last.update(t=now, stage=p.stage)
            send(("progress", p.stage, p.fraction, p.message))

    try:
        for name, data in zip(names, contents, strict=True):
            dest = in_dir / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
        try:
            result = task(request, in_dir, out_dir, progress, threading.Event())
            files = [(name, (out_dir / name).read_bytes()) for name in result.files]
            return {"state": "done", "files": files, "report": result.report, "node": _node(),
                    "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
        except OnnxpruneError as e:
            return {"state": "error", "type": type(e).__name__, "message": str(e), "field": getattr(e, "field", None)}
        except Exception as e:  # noqa: BLE001 - report any bug to the server as the job's failure
            log.exception("job %s failed", job_id)
            return {"state": "error", "type": type(e).__name__,
                    "message": f"internal error in job: {type(e).__name__}: {e}", "field": None}
    finally:
        root.removeHandler(handler)
        shutil.rmtree(work, ignore_errors=True)


def _node() -> str:
    return ray.get_runtime_context().get_node_id()



@dataclass
class _Running:
    job: ExecJob
    ref: Any
    input_refs: list[Any]
    cancel_sent: bool = False
    cancel_at: float | None = None
    node: str = ""
    started: float = field(default_factory=time.monotonic)


class RayExecutor(JobSlots):
    """Jobs as Ray tasks; at most ``max_in_flight`` of this server's jobs on the cluster at once.

    Args:
        task: the job function (module-level; Ray imports it on the worker by name).
        blobs: where inputs come from and results go.
        address: the Ray head's ``HOST:PORT``; None starts a private single-node Ray.
        cpus_per_job: CPUs each job asks for; ``device=cuda`` jobs also ask for one GPU.
        max_retries: times Ray re-runs a job whose worker process or node died.
        queue_size: jobs waiting for a slot beyond ``max_in_flight``.
    """

    def __init__(self, task: TaskFn, blobs: BlobStore, *, address: str | None, max_in_flight: int = 2,
                 cpus_per_job: float = 1.0, max_retries: int = 0, cancel_grace: float = 10.0,
                 queue_size: int = 256, jobs_per_worker: int = 1) -> None:
        self._task = task
        self._blobs = blobs
        self._address = address
        self._slots = max_in_flight
        self._cpus = cpus_per_job
        # max_calls fixes how many jobs a worker process runs before it exits (1: a fresh process per job, whose
        # memory goes back to the OS); Ray takes it only where the remote function is made, not in .options()
        self._remote_job = ray.remote(max_calls=jobs_per_worker)(run_on_worker)
        self._max_retries = max_retries
        self._cancel_grace = cancel_grace
        self._pending: queue.Queue[ExecJob] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._queued: set[str] = set()
        self._cancel: set[str] = set()
        self._running: dict[str, _Running] = {}
        self._stopping = threading.Event()
        self._interrupt = threading.Event()
        self._listener: Listener | None = None
        self._sink: Any = None
        self._thread: threading.Thread | None = None
        self._ping_lock = threading.Lock()
        self._ping_thread: threading.Thread | None = None
        self._ping_result: str | None = None
        self.placements: dict[str, tuple[str, int]] = {}  # job id → (node id, pid) of its latest run

    # -- the Executor interface ----------------------------------------------------------------------------

    def start(self, listener: Listener) -> None:
        """Connect to the cluster and start the event thread.

        Raises:
            UnavailableError: the Ray cluster cannot be reached.
        """
        self._listener = listener
        if not ray.is_initialized():
            try:
                ray.init(address=self._address, namespace="onnxprune", logging_level=logging.WARNING,
                         log_to_driver=False, include_dashboard=False if self._address is None else None,
                         runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}})
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise UnavailableError(f"cannot connect to the Ray cluster at {self._address}: {e}") from e
        self._sink = self._new_sink()
        self._thread = threading.Thread(target=self._loop, name="onnxprune-ray", daemon=True)
        self._thread.start()
        log_event(log, "ray.connected", address=self._address or "local",
                  nodes=sum(1 for n in ray.nodes() if n["Alive"]))

    @staticmethod
    def _new_sink() -> Any:
        """The event actor, on the head node (which the cluster cannot lose anyway), so it survives the death of
        any worker node; without a head resource (a very old Ray), on the node this server is attached to."""
        if any(n["Alive"] and _HEAD_RESOURCE in n["Resources"] for n in ray.nodes()):
            return EventSink.options(resources={_HEAD_RESOURCE: 0.001}).remote()
        here = ray.get_runtime_context().get_node_id()
        return EventSink.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=True)).remote()

    def submit(self, job: ExecJob) -> None:
        """Queue a job for the event thread (no Ray call here).

        Raises:
            ResourceExhaustedError: the queue is full.
            UnavailableError: shutting down.
        """
        if self._stopping.is_set():
            raise UnavailableError("server is shutting down; submit again later")
        with self._lock:
            self._queued.add(job.job_id)
        try:
            self._pending.put_nowait(job)
        except queue.Full:
            with self._lock:
                self._queued.discard(job.job_id)
            raise ResourceExhaustedError(
                f"job queue is full ({self._pending.maxsize} waiting); retry later") from None

    def cancel(self, job_id: str) -> bool:
        with self._lock:
            if job_id in self._queued or job_id in self._running:
                self._cancel.add(job_id)
                return True
        return False

    def ping(self) -> str | None:
        """None while the cluster answers within a few seconds, else why not (never blocks longer)."""
        with self._ping_lock:
            if self._ping_thread is None or not self._ping_thread.is_alive():
                self._ping_thread = threading.Thread(target=self._probe, name="onnxprune-ray-ping", daemon=True)
                self._ping_thread.start()
            probe = self._ping_thread
        probe.join(_PING_TIMEOUT_S)
        if probe.is_alive():
            return f"Ray cluster at {self._address or 'local'} did not answer within {_PING_TIMEOUT_S:.0f} s"
        return self._ping_result

    def _probe(self) -> None:
        try:
            ray.get(self._sink.ping.remote(), timeout=_PING_TIMEOUT_S)  # the event path
            if not any(n["Alive"] for n in ray.nodes()):  # the cluster's control plane (GCS)
                raise ConnectionError("no live node")
            self._ping_result = None
        except Exception as e:  # noqa: BLE001 - any failure means "not answering"
            self._ping_result = f"Ray cluster at {self._address or 'local'} unreachable: {type(e).__name__}: {e}"[:500]

    def shutdown(self, grace: float) -> None:
        """Stop taking jobs; give running ones ``grace`` seconds, then end them (they are re-queued)."""
        self._stopping.set()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with self._lock:
                if not self._running:
                    break
            time.sleep(0.05)
        self._interrupt.set()
        if self._thread is not None:
            self._thread.join(timeout=self._cancel_grace + 30)
        if ray.is_initialized():
            try:
                ray.kill(self._sink)
            except Exception:  # noqa: BLE001 - the cluster may already be gone
                pass
            ray.shutdown()

    # -- the event thread ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            try:
                self._launch_waiting()
                self._drain_events()
                self._collect_finished()
                self._send_cancels()
            except Exception as e:  # noqa: BLE001 - one failed round must not stop every job's bookkeeping
                log_event(log, "ray.loop_error", logging.ERROR, error=repr(e)[:500])
                log.debug("ray loop error", exc_info=e)
                time.sleep(1.0)
            with self._lock:
                idle = not self._running
            if self._interrupt.is_set() and idle:
                return
            if self._stopping.is_set() and idle and self._pending.empty():
                return

    def _launch_waiting(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            with self._lock:
                if len(self._running) >= self._slots:
                    return
            try:
                job = self._pending.get_nowait()
            except queue.Empty:
                return
            with self._lock:
                self._queued.discard(job.job_id)
                if job.job_id in self._cancel:
                    self._cancel.discard(job.job_id)
                    continue
            if not self._listener.on_start(job.job_id):
                continue
            try:
                self._launch(job)
            except Exception as e:  # noqa: BLE001 - e.g. a missing blob: this job fails, the others go on
                log_event(log, "ray.launch_error", logging.ERROR, job=job.job_id, error=repr(e)[:500])
                self._listener.on_finish(job.job_id, Outcome(FAILED, error=f"job could not be started on Ray: {e}",
                                                             error_type=type(e).__name__))

    def _launch(self, job: ExecJob) -> None:
        names = sorted(job.inputs)
        refs = []
        for name in names:
            with open(self._blobs.local_path(job.inputs[name]), "rb") as f:
                refs.append(ray.put(f.read()))
        device = str(job.request.spec.get("device") or "")
        options: dict[str, Any] = {"num_cpus": self._cpus, "max_retries": self._max_retries,
                                   "retry_exceptions": False}
        if device.startswith("cuda"):
            options["num_gpus"] = 1
        ref = self._remote_job.options(**options).remote(self._task, job.request, job.job_id, self._sink, names, *refs)
        with self._lock:
            self._running[job.job_id] = _Running(job, ref, refs)
        log_event(log, "ray.submitted", job=job.job_id, cpus=self._cpus, gpus=options.get("num_gpus", 0),
                  inputs=len(names))

    def _drain_events(self) -> None:
        assert self._listener is not None
        try:
            events = ray.get(self._sink.drain.remote(), timeout=10)
        except ray_errors.RayActorError:
            log_event(log, "ray.sink_lost", logging.WARNING)
            self._sink = self._new_sink()  # running tasks keep the old handle: their events are lost, not them
            return
        for job_id, event in events:
            kind = event[0]
            if kind == "progress":
                self._listener.on_progress(job_id, Progress(event[1], event[2], event[3]))
            elif kind == "log":
                self._listener.on_log(job_id, event[1])
            elif kind == "node":
                self.placements[job_id] = (event[1], event[2])
                with self._lock:
                    if job_id in self._running:
                        self._running[job_id].node = event[1]
                log_event(log, "ray.job_placed", job=job_id, node=event[1][:16], pid=event[2])

    def _collect_finished(self) -> None:
        with self._lock:
            refs = {r.ref: r for r in self._running.values()}
        if not refs:
            time.sleep(_POLL_S)
            return
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=_POLL_S)
        for ref in done:
            running = refs[ref]
            self._drain_events()  # the job's last progress and log lines before its end
            outcome = self._outcome(running)
            with self._lock:
                self._running.pop(running.job.job_id, None)
                self._cancel.discard(running.job.job_id)
            assert self._listener is not None
            self._listener.on_finish(running.job.job_id, outcome)

    def _outcome(self, running: _Running) -> Outcome:
        job_id = running.job.job_id
        try:
            value = ray.get(running.ref, timeout=60)
        except (ray_errors.TaskCancelledError, *_WORKER_LOST) as e:
            if running.cancel_sent and self._interrupt.is_set() and job_id not in self._cancel:
                return Outcome(INTERRUPTED, error="server shut down before the job finished")
            if running.cancel_sent:
                return Outcome(CANCELLED, error="cancelled", error_type="CancelledError")
            where = f" on node {running.node[:16]}" if running.node else ""
            retried = f" after {self._max_retries} retries" if self._max_retries else ""
            return Outcome(FAILED, error_type="WorkerDied",
                           error=f"the Ray worker running the job died{where}{retried} (node lost or process "
                                 f"killed, e.g. out of memory): {type(e).__name__}: {str(e)[:500]}")
        except ray_errors.RayError as e:
            return Outcome(FAILED, error=f"Ray could not run the job: {type(e).__name__}: {str(e)[:800]}",
                           error_type=type(e).__name__)
        if value["state"] == "error":
            return Outcome(FAILED, error=value["message"], error_type=value["type"], error_field=value["field"])
        results = []
        with tempfile.TemporaryDirectory(prefix="onnxprune-ray-out-") as tmp:
            for name, data in value["files"]:
                path = Path(tmp) / name.replace("/", "_")
                path.write_bytes(data)
                info = self._blobs.put_file(path)
                results.append(ResultFile(name=name, size=info.size, sha256=info.blob_id))
        return Outcome(SUCCEEDED, results=results, report=value["report"], peak_rss_kb=int(value.get("peak", 0)))

    def _send_cancels(self) -> None:
        with self._lock:
            wanted = [r for r in self._running.values()
                      if (r.job.job_id in self._cancel or self._interrupt.is_set()) and not r.cancel_sent]
        for running in wanted:
            running.cancel_sent = True
            running.cancel_at = time.monotonic()
            ray.cancel(running.ref, force=True)
            log_event(log, "ray.cancelled", job=running.job.job_id)
