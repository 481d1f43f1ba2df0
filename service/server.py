"""Assembling and running the service: ``create_server`` (a factory tests call with port 0) and ``serve``
(what ``onnxprune serve`` runs: signals, graceful shutdown).

Shutdown on SIGTERM/SIGINT: health turns NOT_SERVING at once, new uploads and submissions get UNAVAILABLE,
running jobs get ``shutdown_grace`` seconds to finish; jobs still running then are interrupted and put back in
the queue (they run again, from the start, after a restart), and the gRPC server stops.

What runs where is chosen by :class:`ServerConfig`: the embedded default is local worker processes, SQLite and a
blob folder under ``--store``; ``executor="ray"``, ``store_url="postgresql://…"`` and ``blob_dir`` (a shared folder
or an fsspec URL) make one replica of a fleet. Health turns NOT_SERVING while the job database or the Ray cluster
does not answer, and back to SERVING when it does.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import uuid
from concurrent import futures
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from onnxprune._proto import compressor_pb2 as pb
from onnxprune._proto import compressor_pb2_grpc as pb_grpc
from onnxprune.errors import BadInputError
from onnxprune.service.auth import Authenticator, AuthInterceptor, load_tokens
from onnxprune.service.blobs import CHUNK_SIZE, open_blob_store
from onnxprune.service.executor import Executor, LocalProcessExecutor
from onnxprune.service.jobs import JobManager, Limits, SharingOptions
from onnxprune.service.logs import log_event
from onnxprune.service.servicer import CompressorServicer
from onnxprune.service.store import SqliteJobStore
from onnxprune.service.tasks import TaskFn, run_task

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Compressor"].full_name
GB = 1 << 30


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``onnxprune serve`` can set. Sizes in bytes, times in seconds."""

    workers: int = 2
    queue_size: int = 256
    tokens: dict[str, str] | None = None  # token → tenant; None: no auth
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    retention_s: float = 168 * 3600.0
    quota_bytes: int = 50 * GB
    max_upload_bytes: int = 8 * GB
    max_tensor_bytes: int | None = None  # default: max_upload_bytes
    rpc_threads: int = 64
    cancel_grace_s: float = 10.0
    shutdown_grace_s: float = 30.0
    sweep_interval_s: float = 60.0
    metric_modules: tuple[str, ...] = ()
    """Modules jobs may name in ``--metric python:MODULE:FUNC``; none by default (it runs client-chosen code)."""
    executor: str = "local"
    """``local`` (worker processes of this server) or ``ray`` (each job a Ray task on the cluster)."""
    ray_address: str | None = None  # HOST:PORT of the Ray head (GCS); None: start a local Ray instance
    ray_cpus_per_job: float = 1.0
    ray_max_retries: int = 0
    """Times Ray re-runs a job whose worker node died (0: the job fails with the reason)."""
    ray_jobs_per_worker: int = 1
    """Jobs a Ray worker process runs before it exits: 1 gives every job a fresh process (its memory goes back to
    the OS); more saves the ~1 s start of a worker (Python, Ray, onnxruntime imports) per job."""
    store_url: str | None = None  # sqlite:///PATH or postgresql://…; None: sqlite in the store folder
    blob_dir: str | None = None  # folder or fsspec URL; None: ``blobs`` in the store folder
    heartbeat_s: float = 2.0
    replica_timeout_s: float = 20.0
    max_attempts: int = 2
    health_interval_s: float = 1.0


class CompressionServer:
    """A bound, not yet started service; ``start`` it, then ``stop`` it (gracefully) or ``wait`` for it."""

    def __init__(self, grpc_server: grpc.Server, manager: JobManager, health_servicer: health.HealthServicer,
                 store: Any, config: ServerConfig, executor: Executor | None = None) -> None:
        self.grpc_server = grpc_server
        self.manager = manager
        self.health = health_servicer
        self._store = store
        self._executor = executor
        self._config = config
        self._stopped = threading.Event()
        self._janitor = threading.Thread(target=self._sweep_loop, name="onnxprune-janitor", daemon=True)
        self._monitor = threading.Thread(target=self._health_loop, name="onnxprune-health", daemon=True)
        self.unhealthy_reason: str | None = None

    def start(self) -> None:
        self.manager.start()
        self.manager.sweep()
        self.grpc_server.start()
        self._set_health(self._problem())
        self._janitor.start()
        self._monitor.start()

    def _problem(self) -> str | None:
        """Why this replica cannot do its work now (database or Ray cluster not answering), or None."""
        for part in (self._store, self._executor):
            ping = getattr(part, "ping", None)
            reason = ping() if ping is not None else None
            if reason:
                return reason
        return None

    def _set_health(self, reason: str | None) -> None:
        if reason != self.unhealthy_reason:
            log_event(log, "server.health", logging.WARNING if reason else logging.INFO,
                      serving=reason is None, reason=reason)
        self.unhealthy_reason = reason
        status = health_pb2.HealthCheckResponse.NOT_SERVING if reason else health_pb2.HealthCheckResponse.SERVING
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def _health_loop(self) -> None:
        while not self._stopped.wait(self._config.health_interval_s):
            try:
                self._set_health(self._problem())
            except Exception as e:  # noqa: BLE001 - the monitor must keep running
                self._set_health(f"health check failed: {e!r}")

    def _sweep_loop(self) -> None:
        while not self._stopped.wait(self._config.sweep_interval_s):
            try:
                self.manager.sweep()
            except Exception as e:  # noqa: BLE001 - retention must not stop on one bad sweep
                log_event(log, "store.sweep_error", logging.ERROR, error=repr(e))

    def stop(self, grace: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, refuse new work, let jobs finish for ``grace`` s, then stop serving."""
        if self._stopped.is_set():
            return
        grace = self._config.shutdown_grace_s if grace is None else grace
        log_event(log, "server.stopping", grace_s=grace)
        self.health.enter_graceful_shutdown()
        self.manager.stop_accepting()
        self.manager.shutdown(grace)
        self._stopped.set()
        self.grpc_server.stop(grace=min(grace, 5.0)).wait()
        self._store.close()
        log_event(log, "server.stopped")

    def wait(self) -> None:
        self.grpc_server.wait_for_termination()


def _credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert is None and config.tls_key is None:
        if config.tls_client_ca is not None:
            raise BadInputError("--tls-client-ca needs --tls-cert and --tls-key", field="tls_client_ca")
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise BadInputError("TLS needs both --tls-cert and --tls-key", field="tls_cert")
    try:
        key, cert = Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes()
        client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    except OSError as e:
        raise BadInputError(f"cannot read TLS files: {e}", field="tls_cert") from e
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def create_server(
    address: str, store: str | Path, config: ServerConfig | None = None, *, task: TaskFn = run_task
) -> tuple[CompressionServer, int]:
    """Build the service on ``store`` (a directory) and bind ``address`` (``host:0`` picks a free port).

    Args:
        address: ``HOST:PORT``; bind 127.0.0.1 unless the service must be reachable from elsewhere.
        store: directory for ``jobs.sqlite``, blobs and scratch space; created if missing.
        config: limits, workers, auth and TLS.
        task: the job function (tests pass small stand-ins; production runs the pipeline).

    Returns:
        The server (call ``start()``) and the bound port.

    Raises:
        BadInputError: unusable TLS settings or an address that cannot be bound.
    """
    config = config or ServerConfig()
    root = Path(store)
    root.mkdir(parents=True, exist_ok=True)
    replica_id = uuid.uuid4().hex[:16]
    job_store = open_job_store(config.store_url, root, replica_id)
    shared = getattr(job_store, "shared", False)
    try:
        blobs = open_blob_store(config.blob_dir or root / "blobs", cache_dir=root / "cache",
                                quota_bytes=config.quota_bytes, max_upload_bytes=config.max_upload_bytes,
                                shared=shared, usage_source=job_store.usage if shared else None)
        executor = _executor(config, task, blobs, root / "work")  # --store is this replica's own folder
    except BaseException:
        job_store.close()
        raise
    limits = Limits(max_tensor_bytes=config.max_tensor_bytes or config.max_upload_bytes,
                    retention_s=config.retention_s, quota_bytes=config.quota_bytes,
                    metric_modules=frozenset(config.metric_modules))
    sharing = SharingOptions(heartbeat_s=config.heartbeat_s, replica_timeout_s=config.replica_timeout_s,
                             max_attempts=config.max_attempts, address=address)
    manager = JobManager(job_store, blobs, executor, limits, sharing)
    auth = Authenticator(config.tokens)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.rpc_threads, thread_name_prefix="onnxprune-rpc"),
        interceptors=[AuthInterceptor(auth)],
        options=[
            # Without this a second server on the same port would silently share it (and the job store).
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", CHUNK_SIZE + (64 << 10)),
            ("grpc.max_send_message_length", 64 << 20),
        ],
    )
    pb_grpc.add_CompressorServicer_to_server(CompressorServicer(manager, auth, config.retention_s), server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    credentials = _credentials(config)
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as e:
        job_store.close()
        raise BadInputError(f"cannot listen on {address}: {e}", field="port") from e
    if port == 0:
        job_store.close()
        raise BadInputError(f"cannot listen on {address}", field="port")
    manager.set_address(f"{address.rsplit(':', 1)[0]}:{port}")
    log_event(log, "server.created", address=address, port=port, store=str(root), workers=config.workers,
              auth=auth.enabled, tls=credentials is not None, mtls=config.tls_client_ca is not None,
              executor=config.executor, job_store=type(job_store).__name__, blobs=type(blobs).__name__,
              replica=replica_id if shared else None)
    return CompressionServer(server, manager, health_servicer, job_store, config, executor), port


def open_job_store(url: str | None, root: Path, replica_id: str) -> Any:
    """``--store-url``: ``sqlite:///PATH`` (default: ``jobs.sqlite`` in the store folder) or ``postgresql://…``.

    Raises:
        BadInputError: another scheme, or PostgreSQL without the ``postgres`` extra.
        UnavailableError: the database does not answer.
    """
    if not url:
        return SqliteJobStore(root / "jobs.sqlite")
    if url.startswith("sqlite:///"):
        return SqliteJobStore(Path(url.removeprefix("sqlite:///")))
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from onnxprune.service.pgstore import PostgresJobStore
        except ImportError as e:
            raise BadInputError(f"--store-url postgresql://… needs psycopg: pip install 'onnxprune[postgres]' ({e})",
                                field="store_url") from e
        return PostgresJobStore(url, replica_id=replica_id)
    raise BadInputError(f"--store-url must be sqlite:///PATH or postgresql://…, got {url[:100]!r}",
                        field="store_url")


def _executor(config: ServerConfig, task: TaskFn, blobs: Any, work_root: Path) -> Executor:
    if config.executor == "local":
        return LocalProcessExecutor(task, blobs, work_root, workers=config.workers,
                                    queue_size=config.queue_size, cancel_grace=config.cancel_grace_s)
    if config.executor == "ray":
        try:
            from onnxprune.service.rayexec import RayExecutor
        except ImportError as e:
            raise BadInputError(f"--executor ray needs Ray: pip install 'onnxprune[ray]' ({e})",
                                field="executor") from e
        return RayExecutor(task, blobs, address=config.ray_address, max_in_flight=config.workers,
                           cpus_per_job=config.ray_cpus_per_job, max_retries=config.ray_max_retries,
                           cancel_grace=config.cancel_grace_s, jobs_per_worker=config.ray_jobs_per_worker)
    raise BadInputError(f"--executor must be local or ray, got {config.executor!r}", field="executor")


def serve(host: str, port: int, store: str | Path, config: ServerConfig, *, task: TaskFn = run_task) -> int:
    """Run until SIGTERM or SIGINT, then shut down gracefully. Prints ``listening on HOST:PORT`` once bound."""
    server, bound = create_server(f"{host}:{port}", store, config, task=task)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    server.start()
    print(f"listening on {host}:{bound}", flush=True)
    log_event(log, "server.listening", host=host, port=bound)
    while not stop.wait(1.0):
        pass
    server.stop()
    return 0


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Translate ``onnxprune serve`` arguments (see ``onnxprune.cli``) into a config.

    Raises:
        BadInputError: non-positive sizes or a bad token file.
    """
    for name in ("workers", "quota_gb", "max_upload_gb", "retention_hours", "queue_size", "shutdown_grace",
                 "ray_cpus_per_job", "ray_jobs_per_worker", "heartbeat", "replica_timeout", "max_attempts"):
        value = getattr(args, name)
        if value <= 0:
            raise BadInputError(f"--{name.replace('_', '-')} must be > 0, got {value}", field=name)
    if args.ray_max_retries < 0:
        raise BadInputError(f"--ray-max-retries must be >= 0, got {args.ray_max_retries}", field="ray_max_retries")
    optional_path = lambda value: Path(value) if value else None  # noqa: E731
    return ServerConfig(
        workers=args.workers,
        tokens=load_tokens(Path(args.token_file)) if args.token_file else None,
        tls_cert=optional_path(args.tls_cert),
        tls_key=optional_path(args.tls_key),
        tls_client_ca=optional_path(args.tls_client_ca),
        retention_s=args.retention_hours * 3600.0,
        quota_bytes=int(args.quota_gb * GB),
        max_upload_bytes=int(args.max_upload_gb * GB),
        max_tensor_bytes=int(args.max_tensor_gb * GB) if args.max_tensor_gb else None,
        queue_size=args.queue_size,
        shutdown_grace_s=args.shutdown_grace,
        metric_modules=tuple(_metric_modules(args.allow_metric_module)),
        executor=args.executor,
        ray_address=args.ray_address,
        ray_cpus_per_job=args.ray_cpus_per_job,
        ray_max_retries=args.ray_max_retries,
        ray_jobs_per_worker=args.ray_jobs_per_worker,
        store_url=args.store_url,
        blob_dir=args.blob_dir,
        heartbeat_s=args.heartbeat,
        replica_timeout_s=args.replica_timeout,
        max_attempts=args.max_attempts,
    )


def _metric_modules(names: list[str]) -> list[str]:
    """``--allow-metric-module`` values: dotted module names, checked so a typo does not silently allow nothing.

    Raises:
        BadInputError: a value that is not a module name.
    """
    from onnxprune.spec import is_module_name

    for name in names:
        if not is_module_name(name):
            raise BadInputError(f"--allow-metric-module expects a module name such as mymetrics or pkg.metrics, "
                                f"got {name!r}", field="allow_metric_module")
    return list(names)


if __name__ == "__main__":  # pragma: no cover - `onnxprune serve` is the entry point
    sys.exit("run `onnxprune serve`")
