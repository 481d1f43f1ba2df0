"""Latency measurement, interleaved comparison, and the ``onnxprune bench`` command, on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.measure import bench
from onnxprune.measure.bench import Comparison, LatencyStats, compare, measure_latency
from onnxprune.cli import main
from onnxprune.errors import BadInputError
from onnxprune.runtime.device import CPU
from onnxprune.runtime.session import make_session

RUNS = 5


def _mlp(hidden: int, batch: str | int = "N", spatial: bool = False) -> onnx.ModelProto:
    """x[batch,32] (or [batch,32,S] when ``spatial``) → MatMul(32×hidden) → Relu → MatMul(hidden×8)."""
    rng = np.random.default_rng(hidden)
    w1 = numpy_helper.from_array(rng.standard_normal((32, hidden)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((hidden, 8)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
    ]
    in_shape = [batch, "S", 32] if spatial else [batch, 32]
    out_shape = [batch, "S", 8] if spatial else [batch, 8]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [w1, w2],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _check_stats(s: LatencyStats, batch: int) -> None:
    assert 0 < s.p50_ms <= s.p90_ms <= s.p99_ms
    assert s.mean_ms > 0
    assert s.batch == batch and s.runs == RUNS
    assert s.provider == CPU
    assert s.throughput_per_s == pytest.approx(batch * 1000.0 / s.p50_ms)


def test_measure_latency_from_proto_and_session() -> None:
    stats = measure_latency(_mlp(64), device="cpu", batch=4, runs=RUNS, warmup=1, threads=1)
    _check_stats(stats, 4)
    with make_session(_mlp(64), "cpu", threads=1) as sess:
        _check_stats(measure_latency(sess, batch=2, runs=RUNS, warmup=0), 2)
    keys = {"p50_ms", "p90_ms", "p99_ms", "mean_ms", "throughput_per_s", "batch", "provider", "runs"}
    assert set(stats.to_dict()) == keys


def test_measure_latency_with_shapes_and_batch_override() -> None:
    # --shape fixes S; the batch in --shape is replaced by the batch being measured.
    stats = measure_latency(_mlp(16, spatial=True), "cpu", batch=3, runs=RUNS, warmup=0, shapes={"x": [1, 7, 32]})
    _check_stats(stats, 3)
    with pytest.raises(BadInputError, match="--shape x="):
        measure_latency(_mlp(16, spatial=True), "cpu", runs=RUNS)


def test_measure_latency_errors() -> None:
    with pytest.raises(BadInputError, match="fixed batch of 1"):
        measure_latency(_mlp(16, batch=1), "cpu", batch=2, runs=RUNS)
    with pytest.raises(BadInputError, match="runs"):
        measure_latency(_mlp(16), "cpu", runs=0)
    with pytest.raises(BadInputError, match="batch"):
        measure_latency(_mlp(16), "cpu", batch=0)


def test_unbatched_side_inputs_do_not_fix_the_batch() -> None:
    model = _mlp(16)
    model.graph.input.append(helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1]))
    model.graph.node.append(helper.make_node("Mul", ["y", "scale"], ["z"], name="scale"))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 8]))
    with make_session(model, "cpu", threads=1) as sess:
        assert bench.fixed_batch(sess) is None
        _check_stats(measure_latency(sess, batch=4, runs=RUNS, warmup=0), 4)
    with make_session(_mlp(16, batch=2), "cpu") as sess:
        assert bench.fixed_batch(sess) == 2


def test_compare_interleaves_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []
    real = bench._timed  # noqa: SLF001

    def recording(session: object, feeds: object) -> float:
        order.append("a" if session is sessions[0] else "b")
        return real(session, feeds)  # type: ignore[arg-type]

    monkeypatch.setattr(bench, "_timed", recording)
    with make_session(_mlp(256), "cpu", threads=1) as big, make_session(_mlp(8), "cpu", threads=1) as small:
        sessions = [big, small]
        result = compare(big, small, batch=2, runs=4, warmup=1)
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]  # alternating, and who goes first alternates too
    assert isinstance(result, Comparison)
    assert result.a.runs == result.b.runs == 4
    assert result.speedup == pytest.approx(result.a.p50_ms / result.b.p50_ms)
    assert set(result.to_dict()) == {"a", "b", "speedup"}


def test_compare_models_and_paths(tmp_path: Path) -> None:
    path = tmp_path / "big.onnx"
    onnx.save(_mlp(512), path)
    result = compare(path, _mlp(4), device="cpu", batch=8, runs=RUNS, warmup=2, threads=1)
    _check_stats(result.a, 8)
    _check_stats(result.b, 8)
    assert result.speedup > 0


def _save(tmp_path: Path, name: str, model: onnx.ModelProto) -> str:
    path = tmp_path / name
    onnx.save(model, path)
    return str(path)


def test_cli_bench_json_two_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _save(tmp_path, "a.onnx", _mlp(128)), _save(tmp_path, "b.onnx", _mlp(16))
    rc = main(["bench", a, b, "--device", "cpu", "--runs", "3", "--batch", "1", "4", "--threads", "1", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["device"] == "cpu" and out["provider"] == CPU and out["threads"] == 1
    assert out["models"] == {"a": a, "b": b}
    assert [r["batch"] for r in out["results"]] == [1, 4]
    for r in out["results"]:
        assert r["a"]["batch"] == r["b"]["batch"] == r["batch"]
        assert r["speedup"] == pytest.approx(r["a"]["p50_ms"] / r["b"]["p50_ms"])
    assert out["skipped_batches"] == []


def test_cli_bench_table_one_model_fixed_batch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _save(tmp_path, "fixed.onnx", _mlp(16, batch=1))
    rc = main(["bench", path, "--device", "cpu", "--runs", "3"])  # default --batch 1 8
    assert rc == 0
    text = capsys.readouterr().out
    assert "p50 ms" in text and "samples/s" in text
    assert "skipped batch(es) [8]" in text
    lines = [line for line in text.splitlines() if line.startswith("1 ")]
    assert len(lines) == 1


def test_cli_bench_two_models_table_shows_ratio(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _save(tmp_path, "a.onnx", _mlp(64, spatial=True)), _save(tmp_path, "b.onnx", _mlp(8, spatial=True))
    rc = main(["bench", a, b, "--device", "cpu", "--runs", "3", "--batch", "2", "--shape", "x=1x5x32"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "batch 2: B is" in text and "x the speed of A" in text


def test_cli_bench_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _save(tmp_path, "m.onnx", _mlp(8))
    assert main(["bench", path, "--runs", "0"]) == 2
    assert main(["bench", str(tmp_path / "missing.onnx"), "--device", "cpu"]) == 2
    assert main(["bench", path, "--device", "cpu", "--shape", "y=1x32"]) == 2
    err = capsys.readouterr().err
    assert err.count("onnxprune: error:") == 3
