"""The service as a separate process: ``onnxprune serve --port 0`` reports its port, survives SIGKILL with its
store intact (finished jobs download, running ones are marked failed with a reason, queued ones run), and stops
gracefully on SIGTERM."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from onnxprune.client import Client
from onnxprune.spec import PruneSpec
from tests.test_service import tiny_model

REPO = Path(__file__).resolve().parents[1]
# `onnxprune serve` with a stand-in job function (jobs that take as long as the test needs).
SERVE_WITH_SLOW_TASK = f"""
import sys
sys.path[:0] = [{str(REPO)!r}]
from onnxprune.cli import build_parser
from onnxprune.commands import serve
from tests.service_tasks import slow_task
sys.exit(serve.run(build_parser().parse_args(sys.argv[1:]), task=slow_task))
"""


class ServerProcess:
    """A server subprocess; ``target`` is parsed from its ``listening on HOST:PORT`` line."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._log, cwd=REPO)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("listening on "):
            self.proc.kill()
            raise AssertionError(f"server did not start: {line!r}; log: {log.read_text()[-2000:]}")
        self.target = line.split()[-1]

    def children(self) -> list[int]:
        pids: list[int] = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            pids += [int(p) for p in (task / "children").read_text().split()]
        return pids

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.stop()


def start(servers: list[ServerProcess], store: Path, *extra: str, script: str = SERVE_WITH_SLOW_TASK) -> ServerProcess:
    argv = [sys.executable, "-c", script] if script else [sys.executable, "-m", "onnxprune.cli"]
    server = ServerProcess([*argv, "serve", "--port", "0", "--store", str(store), *extra], store.parent / "server.log")
    servers.append(server)
    return server


def wait_state(client: Client, job_id: str, state: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (current := client.get(job_id).state) != state:
        assert time.monotonic() < deadline, f"job {job_id} stayed {current}, expected {state}"
        time.sleep(0.05)


def test_restart_after_sigkill(servers: list[ServerProcess], tmp_path: Path) -> None:
    store = tmp_path / "store"
    model = tiny_model(tmp_path / "m.onnx")
    server = start(servers, store, "--workers", "1")
    with Client(server.target) as client:
        finished = client.submit(model, PruneSpec(calib_samples=1))
        client.wait(finished.job_id)
        client.fetch(finished.job_id, tmp_path / "before.onnx")
        running = client.submit(model, PruneSpec(calib_samples=600))  # 60 s
        wait_state(client, running.job_id, "RUNNING")
        queued = client.submit(model, PruneSpec(calib_samples=1))
        assert client.get(queued.job_id).state == "QUEUED"
    workers = server.children()
    assert workers, "the running job should have a worker process"
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    # the orphaned job process sees its stdin close and stops at its next step
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()
              for pid in workers):
        assert time.monotonic() < deadline, "job process outlived the killed server"
        time.sleep(0.1)

    server = start(servers, store, "--workers", "1")
    with Client(server.target) as client:
        job = client.get(finished.job_id)
        assert job.state == "SUCCEEDED"
        client.fetch(finished.job_id, tmp_path / "after.onnx")  # sha256 verified by the client
        assert (tmp_path / "after.onnx").read_bytes() == (tmp_path / "before.onnx").read_bytes()
        assert hashlib.sha256((tmp_path / "after.onnx").read_bytes()).hexdigest() == \
            next(r.sha256 for r in job.results if r.name == job.output_name)
        lost = client.get(running.job_id)
        assert lost.state == "FAILED" and "server stopped while the job was running" in lost.error
        assert lost.error_type == "ServerRestart"
        assert client.wait(queued.job_id).state == "SUCCEEDED"
        assert sorted(j.job_id for j in client.list()) == sorted([finished.job_id, running.job_id, queued.job_id])


def test_sigterm_lets_the_running_job_finish_and_keeps_the_queue(servers: list[ServerProcess], tmp_path: Path) -> None:
    store = tmp_path / "store"
    model = tiny_model(tmp_path / "m.onnx")
    server = start(servers, store, "--workers", "1")
    with Client(server.target) as client:
        running = client.submit(model, PruneSpec(calib_samples=15))
        wait_state(client, running.job_id, "RUNNING")
        queued = client.submit(model, PruneSpec(calib_samples=1))
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 0
    server = start(servers, store, "--workers", "1")
    with Client(server.target) as client:
        assert client.get(running.job_id).state == "SUCCEEDED"
        assert client.wait(queued.job_id).state == "SUCCEEDED"
    log = (tmp_path / "server.log").read_text()
    assert "event=server.stopping" in log and "event=job.requeued" in log


def test_onnxprune_serve_reports_its_port_and_stops_on_sigterm(servers: list[ServerProcess], tmp_path: Path) -> None:
    server = start(servers, tmp_path / "store", script="")
    channel = grpc.insecure_channel(server.target)
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 0
    assert (tmp_path / "store" / "jobs.sqlite").exists()
    assert os.listdir(tmp_path / "store" / "work") == []
