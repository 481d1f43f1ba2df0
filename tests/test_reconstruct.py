"""Least-squares reconstruction: exact when a cut channel is a linear combination of kept ones; never worse."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper
from threadpoolctl import threadpool_limits

from onnxprune.io.shapes import static_shapes
from onnxprune.repair.calibration import open_calibration
from onnxprune.analysis.driver import analyze_graph
from onnxprune.importance.base import ScoringContext
from onnxprune.importance.magnitude import lp_scores
from onnxprune.io.export import export_graph
from onnxprune.pipeline import prune
from onnxprune.planning.plan import Plan, uniform
from onnxprune.repair.reconstruct import ReconstructResult, plan_fits, reconstruct, waves
from onnxprune.spec import PruneSpec
from onnxprune.transform.surgery import cut_channels
from tests.models import (
    build_mlp,
    build_mlp_matmul,
    build_transformer_block,
    build_vgg,
    random_inputs,
    run,
    zero_channels,
)
from tests.test_criteria import scaled_copy


@pytest.fixture(autouse=True)
def _one_blas_thread() -> Iterator[None]:
    with threadpool_limits(1):
        yield


def cut_and_refit(model: onnx.ModelProto, removed: dict[str, list[int]] | float, samples: int = 512,
                  refit: bool = True) -> tuple[onnx.ModelProto, ReconstructResult]:
    """Cut ``removed`` (producer → channels, or a uniform l2 ratio), optionally reconstruct, export."""
    graph = gs.import_onnx(model)
    analysis = analyze_graph(graph, static_shapes(model, None))
    if isinstance(removed, float):
        ctx = ScoringContext(graph, analysis)
        plan = uniform(analysis, {g.id: lp_scores(ctx, g, 2) for g in analysis.groups if g.prunable}, removed)
    else:
        plan = Plan({g.id: np.array(removed[g.producers[0]]) for g in analysis.groups if g.producers[0] in removed})
    classes = plan.removed_classes(analysis)
    cut_channels(graph, analysis, classes)
    result = ReconstructResult()
    if refit:
        source, _ = open_calibration(model, None, samples, {}, seed=3)
        result = reconstruct(model, graph, analysis, classes, source, device="cpu", batch_size=32)
    return export_graph(graph, model), result


def linear_mlp() -> onnx.ModelProto:
    """fc1 (16->6) -> fc2 (6->10) with no activation; fc1's channel 5 = channel 0 + 2 * channel 1 (bias too)."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((6, 16)).astype(np.float32)
    b1 = rng.standard_normal(6).astype(np.float32)
    w1[5], b1[5] = w1[0] + 2 * w1[1], b1[0] + 2 * b1[1]
    inits = [numpy_helper.from_array(a, n) for n, a in (
        ("fc1.weight", w1), ("fc1.bias", b1),
        ("fc2.weight", rng.standard_normal((10, 6)).astype(np.float32)),
        ("fc2.bias", rng.standard_normal(10).astype(np.float32)))]
    nodes = [helper.make_node("Gemm", ["input", "fc1.weight", "fc1.bias"], ["h"], name="fc1", transB=1),
             helper.make_node("Gemm", ["h", "fc2.weight", "fc2.bias"], ["output"], name="fc2", transB=1)]
    graph = helper.make_graph(nodes, "lin", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


CASES = {
    "conv->conv (patches, padding)": (lambda: scaled_copy(build_vgg(seed=1), "conv1", 2, 6, 0.5), "conv1", 6, "conv2"),
    "conv->flatten->gemm": (lambda: scaled_copy(build_vgg(seed=1), "conv3", 3, 9, 1.5), "conv3", 9, "fc1"),
    "gemm->gemm": (lambda: scaled_copy(build_mlp(seed=2), "fc1", 0, 30, 0.3), "fc1", 30, "fc2"),
    "matmul->matmul": (lambda: scaled_copy(build_mlp_matmul(seed=2), "fc1", 3, 8, 2.0), "fc1", 8, "fc2"),
    "two-channel combination": (linear_mlp, "fc1", 5, "fc2"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cut_linear_combination_is_exact_after_reconstruction(case: str) -> None:
    build, producer, channel, consumer = CASES[case]
    model = build()
    feeds = random_inputs(model, batch=16, seed=7)
    want = run(model, feeds)["output"]
    plain, _ = cut_and_refit(model, {producer: [channel]}, refit=False)
    fixed, result = cut_and_refit(model, {producer: [channel]})
    assert list(result.layers) == [consumer]
    before, after = result.layers[consumer]
    assert before > 1e-3 and after < 1e-6  # relative squared error: float32 rounding of the activations
    assert np.abs(run(plain, feeds)["output"] - want).max() > 1e-3 * np.abs(want).max()
    np.testing.assert_allclose(run(fixed, feeds)["output"], want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_reconstruction_never_hurts_and_helps_fidelity() -> None:
    model = build_vgg(seed=5)
    feeds = random_inputs(model, batch=64, seed=11)
    want = run(model, feeds)["output"]
    plain, _ = cut_and_refit(model, 0.5, refit=False)
    fixed, result = cut_and_refit(model, 0.5, samples=256)
    assert set(result.layers) == {"conv2", "conv3", "fc1", "fc2"}
    assert all(after <= before for before, after in result.layers.values())
    err = {name: float(np.linalg.norm(run(m, feeds)["output"] - want)) for name, m in (("plain", plain), ("fixed", fixed))}
    assert err["fixed"] < 0.75 * err["plain"], err  # measured 0.66: half of a random net's channels carry real signal


def test_bias_added_to_conv_not_to_matmul() -> None:
    fixed, _ = cut_and_refit(build_vgg(seed=1), {"conv1": [0, 1]})
    conv2 = next(n for n in fixed.graph.node if n.name == "conv2")
    assert len(conv2.input) == 3 and conv2.input[2] == "conv2.reconstructed_bias"
    fixed, _ = cut_and_refit(build_mlp_matmul(seed=1), {"fc1": [0, 1]})
    fc2 = next(n for n in fixed.graph.node if n.name == "fc2")
    assert len(fc2.input) == 2
    onnx.checker.check_model(fixed, full_check=True)


def test_dead_kept_channel_keeps_the_solve_finite() -> None:
    """A kept channel that is always zero makes the Gram singular; the ridge keeps the weights finite."""
    model = zero_channels(build_vgg(seed=1), "conv1", [0])
    fixed, result = cut_and_refit(model, {"conv1": [3, 4]})
    w = next(numpy_helper.to_array(t) for t in fixed.graph.initializer if t.name == "conv2.weight")
    assert np.isfinite(w).all() and w.shape[1] == 6
    assert result.layers["conv2"][1] < result.layers["conv2"][0]


def test_waves_refit_upstream_first() -> None:
    model = build_vgg()
    original, graph = gs.import_onnx(model), gs.import_onnx(model)
    analysis = analyze_graph(graph, static_shapes(model, None))
    removed = Plan({g.id: np.array([0]) for g in analysis.groups if g.prunable}).removed_classes(analysis)
    cut_channels(graph, analysis, removed)
    fits = plan_fits(original, graph, analysis, removed, [])
    order = [[f.node for f in wave] for wave in waves(graph, fits)]
    assert order == [["conv2"], ["conv3"], ["fc1"], ["fc2"]]


def test_transformer_matmul_rows_over_tokens(tmp_path: Path) -> None:
    """MatMul consumers on [N, T, C] inputs (features on the last axis) are refit through the pipeline."""
    src = tmp_path / "t.onnx"
    onnx.save(build_transformer_block(), src)
    cos = {}
    for refit in (False, True):
        report = prune(src, tmp_path / "o.onnx", PruneSpec(ratio=0.5, reconstruct=refit, calib_samples=64,
                                                           device="cpu")).report
        cos[refit] = report["fidelity"]["cosine"]
        if refit:
            assert {"block0.o", "block0.fc2"} <= set(report["reconstruct"])
    assert cos[True] > cos[False] + 0.1, cos


def test_too_few_rows_keeps_sliced_weights_and_says_so() -> None:
    model = build_mlp(seed=1)
    _, result = cut_and_refit(model, {"fc1": list(range(16))}, samples=8)
    assert result.layers["fc2"][0] == result.layers["fc2"][1]
    assert any("fc2: 8 sampled rows for 17 unknowns" in n and "--calib-samples" in n for n in result.notes)


def test_progress_and_bar(capsys: pytest.CaptureFixture[str]) -> None:
    model = build_vgg()
    graph = gs.import_onnx(model)
    analysis = analyze_graph(graph, static_shapes(model, None))
    removed = Plan({g.id: np.array([0]) for g in analysis.groups if g.prunable}).removed_classes(analysis)
    cut_channels(graph, analysis, removed)
    source, _ = open_calibration(model, None, 32, {})
    seen: list[float] = []
    reconstruct(model, graph, analysis, removed, source, device="cpu", progress=lambda f, m: seen.append(f),
                show_bar=True)
    assert seen == [0.25, 0.5, 0.75, 1.0]
    assert "reconstruct" in capsys.readouterr().err


def test_layers_above_max_features_are_skipped() -> None:
    model = build_vgg()
    graph, original = gs.import_onnx(model), gs.import_onnx(model)
    analysis = analyze_graph(graph, static_shapes(model, None))
    removed = Plan({g.id: np.array([0]) for g in analysis.groups if g.prunable}).removed_classes(analysis)
    cut_channels(graph, analysis, removed)
    notes: list[str] = []
    fits = plan_fits(original, graph, analysis, removed, notes, max_features=200)
    assert [f.node for f in fits] == ["conv2", "conv3", "fc2"]  # fc1 reads 15·16 = 240 features
    assert notes == ["reconstruct: skipped fc1: 240 input features (> 200) would need a 0.0 GiB Gram"]
