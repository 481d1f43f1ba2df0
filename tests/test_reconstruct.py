"""Least-squares reconstruction: exact when a cut channel is a linear combination of kept ones; never worse."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper
from threadpoolctl import threadpool_limits

from onnxprune.analysis.driver import analyze_graph
from onnxprune.importance.base import ScoringContext
from onnxprune.importance.magnitude import lp_scores
from onnxprune.io.export import export_graph
from onnxprune.io.shapes import static_shapes
from onnxprune.pipeline import prune
from onnxprune.planning.plan import Plan, uniform
from onnxprune.repair.calibration import LinearView, linear_view, open_calibration
from onnxprune.repair.reconstruct import (
    ReconstructResult,
    feature_rows,
    plan_fits,
    reconstruct,
    waves,
)
from onnxprune.runtime.capture import capture
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


# ----------------------------------------------------------------------------------------------
# The fast path: one pass for the targets, the pruned model in segments, BLAS normal equations


def cut_vgg(model: onnx.ModelProto, removed: dict[str, list[int]]) -> tuple[gs.Graph, Any, np.ndarray]:
    """``model`` imported and cut (producer → channels): the graph, its analysis and the removed classes."""
    graph = gs.import_onnx(model)
    analysis = analyze_graph(graph, static_shapes(model, None))
    plan = Plan({g.id: np.array(removed[g.producers[0]]) for g in analysis.groups if g.producers[0] in removed})
    classes = plan.removed_classes(analysis)
    cut_channels(graph, analysis, classes)
    return graph, analysis, classes


def layer_matrix(model: onnx.ModelProto, node: str) -> np.ndarray:
    """``[W; b]`` of a Conv/Gemm as the ``K+1 × Cout`` matrix the solver works with (b = 0 without a bias)."""
    gnode = next(n for n in gs.import_onnx(model).nodes if n.name == node)
    view = linear_view(gnode)
    w = view.matrix(np.asarray(gnode.inputs[1].values))
    b = np.asarray(gnode.inputs[2].values, np.float64) if len(gnode.inputs) > 2 else np.zeros(w.shape[1])
    return np.vstack([w, b[None, :]])


def dense_refit(original: onnx.ModelProto, sliced: onnx.ModelProto, fixed: onnx.ModelProto, node: str,
                feeds: dict[str, np.ndarray], keep_out: np.ndarray, ridge: float) -> np.ndarray:
    """The ridge least-squares refit of ``node`` computed directly: every row, one dense ``lstsq``.

    Rows are the layer's input in the original and in the ``fixed`` model (whose inputs to ``node`` are final,
    upstream refits included), at every output position; the ridge pulls toward the ``sliced`` weights.
    """
    vo, vp = (linear_view(next(n for n in gs.import_onnx(m).nodes if n.name == node)) for m in (original, sliced))
    wb_o, w0 = layer_matrix(original, node), layer_matrix(sliced, node)
    x_o = capture(original, [vo.input], feeds, "cpu")[vo.input]
    x_p = capture(fixed, [vp.input], feeds, "cpu")[vp.input]
    pos = vo.positions(x_o.shape, 10**6, np.random.default_rng(0))  # all positions
    target = (np.hstack([vo.rows(x_o, pos), np.ones((len(pos), 1))]) @ wb_o)[:, keep_out]
    a = np.hstack([vp.rows(x_p, pos), np.ones((len(pos), 1))])
    lam = ridge * np.trace(a.T @ a) / a.shape[1]
    stacked = np.vstack([a, np.sqrt(lam) * np.eye(a.shape[1])])
    return np.linalg.lstsq(stacked, np.vstack([target, np.sqrt(lam) * w0]), rcond=None)[0]


@pytest.mark.parametrize("pads", [(0, 0, 0, 0), (1, 1, 1, 1), (2, 0, 1, 3), "SAME_UPPER", "SAME_LOWER", "VALID"])
def test_conv_feature_rows_match_the_padded_im2col(pads: tuple[int, int, int, int] | str) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 9, 11)).astype(np.float32)
    for kernel, strides, dilations in (((1, 1), (1, 1), (1, 1)), ((3, 3), (2, 2), (1, 1)), ((3, 2), (1, 3), (2, 1))):
        view = LinearView("c", "Conv", "x", "w", kernel=kernel, strides=strides, dilations=dilations, pads=pads)
        pos = view.positions(x.shape, 1000, rng)
        np.testing.assert_array_equal(feature_rows(view, x, pos), view.rows(x, pos))


def test_fast_path_equals_dense_least_squares_over_waves() -> None:
    """Three waves (conv2 → conv3 → fc1), all positions sampled: the weights written are the dense ridge solution,
    so the targets' single pass, the cached segments and the batched normal equations change nothing."""
    model = build_vgg(seed=4)
    removed = {"conv1": [0, 3], "conv2": [1, 5, 9], "conv3": [2]}
    graph, analysis, classes = cut_vgg(model, removed)
    sliced = export_graph(graph, model)
    source, _ = open_calibration(model, None, 256, {}, seed=3)
    ridge = 1e-2  # large enough that a wrong ridge term would show
    result = reconstruct(model, graph, analysis, classes, source, device="cpu", batch_size=32, positions=64,
                         ridge=ridge, tolerance=0.0)
    fixed = export_graph(graph, model)
    assert set(result.layers) == {"conv2", "conv3", "fc1"} and not result.notes
    feeds = {k: np.concatenate([b[k] for b in source.batches(32)]) for k in ("input",)}
    keep_out = {"conv2": np.delete(np.arange(16), [1, 5, 9]), "conv3": np.delete(np.arange(16), [2]),
                "fc1": np.arange(32)}
    for node in ("conv2", "conv3", "fc1"):
        want = dense_refit(model, sliced, fixed, node, feeds, keep_out[node], ridge)
        got = layer_matrix(fixed, node)
        assert np.abs(want - layer_matrix(sliced, node)).max() > 1e-2 * np.abs(want).max()  # the refit moved it
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max(), err_msg=node)


def test_each_wave_runs_only_its_segment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both models run in segments, one per wave and model, starting from the tensors earlier waves kept: each
    node runs in one wave only (about one pass over the data per model in all, not two full passes per wave)."""
    import onnxprune.runtime.capture as capture_module

    segments: list[list[str]] = []
    real = capture_module.iter_capture

    def spy(model: onnx.ModelProto, *args: Any, **kwargs: Any) -> Iterator[dict[str, np.ndarray]]:
        segments.append([n.name for n in model.graph.node])
        yield from real(model, *args, **kwargs)

    monkeypatch.setattr(capture_module, "iter_capture", spy)
    model = build_vgg()
    graph, analysis, classes = cut_vgg(model, {"conv1": [0], "conv2": [0], "conv3": [0], "fc1": [0]})
    source, _ = open_calibration(model, None, 64, {})
    result = reconstruct(model, graph, analysis, classes, source, device="cpu", batch_size=16)
    assert list(result.layers) == ["conv2", "conv3", "fc1", "fc2"]
    assert result.runs == 8 * 4  # 4 batches per segment
    everything = [n.name for n in model.graph.node]
    per_wave = [everything[:3], everything[3:7], everything[7:11], everything[11:13]]
    assert segments[0::2] == per_wave and segments[1::2] == per_wave  # original, then pruned, per wave
    assert set(result.timings) == {"run original", "targets", "run pruned", "accumulate", "solve"}


def test_cache_budget_falls_back_to_full_runs_with_the_same_result() -> None:
    model = build_vgg(seed=2)
    removed = {"conv1": [1, 2], "conv2": [3], "conv3": [0, 7]}
    weights = {}
    for budget in (2**30, 0):
        graph, analysis, classes = cut_vgg(model, removed)
        source, _ = open_calibration(model, None, 64, {}, seed=1)
        result = reconstruct(model, graph, analysis, classes, source, device="cpu", cache_bytes=budget)
        weights[budget] = {n: layer_matrix(export_graph(graph, model), n) for n in ("conv2", "conv3", "fc1")}
        assert any("re-ran the model from its inputs" in n for n in result.notes) == (budget == 0)
    for node, w in weights[0].items():
        np.testing.assert_allclose(w, weights[2**30][node], rtol=1e-6, atol=1e-7)


def test_layers_within_tolerance_keep_their_sliced_weights() -> None:
    """A cut channel conv2 barely reads (weights × 1e-3): the sliced weights already fit, so they are kept."""
    model = build_vgg(seed=1)
    w = next(t for t in model.graph.initializer if t.name == "conv2.weight")
    a = numpy_helper.to_array(w).copy()
    a[:, 4] *= 1e-3
    w.CopyFrom(numpy_helper.from_array(a, w.name))
    sliced = cut_and_refit(model, {"conv1": [4]}, refit=False)[0]
    kept, result = cut_and_refit(model, {"conv1": [4]})
    before, after = result.layers["conv2"]
    assert 0 < before < 1e-4 and after == before
    assert any("within tolerance" in n and "conv2" in n for n in result.notes)
    np.testing.assert_array_equal(layer_matrix(kept, "conv2"), layer_matrix(sliced, "conv2"))
    graph, analysis, classes = cut_vgg(model, {"conv1": [4]})
    source, _ = open_calibration(model, None, 512, {}, seed=3)
    refit = reconstruct(model, graph, analysis, classes, source, device="cpu", tolerance=0.0)
    assert refit.layers["conv2"][1] < before and not refit.notes


@pytest.mark.slow
def test_reconstruct_restores_the_recognizers_accuracy() -> None:
    """PP-OCRv4 rec at ratio 0.1 (l2): the cut alone cannot read text; reconstruction on 128 rendered lines
    brings the held-out character accuracy back near the original's (measured 99.4 → 0.0 → 99.3 at 256 lines)."""
    from onnxprune.importance.magnitude import lp_scores
    from onnxprune.io.load import load_model
    from onnxprune.planning.plan import keep_every_tensor
    from tests.tasks import ocr

    try:
        path = ocr.rec_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model = load_model(path).model
    graph = gs.import_onnx(model)
    analysis = analyze_graph(graph, static_shapes(model, None))
    scores = {g.id: lp_scores(ScoringContext(graph, analysis), g, 2) for g in analysis.groups if g.prunable}
    classes = keep_every_tensor(analysis, uniform(analysis, scores, 0.1), scores).removed_classes(analysis)
    cut_channels(graph, analysis, classes)
    plain = export_graph(graph, model)
    images, _ = ocr.make_rec_dataset(128, seed=0)
    held_out, texts = ocr.make_rec_dataset(64, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        calib = ocr.save_npz(Path(tmp) / "calib.npz", ocr.INPUT_NAME, images)
        source, _ = open_calibration(model, str(calib), 128, {})
        with threadpool_limits(2):
            result = reconstruct(model, graph, analysis, classes, source, device="cpu")
    assert len(result.layers) >= 15
    acc = {name: ocr.evaluate_rec(m, held_out, texts)["char_acc"]
           for name, m in (("plain", plain), ("fixed", export_graph(graph, model)))}
    assert acc["plain"] < 0.5 and acc["fixed"] > 0.9, acc
