"""Upload and download throughput of the compression service on loopback, next to a local file copy.

Starts a server in this process on 127.0.0.1 (port 0), uploads a file of random bytes, runs a job that only
copies it (so the pipeline's time is not in the numbers), downloads the result, and compares each MB/s with
copying the same bytes locally (``shutil.copyfile``, which uses sendfile) and with the sha256 pass every
transfer includes on both ends. The page cache is warm for every measurement.

    python benchmarks/bench_service.py [--size-mb 256] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from onnxprune.progress import ProgressFn  # noqa: E402
from onnxprune.service.tasks import TaskRequest, TaskResult  # noqa: E402


def copy_task(request: TaskRequest, in_dir: Path, out_dir: Path, progress: ProgressFn,
              cancel: threading.Event) -> TaskResult:
    """The job: hand the uploaded file back as the result."""
    shutil.copyfile(in_dir / request.model_path, out_dir / request.output_name)
    return TaskResult(files=[request.output_name], report={})


def best(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(best, median) wall time of ``repeat`` runs."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    # The worker process imports the job function by module name; under `python benchmarks/bench_service.py`
    # this module is __main__, so take the function from the module imported under its own name.
    import bench_service

    from onnxprune.client import Client
    from onnxprune.service.server import ServerConfig, create_server

    size = args.size_mb << 20
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        src = tmp_path / "payload.onnx"
        _write_model(src, size)
        server, port = create_server("127.0.0.1:0", tmp_path / "store",
                                     ServerConfig(workers=1, quota_bytes=8 * size, max_upload_bytes=2 * size),
                                     task=bench_service.copy_task)
        server.start()
        try:
            client = Client(f"127.0.0.1:{port}", timeout=600)
            results: dict[str, tuple[float, float]] = {}
            results["local copy (shutil.copyfile)"] = best(lambda: shutil.copyfile(src, tmp_path / "copy.bin"),
                                                           args.repeat)

            def python_copy() -> None:
                with open(src, "rb") as fin, open(tmp_path / "copy2.bin", "wb") as fout:
                    while block := fin.read(1 << 20):
                        fout.write(block)

            results["local copy (1 MiB read/write loop)"] = best(python_copy, args.repeat)

            def sha() -> None:
                digest = hashlib.sha256()
                with open(src, "rb") as fin:
                    while block := fin.read(1 << 20):
                        digest.update(block)

            results["sha256 of the file (each side does one)"] = best(sha, args.repeat)
            results["upload (gRPC, 1 MiB chunks, sha256 both sides)"] = best(lambda: client.upload(src), args.repeat)
            job_id = client.submit(src).job_id
            client.wait(job_id)
            results["download (gRPC, 1 MiB chunks, sha256 verified)"] = best(
                lambda: client.download(job_id, "pruned.onnx", tmp_path / "down.bin"), args.repeat)
            client.close()
        finally:
            server.stop(grace=1.0)

    rows = {name: {"best_s": round(b, 3), "median_s": round(m, 3), "mb_per_s": round(size / 1e6 / b, 1)}
            for name, (b, m) in results.items()}
    if args.json:
        print(json.dumps({"size_mb": args.size_mb, "repeat": args.repeat, "results": rows}, indent=2))
    else:
        print(f"{args.size_mb} MiB, best of {args.repeat}, warm page cache, loopback")
        for name, row in rows.items():
            print(f"  {name:<50} {row['mb_per_s']:>8.1f} MB/s  "
                  f"({row['best_s']:.2f} s best, {row['median_s']:.2f} s median)")
    return 0


def _write_model(path: Path, size: int) -> None:
    """An ONNX model of about ``size`` bytes (one random uint8 initializer), so the server's checks pass."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper, save

    data = numpy_helper.from_array(np.frombuffer(os.urandom(size), dtype=np.uint8), "payload")
    graph = helper.make_graph([helper.make_node("Identity", ["payload"], ["y"])], "payload", [],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [size])], [data])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


if __name__ == "__main__":
    sys.exit(main())
