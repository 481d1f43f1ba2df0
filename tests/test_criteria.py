"""Data-driven and BN criteria on small models where the right answer is known, plus the paper's claim on digits."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper
from threadpoolctl import threadpool_limits

from onnxprune.io.shapes import static_shapes
from onnxprune.planning.plan import uniform
from onnxprune.repair.calibration import CalibrationStats, calibrate, open_calibration
from onnxprune.errors import InvariantError
from onnxprune.analysis.core import Analysis
from onnxprune.analysis.driver import analyze_graph
from onnxprune.importance.base import Evidence, ScoringContext
from onnxprune.importance import default_criteria, score_groups
from onnxprune.importance.regression import lasso_scores, regression_scores
from onnxprune.pipeline import prune
from onnxprune.spec import PruneSpec
from tests.data import write_npz
from tests.models import build_mlp, build_resnet_basic, build_vgg, random_inputs, run, zero_channels


@pytest.fixture(autouse=True)
def _one_blas_thread() -> Iterator[None]:
    with threadpool_limits(1):
        yield


# ------------------------------------------------------------------------------------------------
# helpers


def scaled_copy(model: onnx.ModelProto, node_name: str, src: int, dst: int, scale: float) -> onnx.ModelProto:
    """Make output channel ``dst`` of producer ``node_name`` exactly ``scale`` × channel ``src`` (scale > 0).

    Handles Conv/Gemm(transB) weight rows and bias, MatMul columns with the bias Add after it, and a
    BatchNormalization right after (same γ and variance, mean and β scaled), so the copy survives BN and
    ReLU: relu(s·z) = s·relu(z).
    """
    model = copy.deepcopy(model)
    inits = {t.name: t for t in model.graph.initializer}

    def edit(name: str, fn: object) -> None:
        a = numpy_helper.to_array(inits[name]).copy()
        fn(a)  # type: ignore[operator]
        inits[name].CopyFrom(numpy_helper.from_array(a, name))

    node = next(n for n in model.graph.node if n.name == node_name)
    if node.op_type == "MatMul":
        edit(node.input[1], lambda a: a.__setitem__((slice(None), dst), scale * a[:, src]))
        follower = next(n for n in model.graph.node if node.output[0] in n.input)
        edit(follower.input[1], lambda a: a.__setitem__(dst, scale * a[src]))
        return model
    edit(node.input[1], lambda a: a.__setitem__(dst, scale * a[src]))
    if len(node.input) > 2:
        edit(node.input[2], lambda a: a.__setitem__(dst, scale * a[src]))
    bn = next((n for n in model.graph.node if node.output[0] in n.input and n.op_type == "BatchNormalization"), None)
    if bn is not None:
        for i, s in ((1, 1.0), (2, scale), (3, scale), (4, 1.0)):
            edit(bn.input[i], lambda a, s=s: a.__setitem__(dst, s * a[src]))
    return model


def scored(model: onnx.ModelProto, criterion: str, samples: int = 64) -> tuple[Analysis, dict[str, np.ndarray], list[str]]:
    """Scores per group (keyed by the group's first producer) after calibrating on random inputs."""
    graph = gs.import_onnx(model)
    analysis = analyze_graph(graph, static_shapes(model, None))
    registry = default_criteria()
    evidence = Evidence()
    if registry.needs[criterion]:
        source, what = open_calibration(model, None, samples, {})
        evidence.calibration = calibrate(model, graph, analysis, source, needs=registry.needs[criterion], device="cpu")
    ctx = ScoringContext(graph, analysis, evidence=evidence)
    scores = score_groups(ctx, criterion, registry)
    by_producer = {g.producers[0]: scores[g.id] for g in analysis.groups if g.id in scores}
    return analysis, by_producer, ctx.notes


def sigmoid_mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (8, 4)), ("b1", (8,)), ("w2", (3, 8)), ("b2", (3,)))]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Sigmoid", ["h"], ["s"], name="sig"),
             helper.make_node("Gemm", ["s", "w2", "b2"], ["y"], name="fc2", transB=1)]
    graph = helper.make_graph(nodes, "sig", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


# ------------------------------------------------------------------------------------------------
# APoZ and activation


def test_apoz_dead_channel_scores_zero_and_is_cut_first() -> None:
    model = zero_channels(build_mlp(seed=1), "fc1", [5])
    analysis, scores, notes = scored(model, "apoz")
    s = scores["fc1"]
    assert s[5] == 0.0  # APoZ 1.0
    assert (np.delete(s, 5) > 0).all() and not notes
    group = next(g for g in analysis.groups if g.producers == ["fc1"])
    plan = uniform(analysis, {group.id: s}, 1 / 32)
    assert plan.removed[group.id].tolist() == [5]


def test_activation_dead_channel_lowest() -> None:
    model = zero_channels(build_mlp(seed=1), "fc1", [9])
    _, scores, notes = scored(model, "activation")
    assert scores["fc1"][9] == 0.0 and int(np.argmin(scores["fc1"])) == 9
    assert (np.delete(scores["fc1"], 9) > 0).all() and not notes


def test_apoz_without_relu_falls_back_to_l2_and_says_so() -> None:
    model = sigmoid_mlp()
    _, scores, notes = scored(model, "apoz")
    _, l2, _ = scored(model, "l2")
    np.testing.assert_allclose(scores["fc1"], l2["fc1"])
    assert notes == ["apoz: group 0 (fc1) has no ReLU-like activation on any channels; scored by l2"]


def test_apoz_counts_relu6_clip() -> None:
    from tests.models import build_mobilenetv2

    _, _, notes = scored(build_mobilenetv2(), "apoz")
    assert not any("stem" in n or "expand" in n for n in notes)


def test_missing_calibration_is_an_invariant_error() -> None:
    model = build_mlp()
    graph = gs.import_onnx(model)
    analysis = analyze_graph(graph, static_shapes(model, None))
    with pytest.raises(InvariantError, match="needs calibration statistics"):
        score_groups(ScoringContext(graph, analysis), "apoz")


# ------------------------------------------------------------------------------------------------
# bn-scale


def test_bn_scale_ranks_by_abs_gamma() -> None:
    model = build_vgg(seed=2)
    gamma = np.array([0.9, -0.05, 1.3, 0.4, -1.1, 0.02, 0.7, -0.3, 1.0, 0.6, -0.8, 0.2, 1.2, 0.1, -0.5, 1.5], np.float32)
    init = next(t for t in model.graph.initializer if t.name == "conv2.bn.weight")
    init.CopyFrom(numpy_helper.from_array(gamma, "conv2.bn.weight"))
    analysis, scores, notes = scored(model, "bn-scale")
    assert notes == ["bn-scale: group 3 (fc1): no BatchNormalization follows; scored by l2"]
    np.testing.assert_allclose(scores["conv2"], np.abs(gamma) / np.abs(gamma).mean(), rtol=1e-6)
    group = next(g for g in analysis.groups if g.producers == ["conv2"])
    plan = uniform(analysis, {group.id: scores["conv2"]}, 0.25)
    assert plan.removed[group.id].tolist() == sorted(np.argsort(np.abs(gamma))[:4].tolist())


def test_bn_scale_residual_group_uses_both_bns() -> None:
    _, scores, notes = scored(build_resnet_basic(), "bn-scale")
    assert not notes and len(scores) >= 3 and all((s > 0).all() for s in scores.values())


def test_bn_scale_without_bn_falls_back_to_l2() -> None:
    model = build_mlp()
    _, scores, notes = scored(model, "bn-scale")
    _, l2, _ = scored(model, "l2")
    for name in scores:
        np.testing.assert_allclose(scores[name], l2[name])
    assert "bn-scale: group 0 (fc1): no BatchNormalization follows; scored by l2" in notes


# ------------------------------------------------------------------------------------------------
# regression (LASSO)


def test_lasso_scores_order_by_entry_and_drop_collinear() -> None:
    z = np.random.default_rng(0).standard_normal((200, 3))
    z = np.hstack([z, 0.5 * z[:, :1]])  # column 3 is collinear with column 0
    z[:, 1] *= 0.1  # small contribution enters late
    s = lasso_scores(z.T @ z)
    assert s[3] < 1 <= min(s[:3])  # never enters the path
    assert s[1] == min(s[:3])


@pytest.mark.parametrize("builder,producer,src,dst", [
    (build_mlp, "fc1", 2, 7),
    (build_vgg, "conv2", 3, 11),
])
def test_regression_cuts_a_scaled_copy_first(builder: object, producer: str, src: int, dst: int) -> None:
    model = scaled_copy(builder(seed=4), producer, src, dst, 0.4)  # type: ignore[operator]
    _, scores, notes = scored(model, "regression", samples=128)
    assert not notes
    s = scores[producer]
    assert int(np.argmin(s)) == dst and s[dst] < np.delete(s, dst).min()


def test_regression_copy_cut_and_reconstructed_leaves_outputs_unchanged(tmp_path: Path) -> None:
    model = scaled_copy(build_mlp(seed=4), "fc1", 2, 7, 0.4)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    spec = PruneSpec(ratio=0.04, criterion="regression", calib_samples=256, device="cpu")  # 1 of fc1's 32, none of fc2's 24
    feeds = random_inputs(model, batch=64, seed=9)
    want = run(model, feeds)["output"]
    for reconstruct in (False, True):
        spec.reconstruct = reconstruct
        report = prune(src, tmp_path / "o.onnx", spec).report
        assert [g["kept"] for g in report["groups"] if g["producers"] == ["fc1"]] == [31]
        got = run(onnx.load(tmp_path / "o.onnx"), feeds)["output"]
        err = np.abs(got - want).max() / np.abs(want).max()
        if reconstruct:
            assert err < 1e-4, err
            assert report["reconstruct"]["fc2"]["error_after"] < 1e-8
        else:
            assert err > 1e-2  # the cut alone does change the output


def test_regression_without_consumers_falls_back() -> None:
    model = build_mlp()
    graph = gs.import_onnx(model)
    analysis = analyze_graph(graph, static_shapes(model, None))
    ctx = ScoringContext(graph, analysis, evidence=Evidence(calibration=CalibrationStats(0, "", "cpu")))
    group = analysis.groups[0]
    np.testing.assert_allclose(regression_scores(ctx, group), score_groups(ctx, "l2")[group.id])
    assert "has no sampled Conv/Gemm/MatMul consumer; scored by l2" in ctx.notes[0]


# ------------------------------------------------------------------------------------------------
# The paper's claim on the trained digits CNN (He et al. 2017, no fine-tuning)

FLOOR = 0.95
"""Held-out accuracy floor for regression + reconstruct at 50 %, 512 calibration samples: measured 0.984
(l2 alone 0.100, l2 + reconstruct 0.984, original 0.991; see benchmarks/bench_criteria.py)."""


def _accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    logits = run(onnx.load(path), {"input": x})["logits"]
    return float((logits.argmax(axis=1) == y).mean())


@pytest.mark.slow
def test_regression_with_reconstruction_beats_l2_on_digits(tmp_path: Path, digits_model_path: Path,
                                                            digits: tuple) -> None:
    x_train, y_train, x_test, y_test = digits
    calib = write_npz(tmp_path / "train.npz", x_train, y_train)
    acc = {}
    for name, spec in {
        "l2": PruneSpec(ratio=0.5, criterion="l2", device="cpu"),
        "regression+reconstruct": PruneSpec(ratio=0.5, criterion="regression", reconstruct=True, calib=str(calib),
                                            calib_samples=512, device="cpu"),
    }.items():
        prune(digits_model_path, tmp_path / f"{name}.onnx", spec)
        acc[name] = _accuracy(tmp_path / f"{name}.onnx", x_test, y_test)
    assert acc["regression+reconstruct"] >= acc["l2"], acc
    assert acc["regression+reconstruct"] >= FLOOR, acc
