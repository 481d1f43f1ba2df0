"""Two API replicas (``onnxprune serve`` processes) sharing one PostgreSQL database and one blob folder.

- 20 clients spread over both: every job runs once and succeeds, results byte-identical to the embedded run;
- a job submitted on replica A is watched, cancelled and downloaded on replica B;
- SIGKILL one replica mid-job: the other keeps answering, takes the job back and finishes it;
- stop PostgreSQL: UNAVAILABLE with a clear message and NOT_SERVING health, then recovery when it returns.

Jobs use ``tests.scale_tasks.mixed_task``: the real pipeline, or a slow stand-in for ``seed >= 1000``.
"""

from __future__ import annotations

import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from onnxprune.client import Client, ServiceError
from onnxprune.spec import PruneSpec
from tests.scale_tasks import SLOW_SEED
from tests.test_service import DIGITS, tiny_model
from tests.test_service_restart import REPO, ServerProcess

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(420)]
psycopg = pytest.importorskip("psycopg")

SERVE = f"""
import sys
sys.path[:0] = [{str(REPO)!r}]
from onnxprune.cli import build_parser
from onnxprune.commands import serve
from tests.scale_tasks import mixed_task
sys.exit(serve.run(build_parser().parse_args(sys.argv[1:]), task=mixed_task))
"""
REPLICA_TIMEOUT_S = 3.0


def slow(steps: int) -> PruneSpec:
    """A job that runs ``steps`` × 0.1 s (see tests/scale_tasks.py)."""
    return PruneSpec(seed=SLOW_SEED + steps)


@pytest.fixture
def replicas(postgres, tmp_path: Path) -> Iterator[Callable[[str], ServerProcess]]:
    """``replicas("a", *serve_options)`` starts one more replica on this test's database and shared blob folder."""
    url = postgres.new_database()
    started: list[ServerProcess] = []

    def start(name: str, *extra: str) -> ServerProcess:
        server = ServerProcess(
            [sys.executable, "-c", SERVE, "serve", "--port", "0", "--store", str(tmp_path / f"replica-{name}"),
             "--store-url", url, "--blob-dir", str(tmp_path / "shared-blobs"), "--workers", "2",
             "--heartbeat", "0.5", "--replica-timeout", str(REPLICA_TIMEOUT_S), "--shutdown-grace", "5", *extra],
            tmp_path / f"replica-{name}.log")
        server.url = url  # type: ignore[attr-defined]
        started.append(server)
        return server

    start.url = url  # type: ignore[attr-defined]
    yield start
    for server in started:
        server.stop()


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.1)
    return value


def events(log: Path, event: str) -> list[str]:
    """Job ids of one structured event in a replica's log."""
    return re.findall(rf"event={re.escape(event)} job=([0-9a-f]{{32}})", log.read_text())


def health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def test_twenty_clients_on_two_replicas_each_job_runs_once_and_matches_embedded(replicas, tmp_path: Path) -> None:
    from onnxprune import pipeline

    a, b = replicas("a"), replicas("b")
    ratios = (0.2, 0.3, 0.4, 0.5)
    expected = {}
    for ratio in ratios:
        pipeline.prune(DIGITS, tmp_path / f"embedded-{ratio}.onnx", PruneSpec(ratio=ratio, criterion="l1"))
        expected[ratio] = (tmp_path / f"embedded-{ratio}.onnx").read_bytes()
    outcomes: dict[int, tuple[str, float, bytes]] = {}
    errors: list[BaseException] = []

    def one_client(i: int) -> None:
        ratio = ratios[i % len(ratios)]
        try:
            with Client((a, b)[i % 2].target, timeout=60) as client:
                job = client.submit(DIGITS, PruneSpec(ratio=ratio, criterion="l1"))
                done = client.wait(job.job_id)
                client.fetch(done.job_id, tmp_path / f"client{i}.onnx")
                outcomes[i] = (job.job_id, ratio, (tmp_path / f"client{i}.onnx").read_bytes())
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert len(outcomes) == 20
    for _, ratio, data in outcomes.values():
        assert data == expected[ratio]
    ids = sorted(job_id for job_id, _, _ in outcomes.values())
    started = events(tmp_path / "replica-a.log", "job.started") + events(tmp_path / "replica-b.log", "job.started")
    assert sorted(started) == ids  # each job started exactly once, on one replica
    assert events(tmp_path / "replica-a.log", "job.started") and events(tmp_path / "replica-b.log", "job.started")
    with Client(a.target) as client:
        listed = client.list(limit=100)
    assert sorted(j.job_id for j in listed) == ids and {j.state for j in listed} == {"SUCCEEDED"}


def test_a_job_submitted_on_one_replica_is_watched_cancelled_and_downloaded_on_the_other(replicas,
                                                                                          tmp_path: Path) -> None:
    a, b = replicas("a"), replicas("b")
    with Client(a.target) as on_a, Client(b.target) as on_b:
        job = on_a.submit(tiny_model(tmp_path / "m.onnx"), slow(400))
        owner = wait_for(lambda: _owner(replicas.url, job.job_id), 30, "the job to start")
        watcher = on_b if owner == a.target else on_a  # the replica that does not run it
        stream = watcher.watch(job.job_id)
        live = next(e for e in stream if e.job.state == "RUNNING" and e.job.stage == "work")
        assert live.job.message.startswith("step ")
        line = next(e.log_line for e in stream if e.log_line)  # log lines reach it through the database
        assert "tests.scale_tasks: slow job: 400 steps" in line
        on_b.cancel(job.job_id)
        final = list(on_b.watch(job.job_id))[-1].job
        assert final.state == "CANCELLED" and on_a.get(job.job_id).state == "CANCELLED"
        other = on_a.submit(DIGITS, PruneSpec(ratio=0.3, criterion="l1"))
        done = on_b.wait(other.job_id)  # followed through the database on B, whichever replica runs it
        on_b.fetch(done.job_id, tmp_path / "from-b.onnx")
        on_a.fetch(done.job_id, tmp_path / "from-a.onnx")
    assert (tmp_path / "from-b.onnx").read_bytes() == (tmp_path / "from-a.onnx").read_bytes()


def _owner(url: str, job_id: str) -> str | None:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT r.address FROM jobs j JOIN replicas r ON r.replica_id = j.owner "
                           "WHERE j.job_id = %s AND j.state = 'RUNNING'", (job_id,)).fetchone()
    return row[0] if row else None


def test_sigkill_of_a_replica_mid_job_the_other_finishes_it(replicas, tmp_path: Path) -> None:
    a, b = replicas("a"), replicas("b")
    model = tiny_model(tmp_path / "m.onnx")
    with Client(b.target) as on_b:
        jobs = [on_b.submit(model, slow(40)) for _ in range(4)]  # 4 s each; two per replica
        on_a = wait_for(lambda: [j for j in jobs if _owner(replicas.url, j.job_id) == a.target], 30,
                        "a job running on replica A")
        workers = a.children()
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(10)
        t0 = time.monotonic()
        for job in jobs:  # B answers at once
            assert on_b.get(job.job_id).state in ("QUEUED", "RUNNING", "SUCCEEDED")
        assert time.monotonic() - t0 < 5
        for job in jobs:
            assert on_b.wait(job.job_id).state == "SUCCEEDED"
        for job in on_a:
            on_b.fetch(job.job_id, tmp_path / f"{job.job_id}.onnx")
            assert (tmp_path / f"{job.job_id}.onnx").read_bytes() == model.read_bytes()  # slow_task copies
    # A's orphaned job processes stopped on their own (stdin closed), so no job ran twice at once.
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() and "zombie" not in
                             Path(f"/proc/{pid}/status").read_text() for pid in workers), 15, "A's workers to stop")
    log_b = tmp_path / "replica-b.log"
    assert {j.job_id for j in on_a} <= set(events(log_b, "job.requeued"))
    with psycopg.connect(replicas.url) as conn:
        attempts = dict(conn.execute("SELECT job_id, attempts FROM jobs").fetchall())
    assert all(attempts[j.job_id] == 2 for j in on_a)


def test_database_outage_gives_unavailable_and_not_serving_then_recovers(postgres, replicas, tmp_path: Path) -> None:
    a, b = replicas("a"), replicas("b")
    model = tiny_model(tmp_path / "m.onnx")
    with Client(a.target, timeout=20) as on_a, Client(b.target, timeout=20) as on_b:
        running = on_a.submit(model, slow(50))
        wait_for(lambda: on_a.get(running.job_id).state == "RUNNING", 30, "the job to run")
        postgres.stop()
        try:
            with pytest.raises(ServiceError) as info:
                on_b.get(running.job_id)
            assert info.value.code == "UNAVAILABLE" and "job database unreachable" in str(info.value)
            with pytest.raises(ServiceError) as info:
                on_a.submit(model, slow(1))
            assert info.value.code == "UNAVAILABLE"
            for server in (a, b):
                wait_for(lambda s=server: health(s.target) == health_pb2.HealthCheckResponse.NOT_SERVING, 15,
                         "NOT_SERVING")
            time.sleep(6)  # the job ends while the database is down; its outcome waits for it
        finally:
            postgres.start()
        for server in (a, b):
            wait_for(lambda s=server: health(s.target) == health_pb2.HealthCheckResponse.SERVING, 20, "SERVING")
        assert on_b.wait(running.job_id).state == "SUCCEEDED"
        assert "event=job.finish_retry" in (tmp_path / "replica-a.log").read_text()  # it ended during the outage
        after = on_b.submit(model, slow(1))
        assert on_a.wait(after.job_id).state == "SUCCEEDED"
