"""Magnitude criteria: the textbook element-wise example and per-channel scores with known answers."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

from onnxprune.io.shapes import static_shapes
from onnxprune.analysis.driver import analyze_graph
from onnxprune.importance.base import ScoringContext
from onnxprune.importance import default_criteria, score_groups
from onnxprune.importance.magnitude import elementwise_magnitude_mask


def test_textbook_elementwise_example() -> None:
    w = np.array([-2.0, 3.0, -5.0, 1.0])
    np.testing.assert_array_equal(w * elementwise_magnitude_mask(w, 0.5), [0.0, 3.0, -5.0, 0.0])
    assert elementwise_magnitude_mask(w, 0.0).all()


def _two_gemms(w1: np.ndarray, w2: np.ndarray) -> tuple[gs.Graph, object]:
    """x[N,3] → Gemm(w1: 3×4) → Relu → Gemm(w2: 4×2): one prunable group of 4 channels."""
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["a"]),
         helper.make_node("Gemm", ["a", "w2"], ["y"], name="fc2")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(w1.astype(np.float32), "w1"), numpy_helper.from_array(w2.astype(np.float32), "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    g = gs.import_onnx(model)
    return g, analyze_graph(g, static_shapes(model, None))


def test_l1_l2_aggregate_producer_rows_and_consumer_columns() -> None:
    w1 = np.array([[1.0, 2.0, 0.0, 3.0], [1.0, 2.0, 0.0, 0.0], [1.0, 2.0, 0.0, 0.0]])  # column j = channel j
    w2 = np.array([[4.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 2.0]])  # row j = channel j
    g, a = _two_gemms(w1, w2)
    group = next(gr for gr in a.groups if gr.prunable)
    ctx = ScoringContext(g, a)
    l1 = score_groups(ctx, "l1")[group.id]
    # per tensor: norms / mean norm; channel score = mean over the two tensors
    prod = np.array([3.0, 6.0, 0.0, 3.0]); cons = np.array([4.0, 2.0, 0.0, 2.0])
    np.testing.assert_allclose(l1, (prod / prod.mean() + cons / cons.mean()) / 2)
    l2 = score_groups(ctx, "l2")[group.id]
    prod2 = np.sqrt([3.0, 12.0, 0.0, 9.0]); cons2 = np.sqrt([16.0, 2.0, 0.0, 4.0])
    np.testing.assert_allclose(l2, (prod2 / prod2.mean() + cons2 / cons2.mean()) / 2)
    assert np.argmin(l2) == 2


def test_random_is_seeded_and_registry_rejects_duplicates() -> None:
    g, a = _two_gemms(np.ones((3, 4)), np.ones((4, 2)))
    first = score_groups(ScoringContext(g, a, seed=3), "random")
    again = score_groups(ScoringContext(g, a, seed=3), "random")
    other = score_groups(ScoringContext(g, a, seed=4), "random")
    gid = next(iter(first))
    np.testing.assert_array_equal(first[gid], again[gid])
    assert not np.array_equal(first[gid], other[gid])
    reg = default_criteria()
    try:
        reg.register("l2", lambda ctx, grp: np.zeros(grp.size))
    except ValueError as e:
        assert "already registered" in str(e)
    else:
        raise AssertionError("duplicate registration must fail")
