"""``serve --executor ray`` on a real two-node Ray cluster (``ray_cluster``: a head and a worker node on 127.0.0.1,
one CPU each): jobs spread over both nodes with live progress and log lines, results byte-identical to the
embedded run, cancellation ends the task's process, and a worker node that dies fails its job with the reason or
has it re-run, as configured. The server runs in this process; every wait is bounded."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from grpc_health.v1 import health_pb2

from onnxprune.client import Client
from onnxprune.spec import PruneSpec
from onnxprune.service.server import CompressionServer, ServerConfig, create_server
from tests.service_tasks import slow_task
from tests.test_service import DIGITS, tiny_model
from tests.test_service_scale_replicas import _owner, health, replicas, slow  # noqa: F401 - replicas is a fixture

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]
ray = pytest.importorskip("ray")


@pytest.fixture
def ray_server(ray_cluster, tmp_path: Path) -> Iterator:
    started: list[CompressionServer] = []

    def start(task=slow_task, **config) -> tuple[CompressionServer, Client]:
        config = {"workers": 4, **config}
        server, port = create_server("127.0.0.1:0", tmp_path / f"store{len(started)}",
                                     ServerConfig(executor="ray", ray_address=ray_cluster.address, **config),
                                     task=task)
        server.start()
        server.target = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
        started.append(server)
        return server, Client(server.target, timeout=30)

    yield start
    for server in started:
        server.stop(grace=2)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.1)
    return value


def worker_node_id() -> str:
    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "worker_node" in n["Resources"])


def test_ray_jobs_match_the_embedded_run_and_stream_progress_and_logs(ray_server, tmp_path: Path) -> None:
    from onnxprune import pipeline
    from onnxprune.service.tasks import run_task

    server, client = ray_server(task=run_task)
    spec = PruneSpec(ratio=0.3, criterion="l1")
    embedded = pipeline.prune(DIGITS, tmp_path / "embedded.onnx", spec)
    progress: list[str] = []
    logs: list[str] = []
    remote = client.prune(DIGITS, tmp_path / "remote.onnx", spec, progress=lambda p: progress.append(p.stage),
                          on_log=logs.append)
    assert (tmp_path / "remote.onnx").read_bytes() == (tmp_path / "embedded.onnx").read_bytes()
    assert remote.report["pruned"] == embedded.report["pruned"]
    assert {"load", "cut", "verify"} <= set(progress), progress
    assert any("onnxprune.pipeline" in line for line in logs), logs
    assert len(server.manager._executor.placements) == 1


def test_jobs_spread_over_both_nodes_and_cancel_ends_the_process(ray_server, tmp_path: Path) -> None:
    server, client = ray_server()
    executor = server.manager._executor
    long = [client.submit(tiny_model(tmp_path / f"m{i}.onnx", seed=i), PruneSpec(calib_samples=400))
            for i in range(2)]
    placed = wait_for(lambda: len(executor.placements) == 2 and executor.placements, 60, "both jobs to start")
    assert {placed[j.job_id][0] for j in long} == {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    live = next(e for e in client.watch(long[0].job_id) if e.job.stage == "work")  # the job sends it at once
    assert live.job.state == "RUNNING" and live.job.message.startswith("step ")
    started = time.monotonic()
    for job in long:
        client.cancel(job.job_id)
    for job in long:
        wait_for(lambda j=job: client.get(j.job_id).state == "CANCELLED", 30, "CANCELLED")
    assert time.monotonic() - started < 30  # each would have worked 40 s
    pids = [placed[j.job_id][1] for j in long]
    wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in pids), 20, "the task processes to end")
    # Both CPUs are free again: a new job runs to the end.
    quick = client.submit(tiny_model(tmp_path / "q.onnx", seed=9), PruneSpec(calib_samples=2))
    assert client.wait(quick.job_id).state == "SUCCEEDED"


def test_cuda_jobs_go_to_the_gpu_node(ray_server, tmp_path: Path) -> None:
    """Only the worker node declares a GPU: ``device=cuda`` jobs ask Ray for one and all land there (one at a
    time), while the head has a free CPU all along."""
    server, client = ray_server()
    executor = server.manager._executor
    jobs = [client.submit(tiny_model(tmp_path / f"g{i}.onnx", seed=i), PruneSpec(device="cuda", calib_samples=5))
            for i in range(3)]
    for job in jobs:
        assert client.wait(job.job_id).state == "SUCCEEDED"
    gpu_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")}
    assert {executor.placements[j.job_id][0] for j in jobs} <= gpu_nodes and len(gpu_nodes) == 1


def _job_on_the_worker_node(client: Client, executor, tmp_path: Path, tag: str):
    """Start two 6-second jobs (one per node) and return (the worker node's job, the head node's job)."""
    jobs = [client.submit(tiny_model(tmp_path / f"{tag}{i}.onnx", seed=i), PruneSpec(calib_samples=60))
            for i in range(2)]
    placed = wait_for(lambda: all(j.job_id in executor.placements for j in jobs) and executor.placements, 60,
                      "both jobs to start")
    worker = worker_node_id()
    on_worker = [j for j in jobs if placed[j.job_id][0] == worker]
    assert len(on_worker) == 1, f"expected one job per node: {placed}"
    return on_worker[0], next(j for j in jobs if j is not on_worker[0])


def test_a_dead_worker_node_fails_its_job_or_retries_it(ray_server, ray_cluster, tmp_path: Path) -> None:
    server, client = ray_server(ray_max_retries=0)
    lost, survivor = _job_on_the_worker_node(client, server.manager._executor, tmp_path, "a")
    ray_cluster.kill_worker_node()
    failed = wait_for(lambda: (j := client.get(lost.job_id)).done and j, 60, "the lost job to end")
    assert failed.state == "FAILED" and failed.error_type == "WorkerDied"
    assert "Ray worker running the job died" in failed.error, failed.error
    assert client.wait(survivor.job_id).state == "SUCCEEDED"
    server.stop(grace=2)

    ray_cluster.start_worker_node()
    server, client = ray_server(ray_max_retries=1)
    executor = server.manager._executor
    retried, other = _job_on_the_worker_node(client, executor, tmp_path, "b")
    first_node = executor.placements[retried.job_id][0]
    ray_cluster.kill_worker_node()
    assert client.wait(retried.job_id).state == "SUCCEEDED"  # re-run on the head node once it was free
    assert executor.placements[retried.job_id][0] != first_node
    assert client.wait(other.job_id).state == "SUCCEEDED"
    ray_cluster.start_worker_node()  # leave the session's cluster as it was


def test_two_ray_replicas_on_one_database_survive_the_loss_of_one(
        ray_cluster, replicas, tmp_path: Path) -> None:  # noqa: F811 - replicas is the imported fixture
    """A replica's Ray tasks end with it (Ray fate-shares tasks with their driver); the other replica takes its
    jobs back and runs them on the cluster again."""
    ray_args = ("--executor", "ray", "--ray-address", ray_cluster.address)
    a, b = replicas("a", *ray_args), replicas("b", *ray_args)
    model = tiny_model(tmp_path / "m.onnx")
    with Client(b.target, timeout=30) as on_b:
        jobs = [on_b.submit(model, slow(50)) for _ in range(3)]
        lost = wait_for(lambda: [j for j in jobs if _owner(replicas.url, j.job_id) == a.target], 60,
                        "a job running on replica A")
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(10)
        for job in jobs:
            assert on_b.wait(job.job_id).state == "SUCCEEDED"
        for job in lost:
            on_b.fetch(job.job_id, tmp_path / f"{job.job_id}.onnx")
            assert (tmp_path / f"{job.job_id}.onnx").read_bytes() == model.read_bytes()
    requeued = (tmp_path / "replica-b.log").read_text()
    assert all(f"event=job.requeued job={j.job_id}" in requeued for j in lost)


def test_health_is_not_serving_while_the_ray_cluster_does_not_answer(ray_server, ray_cluster, tmp_path: Path) -> None:
    server, client = ray_server()
    target = server.target
    assert health(target) == health_pb2.HealthCheckResponse.SERVING
    model = tiny_model(tmp_path / "m.onnx")
    ray_cluster.signal_gcs(signal.SIGSTOP)  # the head's control plane hangs, as behind a network partition
    try:
        wait_for(lambda: health(target) == health_pb2.HealthCheckResponse.NOT_SERVING, 20, "NOT_SERVING")
        assert re.search(r"Ray cluster at \S+ (did not answer|unreachable)", server.unhealthy_reason or "")
        started = time.monotonic()  # no RPC handler waits for Ray: they answer while it hangs
        job = client.submit(model, PruneSpec(calib_samples=2))
        assert client.get(job.job_id).state in ("QUEUED", "RUNNING") and client.list()
        assert time.monotonic() - started < 5
    finally:
        ray_cluster.signal_gcs(signal.SIGCONT)
    wait_for(lambda: health(target) == health_pb2.HealthCheckResponse.SERVING, 30, "SERVING again")
    assert client.wait(job.job_id).state == "SUCCEEDED"  # submitted during the hang, run once it was back
