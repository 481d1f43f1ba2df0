"""Calibration: exact running statistics, patch rows that reproduce Conv, bounded memory, progress, devices."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper
from threadpoolctl import threadpool_limits

from onnxprune.io.load import load_model
from onnxprune.io.shapes import static_shapes
from onnxprune.runtime.capture import capture
from onnxprune.runtime.device import CUDA, DeviceInfo, probe_cuda, select_device
from onnxprune.repair.calibration import (
    ACTIVATIONS,
    FEATURES,
    TensorStats,
    calibrate,
    linear_view,
    open_calibration,
    plan_capture,
    stream,
)
from onnxprune.errors import BadInputError, CancelledError
from onnxprune.analysis.driver import analyze_graph
from onnxprune.importance import default_criteria
from onnxprune.pipeline import prune
from onnxprune.spec import PruneSpec
from tests.data import write_npz
from tests.models import build_mlp, build_vgg, run


@pytest.fixture(autouse=True)
def _one_blas_thread() -> Iterator[None]:
    """Tests share two cores: multi-threaded BLAS on tiny matrices only adds contention."""
    with threadpool_limits(1):
        yield


def analyzed(model: onnx.ModelProto) -> tuple[gs.Graph, object]:
    graph = gs.import_onnx(model)
    return graph, analyze_graph(graph, static_shapes(model, None))


def conv_model(auto_pad: str = "NOTSET", **attrs: object) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((5, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "b")
    kw = dict(attrs) if auto_pad == "NOTSET" else {**attrs, "auto_pad": auto_pad}
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", kernel_shape=[3, 3], **kw)
    graph = helper.make_graph([node], "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 9, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_tensor_stats_are_exact_sums() -> None:
    ts = TensorStats(axis=1, size=3)
    a = np.array([[[0.0, 2.0], [-1.0, 0.0], [3.0, 3.0]]])  # (1, 3, 2)
    ts.update(a)
    ts.update(-a)
    assert ts.count == 4
    np.testing.assert_allclose(ts.zero_fraction, [0.5, 0.5, 0.0])
    np.testing.assert_allclose(ts.mean_abs, [1.0, 0.5, 3.0])
    np.testing.assert_allclose(ts.sum, [0.0, 0.0, 0.0])
    with pytest.raises(BadInputError, match="channels"):
        ts.update(np.zeros((1, 4, 2)))


@pytest.mark.parametrize("attrs", [
    dict(pads=[1, 1, 1, 1]),
    dict(pads=[0, 2, 1, 0], strides=[2, 1]),
    dict(pads=[2, 2, 2, 2], dilations=[2, 2]),
    dict(auto_pad="SAME_UPPER", strides=[2, 2]),
    dict(auto_pad="VALID"),
])
def test_conv_patch_rows_reproduce_conv(attrs: dict) -> None:
    """rows @ matrix + bias equals onnxruntime's Conv output at every sampled position."""
    model = conv_model(**attrs)
    x = np.random.default_rng(1).standard_normal((2, 3, 9, 7)).astype(np.float32)
    y = run(model, {"x": x})["y"]
    view = linear_view(gs.import_onnx(model).nodes[0])
    assert not isinstance(view, str)
    pos = view.positions(x.shape, 1000, np.random.default_rng(0))
    assert len(pos) == 2 * y.shape[2] * y.shape[3]  # few positions: all of them, exactly once
    got = view.rows(x, pos) @ view.matrix(numpy_helper.to_array(model.graph.initializer[0]))
    got += numpy_helper.to_array(model.graph.initializer[1])
    want = y[pos[:, 0], :, pos[:, 1], pos[:, 2]]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    w = numpy_helper.to_array(model.graph.initializer[0])
    np.testing.assert_array_equal(view.weight_from(view.matrix(w), w), w)


def test_unsupported_consumers_say_why() -> None:
    model = conv_model(pads=[1, 1, 1, 1])
    node = gs.import_onnx(model).nodes[0]
    node.attrs["group"] = 3
    assert "grouped" in linear_view(node)


def test_activation_stats_and_gram_match_direct_computation(tmp_path: Path) -> None:
    model = build_mlp(seed=3)
    graph, analysis = analyzed(model)
    x = np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32)
    source, what = open_calibration(model, str(write_npz(tmp_path / "x.npz", x)), 100, {})
    assert what.endswith("x.npz (40 samples)")
    stats = calibrate(model, graph, analysis, source, needs={ACTIVATIONS, FEATURES}, device="cpu", batch_size=7)
    assert stats.samples == 40 and stats.device == "cpu"
    relu = next(n for n in graph.nodes if n.op == "Relu").outputs[0].name
    h = capture(model, [relu], {"input": x}, "cpu")[relu].astype(np.float64)
    np.testing.assert_allclose(stats.tensors[relu].zero_fraction, (h == 0).mean(axis=0))
    np.testing.assert_allclose(stats.tensors[relu].mean_abs, np.abs(h).mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats.grams["fc2"].gram, h.T @ h, rtol=1e-6)
    assert stats.grams["fc2"].rows == 40


def test_memory_does_not_grow_with_samples(tmp_path: Path) -> None:
    """The accumulators have the same size for 16 and 256 samples and stay under the documented bound."""
    model = build_vgg(seed=0)
    graph, analysis = analyzed(model)
    needs = {ACTIVATIONS, FEATURES}
    plan = plan_capture(graph, analysis, needs)
    sizes = []
    for n in (16, 256):
        source, _ = open_calibration(model, None, n, {})
        stats = calibrate(model, graph, analysis, source, needs=needs, device="cpu", batch_size=32)
        assert stats.samples == n
        sizes.append(stats.nbytes)
    assert sizes[0] == sizes[1] <= plan.bound()
    assert plan.bound() < 2_000_000  # vgg: K ≤ 16·9 features per consumer


def test_max_features_skips_big_consumers_with_a_note() -> None:
    graph, analysis = analyzed(build_vgg())
    plan = plan_capture(graph, analysis, {FEATURES}, max_features=100)
    assert "conv3" not in plan.views and "conv2" in plan.views
    assert any("conv3" in n and "> 100" in n for n in plan.notes)


def test_progress_callback_and_no_bar_without_tty(capsys: pytest.CaptureFixture[str]) -> None:
    model = build_vgg()
    graph, analysis = analyzed(model)
    source, what = open_calibration(model, None, 50, {})
    assert what == "random inputs (50 samples)"
    seen: list[tuple[float, str]] = []
    calibrate(model, graph, analysis, source, needs={ACTIVATIONS}, device="cpu", batch_size=16,
              progress=lambda f, m: seen.append((f, m)))
    assert [round(f, 2) for f, _ in seen] == [0.32, 0.64, 0.96, 1.0]
    assert seen[-1][1] == "calibrated 50/50 samples"
    assert "calibrate" not in capsys.readouterr().err  # stderr is not a TTY under pytest: no tqdm bar


def test_bar_when_asked(capsys: pytest.CaptureFixture[str]) -> None:
    model = build_vgg()
    graph, analysis = analyzed(model)
    source, _ = open_calibration(model, None, 8, {})
    calibrate(model, graph, analysis, source, needs={ACTIVATIONS}, device="cpu", bar=True)
    assert "calibrate" in capsys.readouterr().err


def test_cuda_choice_runs_the_same_code() -> None:
    """A CUDA DeviceChoice goes through the same calibration code; without a GPU onnxruntime runs it on CPU."""
    model = build_vgg()
    graph, analysis = analyzed(model)
    cuda = select_device("cuda", probe=lambda: DeviceInfo(True))
    assert cuda.providers[0] == CUDA and cuda.name == "cuda"
    results = []
    for choice in (select_device("cpu"), cuda):
        source, _ = open_calibration(model, None, 16, {})
        results.append(calibrate(model, graph, analysis, source, needs={ACTIVATIONS}, device=choice))
    assert results[1].device == "cuda"
    for name, ts in results[0].tensors.items():
        np.testing.assert_allclose(results[1].tensors[name].mean_abs, ts.mean_abs, rtol=1e-4)


@pytest.mark.skipif(probe_cuda().cuda_usable, reason="a usable CUDA provider is present")
def test_device_cuda_without_gpu_is_a_clear_error(tmp_path: Path, digits_model_path: Path) -> None:
    with pytest.raises(BadInputError, match="--device cuda: the CUDA provider is not usable"):
        prune(digits_model_path, tmp_path / "o.onnx", PruneSpec(criterion="apoz", device="cuda"))


@pytest.mark.gpu
def test_calibration_on_gpu_matches_cpu(digits_model_path: Path) -> None:
    model = load_model(digits_model_path).model
    graph, analysis = analyzed(model)
    stats = []
    for device in ("cpu", "cuda"):
        source, _ = open_calibration(model, None, 64, {})
        stats.append(calibrate(model, graph, analysis, source, needs={ACTIVATIONS, FEATURES}, device=device))
    assert stats[1].device == "cuda"
    for name, ts in stats[0].tensors.items():
        np.testing.assert_allclose(stats[1].tensors[name].mean_abs, ts.mean_abs, rtol=1e-3, atol=1e-5)
    for name, fg in stats[0].grams.items():
        np.testing.assert_allclose(stats[1].grams[name].gram, fg.gram, rtol=1e-3, atol=1e-3)


def test_criteria_declare_their_data_needs() -> None:
    needs = default_criteria().needs
    assert needs["apoz"] == needs["activation"] == {ACTIVATIONS}
    assert needs["regression"] == {FEATURES}
    assert needs["bn-scale"] == needs["l2"] == set()


def test_pipeline_calibrates_only_when_needed(tmp_path: Path, digits_model_path: Path) -> None:
    stages: list[str] = []
    prune(digits_model_path, tmp_path / "a.onnx", PruneSpec(criterion="l2", device="cpu"),
          progress=lambda p: stages.append(p.stage))
    assert "calibrate" in stages  # the stage runs, and returns at once
    report = prune(digits_model_path, tmp_path / "b.onnx", PruneSpec(criterion="l2", device="cpu")).report
    assert not any("calibrat" in n for n in report["notes"])
    report = prune(digits_model_path, tmp_path / "c.onnx",
                   PruneSpec(criterion="apoz", device="cpu", calib_samples=16)).report
    assert any(n.startswith("calibrated on random inputs (16 samples)") for n in report["notes"])


def test_fidelity_uses_calibration_data(tmp_path: Path, digits_model_path: Path, digits: tuple) -> None:
    x_train, y_train, _, _ = digits
    data = write_npz(tmp_path / "calib.npz", x_train[:40], y_train[:40])
    report = prune(digits_model_path, tmp_path / "o.onnx",
                   PruneSpec(criterion="apoz", calib=str(data), calib_samples=30, device="cpu")).report
    assert report["fidelity"]["samples"] == 30
    assert report["fidelity_data"] == f"calibration data {data} (30 samples)"
    report = prune(digits_model_path, tmp_path / "p.onnx", PruneSpec(device="cpu")).report
    assert report["fidelity_data"] == "random inputs (8 samples)" and report["fidelity"]["samples"] == 8


def test_cancel_during_calibration(tmp_path: Path, digits_model_path: Path) -> None:
    cancel = threading.Event()

    def on_progress(p: object) -> None:
        if getattr(p, "stage") == "calibrate" and getattr(p, "fraction") > 0:
            cancel.set()

    with pytest.raises(CancelledError):
        prune(digits_model_path, tmp_path / "o.onnx",
              PruneSpec(criterion="apoz", device="cpu", calib_samples=128), progress=on_progress, cancel=cancel)
    assert not (tmp_path / "o.onnx").exists()


def test_fixed_batch_models_get_batches_of_that_size() -> None:
    """Exported files often fix the batch dim to 1; calibration then runs one sample at a time."""
    model = build_vgg()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    graph, analysis = analyzed(model)
    source, _ = open_calibration(model, None, 5, {})
    assert [len(b["input"]) for b in stream(source, 32)] == [1] * 5
    stats = calibrate(model, graph, analysis, source, needs={ACTIVATIONS, FEATURES}, device="cpu", batch_size=32)
    assert stats.samples == 5


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "onnxprune.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_calib_reconstruct_and_report(tmp_path: Path, digits_model_path: Path, digits: tuple) -> None:
    x_train, y_train, _, _ = digits
    data = write_npz(tmp_path / "calib.npz", x_train[:100], y_train[:100])
    proc = _cli("prune", str(digits_model_path), "-o", str(tmp_path / "o.onnx"), "--criterion", "regression",
                "--reconstruct", "--calib", str(data), "--calib-samples", "80", "--device", "cpu",
                "--report", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["fidelity_data"] == f"calibration data {data} (80 samples)"
    assert report["fidelity"]["top1_agreement"] > 0.9
    assert len(report["reconstruct"]) == 6 and report["device"] == "cpu"


@pytest.mark.skipif(probe_cuda().cuda_usable, reason="a usable CUDA provider is present")
def test_cli_device_cuda_without_gpu_exits_2(tmp_path: Path, digits_model_path: Path) -> None:
    proc = _cli("prune", str(digits_model_path), "-o", str(tmp_path / "o.onnx"), "--criterion", "apoz",
                "--device", "cuda")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(("INFO", "WARNING"))]
    assert len(errors) == 1 and "--device cuda" in errors[0] and "Traceback" not in proc.stderr
