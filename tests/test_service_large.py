"""A model over 600 MB round-trips through a real ``onnxprune serve`` process: upload, prune, download, with
sha256 verified both ways, while the server process's peak memory stays far below the model size (uploads and
downloads stream through 1 MiB buffers; the pruning itself runs in a separate job process)."""

from __future__ import annotations

import hashlib
import re
import signal
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.client import Client
from onnxprune.spec import PruneSpec
from tests.test_service_restart import (  # noqa: F401 - fixture helpers
    ServerProcess,
    servers,  # noqa: F401 - pytest fixture
    start,
)

IN, HIDDEN, OUT = 8192, 12288, 4096  # 8192×12288 + 12288×4096 float32 weights = 604 MB


def big_model(directory: Path) -> tuple[Path, int]:
    """x → MatMul(W1) → Relu → MatMul(W2) with 604 MB of weights in an external-data file."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((IN, HIDDEN), dtype=np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((HIDDEN, OUT), dtype=np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])],
        "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, OUT])], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    path = directory / "big.onnx"
    onnx.save(model, path, save_as_external_data=True, location="big.onnx.data", size_threshold=1024)
    size = path.stat().st_size + (directory / "big.onnx.data").stat().st_size
    return path, size


def _kib(status: str, key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", status, re.M).group(1))  # type: ignore[union-attr]


@pytest.mark.slow
def test_600mb_model_round_trip_with_bounded_server_memory(servers: list, tmp_path: Path) -> None:  # noqa: F811
    model, size = big_model(tmp_path)
    assert size > 600e6
    server = start(servers, tmp_path / "store", "--workers", "1", script="")
    baseline = _kib(Path(f"/proc/{server.proc.pid}/status").read_text(), "VmRSS")
    start_time = time.monotonic()
    with Client(server.target) as client:
        result = client.prune(model, tmp_path / "out" / "pruned.onnx", PruneSpec(ratio=0.5))
        job = client.list()[0]
    elapsed = time.monotonic() - start_time
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    server_peak = _kib(status, "VmHWM") * 1024
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(30)
    log = (tmp_path / "server.log").read_text()
    worker_peak_mb = float(re.search(r"event=job.finished .*peak_rss_mb=([\d.]+)", log).group(1))  # type: ignore[union-attr]

    # downloaded bytes match what the server recorded (the client also verified sha256 while streaming)
    out = tmp_path / "out" / "pruned.onnx"
    recorded = {r.name: r.sha256 for r in job.results}
    assert hashlib.sha256(out.read_bytes()).hexdigest() == recorded["pruned.onnx"]
    pruned = onnx.load(out)
    weights = {t.name: list(t.dims) for t in pruned.graph.initializer}
    kept = weights["w1"][1]
    assert weights["w1"] == [IN, kept] and weights["w2"] == [kept, OUT] and kept < HIDDEN
    assert result.report["pruned"]["params"] < result.report["original"]["params"]
    print(f"\nmodel {size / 1e6:.0f} MB, round trip {elapsed:.1f} s; server peak RSS {server_peak / 1e6:.0f} MB "
          f"(baseline {baseline * 1024 / 1e6:.0f} MB), job process peak RSS {worker_peak_mb:.0f} MB")
    assert server_peak < 0.5 * size, f"server peak {server_peak / 1e6:.0f} MB for a {size / 1e6:.0f} MB model"
