"""Scale-out throughput: 20 concurrent small prune jobs on a Ray cluster of one node, then of two nodes, plus the
per-job overhead of a Ray task next to a local worker process.

Starts a Ray head on 127.0.0.1 with ``--num-cpus 1`` (and later one worker node with ``--num-cpus 1``, as the
scale-out tests do), a server in this process with ``--executor ray`` that keeps all 20 jobs in flight, and 20
client threads that each prune ``examples/digits_cnn.onnx`` (``--ratio 0.3 --criterion l1``, the real pipeline in a
fresh Ray worker process per job). Reports the wall time from the first submission to the last result for one
node and for two, and their ratio. The overhead is the median submit-to-SUCCEEDED time of a job that only copies
its input, run one at a time, on the local executor and on the one-node Ray cluster.

    python benchmarks/bench_scale.py [--jobs 20] [--overhead-runs 5] [--jobs-per-worker 1] [--json]

Needs the ``ray`` extra. On a 2-core machine the two "nodes" share the cores with the server, Ray's own daemons
and the clients, so the ratio shows what a second node buys when the cluster, not the server, is the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from onnxprune.client import Client  # noqa: E402
from onnxprune.service.server import ServerConfig, create_server  # noqa: E402
from onnxprune.service.tasks import run_task  # noqa: E402
from onnxprune.spec import PruneSpec  # noqa: E402
from tests.cluster import RayCluster  # noqa: E402
from tests.service_tasks import copy_task  # noqa: E402

DIGITS = REPO / "examples" / "digits_cnn.onnx"


def run_batch(target: str, jobs: int, workdir: Path) -> float:
    """Seconds from the first submission to the last downloaded result of ``jobs`` concurrent clients."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(jobs + 1)

    def client(i: int) -> None:
        try:
            with Client(target, timeout=120) as c:
                barrier.wait(60)
                job = c.submit(DIGITS, PruneSpec(ratio=0.3, criterion="l1"))
                c.wait(job.job_id)
                c.fetch(job.job_id, workdir / f"job{i}.onnx")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(jobs)]
    for t in threads:
        t.start()
    barrier.wait(60)
    start = time.perf_counter()
    for t in threads:
        t.join(900)
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} jobs failed: {errors[0]!r}")
    return elapsed


def overhead(config: ServerConfig, root: Path, runs: int) -> float:
    """Median submit-to-SUCCEEDED seconds of a copy-only job, one at a time."""
    server, port = create_server("127.0.0.1:0", root, config, task=copy_task)
    server.start()
    try:
        times = []
        with Client(f"127.0.0.1:{port}", timeout=120) as c:
            c.wait(c.submit(DIGITS, PruneSpec()).job_id)  # warm-up: connections, first imports
            for _ in range(runs):
                start = time.perf_counter()
                c.wait(c.submit(DIGITS, PruneSpec()).job_id)
                times.append(time.perf_counter() - start)
        return statistics.median(times)
    finally:
        server.stop(grace=5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--overhead-runs", type=int, default=5)
    parser.add_argument("--jobs-per-worker", type=int, default=1,
                        help="serve --ray-jobs-per-worker: 1 = a fresh Ray worker process per job")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    cluster = RayCluster(worker_nodes=0)
    result: dict[str, float | int] = {"jobs": args.jobs}
    try:
        result["local_job_overhead_s"] = overhead(ServerConfig(workers=1), work / "local", args.overhead_runs)
        ray_config = ServerConfig(executor="ray", ray_address=cluster.address, workers=args.jobs,
                                  ray_jobs_per_worker=args.jobs_per_worker)
        result["ray_job_overhead_s"] = overhead(ray_config, work / "ray-overhead", args.overhead_runs)
        for nodes in (1, 2):
            if nodes == 2:
                cluster.start_worker_node()
            server, port = create_server("127.0.0.1:0", work / f"ray{nodes}", ray_config, task=run_task)
            server.start()
            try:
                run_batch(f"127.0.0.1:{port}", 2, work)  # warm-up: the object store, worker start-up paths
                result[f"ray_{nodes}_node_s"] = run_batch(f"127.0.0.1:{port}", args.jobs, work)
            finally:
                server.stop(grace=5)
        result["two_over_one"] = result["ray_2_node_s"] / result["ray_1_node_s"]
        result["ray_extra_overhead_s"] = result["ray_job_overhead_s"] - result["local_job_overhead_s"]
    finally:
        cluster.close()
        shutil.rmtree(work, ignore_errors=True)
    result = {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
