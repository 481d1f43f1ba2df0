"""Numerical gradient check of every VJP rule (float64 central differences, then float32 on onnxruntime)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import UnsupportedOpError
from onnxprune.training.grad.context import VJPRegistry
from onnxprune.training.grad.driver import build_gradients
from onnxprune.training.grad.rules import default_registry
from onnxprune.training.gradcheck import check_gradients

RNG = np.random.default_rng(1234)
TOL64 = 1e-6
TOL32 = 2e-3  # float32 graph on onnxruntime vs float64 analytic


def _op_model(
    op: str,
    floats: dict[str, np.ndarray],
    consts: dict[str, np.ndarray] | None = None,
    order: list[str] | None = None,
    n_out: int = 1,
    opset: int = 17,
    **attrs: object,
) -> onnx.ModelProto:
    """One-node model: ``floats`` are graph inputs, ``consts`` initializers, ``order`` the input list."""
    consts = consts or {}
    names = order or list(floats) + list(consts)
    outs = [f"y{i}" for i in range(n_out)]
    node = helper.make_node(op, names, outs, name=f"{op.lower()}_node", **attrs)
    inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape)) for k, v in floats.items()]
    inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    inferred = onnx.shape_inference.infer_shapes(model)
    del model.graph.output[:]
    known = {vi.name: vi for vi in inferred.graph.value_info} | {vi.name: vi for vi in inferred.graph.output}
    model.graph.output.extend(known[o] for o in outs)
    return model


def _check(model: onnx.ModelProto, feeds: dict[str, np.ndarray], wrt: list[str], tol64: float = TOL64, tol32: float = TOL32) -> None:
    res = check_gradients(model, feeds, wrt)
    assert res.max_rel_err < tol64, f"float64 rel err {res.max_rel_err:.2e}"
    assert res.max_rel_err_ort32 < tol32, f"onnxruntime float32 rel err {res.max_rel_err_ort32:.2e}"


def r(*shape: int, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    return RNG.uniform(low, high, shape).astype(np.float32)


def away_from(x: np.ndarray, kinks: list[float], margin: float = 0.05) -> np.ndarray:
    """Nudge values off non-differentiable points so central differences stay valid."""
    x = x.copy()
    for k in kinks:
        close = np.abs(x - k) < margin
        x[close] = k + margin * np.sign(x[close] - k + 1e-9) * 2
    return x


# ------------------------------------------------------------------------------ elementwise binary
@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div"])
@pytest.mark.parametrize("sa,sb", [((2, 3, 4), (2, 3, 4)), ((2, 3, 4), (4,)), ((2, 1, 4), (3, 1)), ((1,), (2, 3))])
def test_binary_broadcast(op: str, sa: tuple[int, ...], sb: tuple[int, ...]) -> None:
    a, b = r(*sa), r(*sb)
    if op == "Div":
        b = np.sign(b) * (np.abs(b) + 0.5)
    _check(_op_model(op, {"a": a, "b": b}), {"a": a, "b": b}, ["a", "b"])


def test_binary_symbolic_batch_dynamic_reduce() -> None:
    """Symbolic dims on both sides force the run-time axis search in reduce_to."""
    a, b = r(2, 3), r(1, 3)
    node = helper.make_node("Mul", ["a", "b"], ["y0"])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 3]),
                                       helper.make_tensor_value_info("b", TensorProto.FLOAT, ["m", 3])],
                          [helper.make_tensor_value_info("y0", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    _check(m, {"a": a, "b": b}, ["a", "b"])


# ------------------------------------------------------------------------------ unary activations
@pytest.mark.parametrize("op,attrs,kinks", [
    ("Relu", {}, [0.0]), ("LeakyRelu", {"alpha": 0.1}, [0.0]), ("Sigmoid", {}, []), ("Tanh", {}, []),
    ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, [-4 / 3, 2.0]), ("HardSwish", {}, [-3.0, 3.0]),
    ("Erf", {}, []), ("Exp", {}, []), ("Neg", {}, []), ("Abs", {}, [0.0]), ("Softplus", {}, []),
    ("Identity", {}, []),
])
def test_unary(op: str, attrs: dict, kinks: list[float]) -> None:
    x = away_from(r(2, 3, 5, low=-4, high=4), kinks)
    _check(_op_model(op, {"x": x}, **attrs), {"x": x}, ["x"])


@pytest.mark.parametrize("op", ["Log", "Sqrt", "Reciprocal"])
def test_unary_positive(op: str) -> None:
    x = r(3, 4, low=0.5, high=2.0)
    _check(_op_model(op, {"x": x}), {"x": x}, ["x"])


def test_dropout_is_identity() -> None:
    x = r(2, 6)
    _check(_op_model("Dropout", {"x": x}), {"x": x}, ["x"])


def test_clip_inputs() -> None:
    x = away_from(r(3, 7, low=-2, high=2), [-0.5, 0.7])
    consts = {"lo": np.array(-0.5, np.float32), "hi": np.array(0.7, np.float32)}
    _check(_op_model("Clip", {"x": x}, consts), {"x": x}, ["x"])
    _check(_op_model("Clip", {"x": x}, {"hi": consts["hi"]}, order=["x", "", "hi"]), {"x": x}, ["x"])


def test_pow_cast_where_expand() -> None:
    x = r(2, 3, low=0.5, high=1.5)
    _check(_op_model("Pow", {"x": x}, {"p": np.array(2.5, np.float32)}), {"x": x}, ["x"])
    p = r(3, low=0.5, high=2.0)
    _check(_op_model("Pow", {"x": x, "p": p}), {"x": x, "p": p}, ["x", "p"])
    c = np.array([[True, False, True]])
    a, b = r(2, 3), r(3)
    _check(_op_model("Where", {"a": a, "b": b}, {"c": c}, order=["c", "a", "b"]), {"a": a, "b": b}, ["a", "b"])
    _check(_op_model("Expand", {"x": r(3, 1)}, {"s": np.array([2, 3, 4], np.int64)}), {"x": r(3, 1)}, ["x"])
    _check(_op_model("Cast", {"x": x}, to=TensorProto.FLOAT), {"x": x}, ["x"])


def test_prelu() -> None:
    x, s = away_from(r(2, 3, 4), [0.0]), r(3, 1, low=0.1, high=0.5)
    _check(_op_model("PRelu", {"x": x, "s": s}), {"x": x, "s": s}, ["x", "s"])


# ------------------------------------------------------------------------------ softmax family
@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("axis", [-1, 1])
def test_softmax(op: str, axis: int) -> None:
    x = r(2, 4, 3, low=-2, high=2)
    _check(_op_model(op, {"x": x}, axis=axis), {"x": x}, ["x"])


# ------------------------------------------------------------------------------ normalisation
def test_batch_norm_inference() -> None:
    x, s, b = r(2, 3, 4, 5), r(3, low=0.5, high=1.5), r(3)
    consts = {"mean": r(3), "var": r(3, low=0.5, high=2.0)}
    m = _op_model("BatchNormalization", {"x": x, "s": s, "b": b}, consts, epsilon=1e-3)
    _check(m, {"x": x, "s": s, "b": b}, ["x", "s", "b"])


@pytest.mark.parametrize("axis", [-1, 1])
def test_layer_norm(axis: int) -> None:
    x = r(2, 3, 4)
    pshape = (4,) if axis == -1 else (3, 4)
    s, b = r(*pshape, low=0.5, high=1.5), r(*pshape)
    m = _op_model("LayerNormalization", {"x": x, "s": s, "b": b}, axis=axis, epsilon=1e-5)
    _check(m, {"x": x, "s": s, "b": b}, ["x", "s", "b"], tol64=1e-5)


# ------------------------------------------------------------------------------ linear algebra
@pytest.mark.parametrize("sa,sb", [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((2, 1, 3, 4), (3, 4, 2)), ((4,), (2, 4, 3)), ((2, 3, 4), (4,))])
def test_matmul_batched(sa: tuple[int, ...], sb: tuple[int, ...]) -> None:
    a, b = r(*sa), r(*sb)
    _check(_op_model("MatMul", {"a": a, "b": b}), {"a": a, "b": b}, ["a", "b"])


@pytest.mark.parametrize("ta", [0, 1])
@pytest.mark.parametrize("tb", [0, 1])
@pytest.mark.parametrize("cshape", [(5,), (3, 5), (1, 1)])
def test_gemm(ta: int, tb: int, cshape: tuple[int, ...]) -> None:
    a = r(4, 3) if ta else r(3, 4)
    b = r(5, 4) if tb else r(4, 5)
    c = r(*cshape)
    m = _op_model("Gemm", {"a": a, "b": b, "c": c}, transA=ta, transB=tb, alpha=0.7, beta=1.3)
    _check(m, {"a": a, "b": b, "c": c}, ["a", "b", "c"])


# ------------------------------------------------------------------------------ convolution
@pytest.mark.parametrize("cfg", [
    dict(x=(2, 3, 7, 7), w=(4, 3, 3, 3), attrs={}),
    dict(x=(2, 4, 9, 8), w=(6, 2, 3, 2), attrs={"group": 2, "strides": [2, 3], "pads": [1, 0, 2, 1]}),
    dict(x=(1, 4, 8, 8), w=(4, 1, 3, 3), attrs={"group": 4, "pads": [1, 1, 1, 1], "strides": [2, 2]}),
    dict(x=(2, 2, 9, 9), w=(3, 2, 3, 3), attrs={"dilations": [2, 2], "strides": [2, 1], "pads": [0, 2, 1, 0]}),
    dict(x=(1, 2, 7, 6), w=(2, 2, 3, 3), attrs={"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    dict(x=(2, 3, 10), w=(4, 3, 3), attrs={"strides": [3], "pads": [1, 1]}),
    dict(x=(2, 3, 5, 5), w=(4, 3, 1, 1), attrs={}),
])
def test_conv(cfg: dict) -> None:
    x, w, b = r(*cfg["x"]), r(*cfg["w"]), r(cfg["w"][0])
    m = _op_model("Conv", {"x": x, "w": w, "b": b}, **cfg["attrs"])
    _check(m, {"x": x, "w": w, "b": b}, ["x", "w", "b"])


@pytest.mark.parametrize("cfg", [
    dict(x=(2, 3, 4, 4), w=(3, 2, 3, 3), attrs={}),
    dict(x=(1, 4, 3, 4), w=(4, 3, 3, 2), attrs={"group": 2, "strides": [2, 3], "pads": [1, 0, 0, 1], "output_padding": [1, 2]}),
    dict(x=(2, 2, 4, 3), w=(2, 2, 2, 3), attrs={"dilations": [2, 1], "strides": [2, 2], "pads": [1, 1, 0, 1]}),
    dict(x=(1, 2, 3, 3), w=(2, 3, 3, 3), attrs={"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
])
def test_conv_transpose(cfg: dict) -> None:
    x, w, b = r(*cfg["x"]), r(*cfg["w"]), r(cfg["w"][1] * cfg["attrs"].get("group", 1))
    m = _op_model("ConvTranspose", {"x": x, "w": w, "b": b}, **cfg["attrs"])
    _check(m, {"x": x, "w": w, "b": b}, ["x", "w", "b"])


def test_sum_variadic_broadcast() -> None:
    a, b, c = r(2, 3), r(3), r(1, 1)
    _check(_op_model("Sum", {"a": a, "b": b, "c": c}), {"a": a, "b": b, "c": c}, ["a", "b", "c"])


# ------------------------------------------------------------------------------ pooling
@pytest.mark.parametrize("attrs", [
    {"kernel_shape": [2, 2], "strides": [2, 2]},
    {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]},
    {"kernel_shape": [3, 2], "strides": [2, 1], "pads": [1, 0, 0, 1], "ceil_mode": 1},
])
def test_max_pool(attrs: dict) -> None:
    x = RNG.permutation(2 * 3 * 7 * 6).reshape(2, 3, 7, 6).astype(np.float32) / 50.0  # distinct: no ties
    _check(_op_model("MaxPool", {"x": x}, **attrs), {"x": x}, ["x"])


@pytest.mark.parametrize("shape,kernel", [((2, 3, 8, 6), [2, 2]), ((2, 2, 6, 6), [3, 2]), ((2, 3, 8), [4])])
def test_max_pool_tiled_fast_path(shape: tuple[int, ...], kernel: list[int]) -> None:
    x = RNG.permutation(int(np.prod(shape))).reshape(shape).astype(np.float32) / 50.0
    m = _op_model("MaxPool", {"x": x}, kernel_shape=kernel, strides=kernel)
    res = build_gradients(m, "y0", ["x"])
    assert "ScatterElements" not in {n.op_type for n in res.model.graph.node}  # took the tiled path
    _check(m, {"x": x}, ["x"])


def test_max_pool_tied_maxima_share_the_gradient() -> None:
    """ReLU outputs often tie at 0 inside a window: the window's gradient is split, not duplicated."""
    x = np.zeros((1, 1, 2, 2), np.float32)
    m = _op_model("MaxPool", {"x": x}, kernel_shape=[2, 2], strides=[2, 2])
    from onnxprune.training.gradcheck import with_linear_loss
    import onnxruntime as ort

    res = build_gradients(with_linear_loss(m, {"y0": (1, 1, 1, 1)}), "gc_loss", ["x"])
    sess = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"])
    grad = sess.run([res.grads["x"]], {"x": x, "gc_weight/y0": np.ones((1, 1, 1, 1), np.float32)})[0]
    assert grad.sum() == pytest.approx(1.0) and np.allclose(grad, 0.25)


def test_max_pool_with_indices_used() -> None:
    x = RNG.permutation(2 * 2 * 4 * 4).reshape(2, 2, 4, 4).astype(np.float32)
    _check(_op_model("MaxPool", {"x": x}, n_out=2, kernel_shape=[2, 2], strides=[2, 2]), {"x": x}, ["x"])


@pytest.mark.parametrize("attrs", [
    {"kernel_shape": [2, 2], "strides": [2, 2]},
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1},
    {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [1, 0, 0, 0], "ceil_mode": 1},
])
def test_average_pool(attrs: dict) -> None:
    x = r(2, 3, 7, 6)
    _check(_op_model("AveragePool", {"x": x}, **attrs), {"x": x}, ["x"])


def test_global_average_pool() -> None:
    x = r(2, 3, 4, 5)
    _check(_op_model("GlobalAveragePool", {"x": x}), {"x": x}, ["x"])


# ------------------------------------------------------------------------------ reductions
@pytest.mark.parametrize("op", ["ReduceMean", "ReduceSum"])
@pytest.mark.parametrize("axes,keep", [([1], 1), ([-1, 0], 0), (None, 0)])
def test_reduce_axes_input(op: str, axes: list[int] | None, keep: int) -> None:
    x = r(2, 3, 4)
    consts = {} if axes is None else {"axes": np.array(axes, np.int64)}
    _check(_op_model(op, {"x": x}, consts, opset=18, keepdims=keep), {"x": x}, ["x"])


def test_reduce_mean_axes_attribute() -> None:
    x = r(2, 3, 4)
    _check(_op_model("ReduceMean", {"x": x}, axes=[2], keepdims=0), {"x": x}, ["x"])


# ------------------------------------------------------------------------------ shape ops
def test_shape_ops() -> None:
    x = r(2, 3, 4)
    _check(_op_model("Flatten", {"x": x}, axis=2), {"x": x}, ["x"])
    _check(_op_model("Reshape", {"x": x}, {"s": np.array([4, -1], np.int64)}), {"x": x}, ["x"])
    _check(_op_model("Transpose", {"x": x}, perm=[2, 0, 1]), {"x": x}, ["x"])
    _check(_op_model("Transpose", {"x": x}), {"x": x}, ["x"])
    _check(_op_model("Unsqueeze", {"x": x}, {"a": np.array([0, 3], np.int64)}), {"x": x}, ["x"])
    y = r(2, 1, 4)
    _check(_op_model("Squeeze", {"y": y}, {"a": np.array([1], np.int64)}), {"y": y}, ["y"])


def test_concat_split() -> None:
    a, b, c = r(2, 3, 4), r(2, 1, 4), r(2, 2, 4)
    _check(_op_model("Concat", {"a": a, "b": b, "c": c}, axis=1), {"a": a, "b": b, "c": c}, ["a", "c"])
    x = r(2, 6, 3)
    _check(_op_model("Split", {"x": x}, {"s": np.array([1, 3, 2], np.int64)}, n_out=3, axis=1), {"x": x}, ["x"])
    # an unused Split output gets zeros
    m = _op_model("Split", {"x": x}, n_out=2, axis=1, opset=18, num_outputs=2)
    del m.graph.output[1]
    _check(m, {"x": x}, ["x"])


@pytest.mark.parametrize("starts,ends,axes,steps", [
    ([1], [3], [1], [1]), ([0, -1], [2, -6], [2, 1], [2, -2]), ([1, 0], [100, 4], [0, 2], [1, 3]),
])
def test_slice(starts: list[int], ends: list[int], axes: list[int], steps: list[int]) -> None:
    x = r(3, 5, 6)
    consts = {k: np.array(v, np.int64) for k, v in dict(s=starts, e=ends, a=axes, t=steps).items()}
    _check(_op_model("Slice", {"x": x}, consts), {"x": x}, ["x"])


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_pad(mode: str) -> None:
    x = r(2, 3, 4, 5)
    pads = np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)
    consts = {"p": pads}
    if mode == "constant":
        consts["v"] = np.array(0.5, np.float32)
    _check(_op_model("Pad", {"x": x}, consts, mode=mode), {"x": x}, ["x"])


@pytest.mark.parametrize("attrs,scales", [
    ({"mode": "nearest"}, [1, 1, 2, 2]),
    ({"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}, [1, 1, 2, 3]),
    ({"mode": "linear"}, [1, 1, 2, 2]),
    ({"mode": "linear", "coordinate_transformation_mode": "align_corners"}, [1, 1, 1.5, 2]),
    ({"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}, [1, 1, 0.5, 2]),
])
def test_resize(attrs: dict, scales: list[float]) -> None:
    x = r(1, 2, 4, 4)
    consts = {"roi": np.array([], np.float32), "sc": np.array(scales, np.float32)}
    _check(_op_model("Resize", {"x": x}, consts, order=["x", "roi", "sc"], **attrs), {"x": x}, ["x"])


def test_gather_embedding_duplicates() -> None:
    table = r(6, 4)
    ids = np.array([[1, 3, 1], [-1, 0, 3]], np.int64)
    _check(_op_model("Gather", {"t": table}, {"i": ids}), {"t": table}, ["t"])
    _check(_op_model("Gather", {"t": table}, {"i": np.array([2, 2, 0], np.int64)}, axis=1), {"t": table}, ["t"])


def test_gather_elements() -> None:
    x = r(3, 4)
    idx = np.array([[0, 2], [1, 1], [3, 0]], np.int64)
    _check(_op_model("GatherElements", {"x": x}, {"i": idx}, axis=1), {"x": x}, ["x"])


# ------------------------------------------------------------------------------ less common ops
@pytest.mark.parametrize("op,attrs,opset", [
    ("Elu", {"alpha": 0.7}, 17), ("Selu", {}, 17), ("Gelu", {}, 20), ("Gelu", {"approximate": "tanh"}, 20),
])
def test_more_activations(op: str, attrs: dict, opset: int) -> None:
    x = away_from(r(2, 3, 4, low=-3, high=3), [0.0])
    _check(_op_model(op, {"x": x}, opset=opset, **attrs), {"x": x}, ["x"])


@pytest.mark.parametrize("op", ["ReduceMax", "ReduceMin"])
@pytest.mark.parametrize("keep", [0, 1])
def test_reduce_extreme(op: str, keep: int) -> None:
    x = RNG.permutation(24).reshape(2, 3, 4).astype(np.float32) / 10  # distinct: no ties
    _check(_op_model(op, {"x": x}, {"axes": np.array([1, -1], np.int64)}, opset=18, keepdims=keep), {"x": x}, ["x"])


def test_global_max_pool_and_elementwise_max_min_mean() -> None:
    x = RNG.permutation(2 * 3 * 16).reshape(2, 3, 4, 4).astype(np.float32) / 10
    _check(_op_model("GlobalMaxPool", {"x": x}), {"x": x}, ["x"])
    a, b, c = r(2, 3), r(3) + 0.01, r(2, 1) - 0.01
    for op in ("Max", "Min", "Mean"):
        _check(_op_model(op, {"a": a, "b": b, "c": c}), {"a": a, "b": b, "c": c}, ["a", "b", "c"])


def test_instance_norm() -> None:
    x, s, b = r(2, 3, 4, 5), r(3, low=0.5, high=1.5), r(3)
    _check(_op_model("InstanceNormalization", {"x": x, "s": s, "b": b}, epsilon=1e-4), {"x": x, "s": s, "b": b},
           ["x", "s", "b"], tol64=1e-5)


@pytest.mark.parametrize("size", [3, 5])  # onnxruntime only runs odd sizes
def test_lrn(size: int) -> None:
    x = r(2, 6, 3, 3)
    _check(_op_model("LRN", {"x": x}, size=size, alpha=0.3, beta=0.75, bias=1.5), {"x": x}, ["x"], tol64=1e-5)


def test_tile() -> None:
    x = r(2, 3)
    _check(_op_model("Tile", {"x": x}, {"reps": np.array([2, 3], np.int64)}), {"x": x}, ["x"])


# ------------------------------------------------------------------------------ driver behaviour
def test_registry_rejects_duplicates_and_missing_rule_names_node() -> None:
    reg = VJPRegistry()
    reg.register("Relu", lambda ctx, node, g: [g[0]])
    with pytest.raises(ValueError, match="already registered"):
        reg.register("Relu", lambda ctx, node, g: [g[0]])
    x = r(2, 3)
    m = _op_model("Mul", {"x": x}, {"k": r(3)})
    with pytest.raises(UnsupportedOpError) as err:
        build_gradients(m, "y0", ["x"], registry=reg)
    assert err.value.op_type == "Mul" and err.value.node == "mul_node"
    assert "mul_node" in str(err.value)


def test_default_registry_is_a_fresh_object_each_call() -> None:
    reg = default_registry()
    reg.register("MyOp", lambda ctx, node, g: [g[0]])
    assert "MyOp" in reg and "MyOp" not in default_registry()


def test_rule_families_import_only_the_context_and_shared_helpers() -> None:
    """Rules never import the driver or the package front, so the driver can import them without a circle."""
    import onnxprune.training.grad.rules as rules

    allowed = {
        "onnxprune.errors", "onnxprune.training.grad.context",
        "onnxprune.training.grad.rules._common", "onnxprune.training.grad.rules._window",
    }
    found: dict[str, list[str]] = {}
    for path in sorted(Path(rules.__file__).parent.glob("*.py")):
        if path.name == "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                ["." * node.level + (node.module or "")] if isinstance(node, ast.ImportFrom) else [])
            found[path.name] = found.get(path.name, []) + [n for n in names if n.startswith(("onnxprune", "."))]
    assert {name: [m for m in mods if m not in allowed] for name, mods in found.items()} == {
        name: [] for name in found
    }
    assert len(found) >= 9  # every family file was read


def test_every_issue_op_has_a_rule() -> None:
    reg = default_registry()
    required = """Conv Gemm MatMul Add Sub Mul Div Relu LeakyRelu Clip Sigmoid HardSigmoid HardSwish Tanh Erf Softmax
    LogSoftmax BatchNormalization LayerNormalization MaxPool AveragePool GlobalAveragePool ReduceMean Flatten Reshape
    Transpose Concat Split Slice Squeeze Unsqueeze Pad Resize Identity Dropout Gather""".split()
    assert [op for op in required if op not in reg] == []


# ------------------------------------------------------------------------------ decoder LM patterns
def _chain(nodes: list[onnx.NodeProto], floats: dict[str, np.ndarray], consts: dict[str, np.ndarray],
           out_shape: list[int], opset: int = 17) -> onnx.ModelProto:
    """A small graph reading ``floats`` (inputs) and ``consts`` (initializers), with output ``y0``."""
    inputs = [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape)) for k, v in floats.items()]
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y0", TensorProto.FLOAT, out_shape)],
                          [numpy_helper.from_array(v, k) for k, v in consts.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 9
    return m


@pytest.mark.parametrize("op", ["Sin", "Cos"])
def test_sin_cos(op: str) -> None:
    x = r(2, 3, 5, low=-4, high=4)
    _check(_op_model(op, {"x": x}), {"x": x}, ["x"])


@pytest.mark.parametrize("upper,k", [(0, None), (1, 1), (0, -1)])
def test_trilu(upper: int, k: int | None) -> None:
    x = r(2, 4, 5)
    consts = {"k": np.array(k, np.int64)} if k is not None else {}
    _check(_op_model("Trilu", {"x": x}, consts, upper=upper), {"x": x}, ["x"])


@pytest.mark.parametrize("fill", [-np.inf, np.finfo(np.float32).min])
def test_causal_masked_softmax_has_finite_gradients(fill: float) -> None:
    """Scores masked by an additive -inf/finfo.min triangle or by Where: masked entries get exactly zero gradient."""
    import onnxruntime as ort

    from onnxprune.training.gradcheck import with_linear_loss

    t = 4
    causal = np.triu(np.ones((t, t), bool), 1)
    add_mask = np.where(causal, np.float32(fill), np.float32(0)).astype(np.float32)
    x = r(2, 3, t, t, low=-3, high=3)
    added = _chain([helper.make_node("Add", ["x", "mask"], ["s"]), helper.make_node("Softmax", ["s"], ["y0"], axis=-1)],
                   {"x": x}, {"mask": add_mask}, [2, 3, t, t])
    where = _chain([helper.make_node("Where", ["keep", "x", "fill"], ["s"]),
                    helper.make_node("Softmax", ["s"], ["y0"], axis=-1)],
                   {"x": x}, {"keep": ~causal, "fill": np.array(fill, np.float32)}, [2, 3, t, t])
    for m in (added, where):
        _check(m, {"x": x}, ["x"])
        res = build_gradients(with_linear_loss(m, {"y0": x.shape}), "gc_loss", ["x"])
        sess = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"])
        grad = sess.run([res.grads["x"]], {"x": x, "gc_weight/y0": r(*x.shape)})[0]
        assert np.all(np.isfinite(grad))
        assert np.all(grad[..., causal] == 0)


def test_rms_norm_chain_opset18() -> None:
    """``x · 1/sqrt(mean(x²) + eps) · w`` as torch exports RMSNorm (ReduceMean axes as input at opset 18)."""
    x, w = r(2, 3, 8), r(8, low=0.5, high=1.5)
    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"]),
             helper.make_node("ReduceMean", ["sq", "ax"], ["ms"], keepdims=1),
             helper.make_node("Add", ["ms", "eps"], ["mse"]),
             helper.make_node("Sqrt", ["mse"], ["rt"]),
             helper.make_node("Reciprocal", ["rt"], ["inv"]),
             helper.make_node("Mul", ["x", "inv"], ["n"]),
             helper.make_node("Mul", ["n", "w"], ["y0"])]
    consts = {"two": np.array(2.0, np.float32), "ax": np.array([-1], np.int64), "eps": np.array(1e-6, np.float32)}
    _check(_chain(nodes, {"x": x, "w": w}, consts, [2, 3, 8], opset=18), {"x": x, "w": w}, ["x", "w"])


def test_rotary_rotate_half_and_gqa_repeat() -> None:
    """``q·cos + rotate_half(q)·sin`` (Slice/Neg/Concat) and repeat_kv (Unsqueeze/Expand/Reshape) before ``q·kᵀ``."""
    q, k = r(2, 4, 5, 6), r(2, 2, 5, 6)
    cos, sin = np.cos(r(1, 1, 5, 6, low=0, high=3)), np.sin(r(1, 1, 5, 6, low=0, high=3))
    nodes = [helper.make_node("Slice", ["q", "h", "big", "last"], ["q2"]),
             helper.make_node("Slice", ["q", "zero", "h", "last"], ["q1"]),
             helper.make_node("Neg", ["q2"], ["nq2"]),
             helper.make_node("Concat", ["nq2", "q1"], ["rot"], axis=-1),
             helper.make_node("Mul", ["q", "cos"], ["qc"]),
             helper.make_node("Mul", ["rot", "sin"], ["rs"]),
             helper.make_node("Add", ["qc", "rs"], ["qr"]),
             helper.make_node("Unsqueeze", ["k", "two"], ["k5"]),
             helper.make_node("Expand", ["k5", "rep"], ["ke"]),
             helper.make_node("Reshape", ["ke", "kshape"], ["kr"]),
             helper.make_node("Transpose", ["kr"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["qr", "kt"], ["y0"])]
    consts = {"h": np.array([3], np.int64), "big": np.array([2**62], np.int64), "last": np.array([-1], np.int64),
              "zero": np.array([0], np.int64), "cos": cos, "sin": sin, "two": np.array([2], np.int64),
              "rep": np.array([2, 2, 2, 5, 6], np.int64), "kshape": np.array([2, 4, 5, 6], np.int64)}
    _check(_chain(nodes, {"q": q, "k": k}, consts, [2, 4, 5, 5]), {"q": q, "k": k}, ["q", "k"])


#: Every op with a rule and the test above that checks it numerically; a new rule needs a test and an entry.
COVERED = {
    "Identity", "Dropout", "Add", "Sub", "Mul", "Div", "Neg", "Sum", "Relu", "LeakyRelu", "PRelu", "Clip",
    "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Exp", "Log", "Sqrt", "Reciprocal", "Abs", "Softplus",
    "Pow", "Cast", "Where", "Expand", "Softmax", "LogSoftmax", "BatchNormalization", "LayerNormalization",
    "MatMul", "Gemm", "Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean",
    "ReduceSum", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Concat", "Split", "Slice", "Pad",
    "Gather", "GatherElements", "Resize", "Elu", "Selu", "Gelu", "ReduceMax", "ReduceMin", "GlobalMaxPool",
    "Max", "Min", "Mean", "InstanceNormalization", "LRN", "Tile", "Sin", "Cos", "Trilu",
}


def test_every_rule_is_covered_by_a_numerical_test() -> None:
    assert set(default_registry().ops()) == COVERED


def test_pad_negative_pads_adjoint_on_onnxruntime() -> None:
    """The reference evaluator cannot run negative pads; Pad is linear, so check <Pad(x), r> = <x, grad> on ORT."""
    import onnxruntime as ort

    from onnxprune.training.gradcheck import with_linear_loss

    x = r(2, 3, 4, 5)
    pads = np.array([0, -1, 1, 2, 0, 1, -2, -1], np.int64)
    m = _op_model("Pad", {"x": x}, {"p": pads, "v": np.array(0.0, np.float32)})
    y_shape = (2, 3, 3, 6)
    res = build_gradients(with_linear_loss(m, {"y0": y_shape}), "gc_loss", ["x"])
    sess = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"])
    weights = r(*y_shape)
    loss, grad = sess.run(None, {"x": x, "gc_weight/y0": weights})
    x2 = r(2, 3, 4, 5)
    loss2, _ = sess.run(None, {"x": x2, "gc_weight/y0": weights})
    # linear in x: loss(x) = <x, grad> exactly
    assert float(np.sum(x.astype(np.float64) * grad)) == pytest.approx(float(loss), rel=1e-5)
    assert float(np.sum(x2.astype(np.float64) * grad)) == pytest.approx(float(loss2), rel=1e-5)


def test_non_differentiable_paths_are_skipped() -> None:
    """Shape → integer arithmetic → Reshape, and an op without a rule off the loss path, need no rules."""
    x = r(2, 6)
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Reshape", ["x", "s"], ["xr"]),
        helper.make_node("TopK", ["x", "k"], ["tv", "ti"], axis=1),  # no rule, not on the loss path
        helper.make_node("Relu", ["xr"], ["y0"]),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
                          [helper.make_tensor_value_info("y0", TensorProto.FLOAT, [2, 6])],
                          [numpy_helper.from_array(np.array([2], np.int64), "k")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    _check(m, {"x": away_from(x, [0.0])}, ["x"])


# ------------------------------------------------------------------------------ onnxruntime contrib ops (genai builder)
def _contrib(nodes: list[onnx.NodeProto], floats: dict[str, np.ndarray], consts: dict[str, np.ndarray],
             outputs: list[str]) -> onnx.ModelProto:
    """A graph of onnxruntime contrib nodes: ``floats`` (and int arrays) are inputs, ``consts`` initializers."""
    inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
              for k, v in floats.items()]
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                          [numpy_helper.from_array(v, k) for k, v in consts.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 9
    return m


def _check_runtime(model: onnx.ModelProto, feeds: dict[str, np.ndarray], wrt: list[str], tol: float = 2e-3) -> None:
    """The expansion's gradients hold numerically, and match the deployed contrib kernel's central differences."""
    from onnxprune.training.gradcheck import check_runtime_gradients

    res = check_runtime_gradients(model, feeds, wrt)
    assert res.expanded.max_rel_err < TOL64, f"float64 rel err {res.expanded.max_rel_err:.2e}"
    assert res.expanded.max_rel_err_ort32 < TOL32, f"onnxruntime float32 rel err {res.expanded.max_rel_err_ort32:.2e}"
    assert res.max_rel_err_runtime < tol, f"vs onnxruntime's contrib kernel: rel err {res.max_rel_err_runtime:.2e}"


def test_contrib_rms_norms() -> None:
    """SimplifiedLayerNormalization and SkipSimplifiedLayerNormalization (with bias): input, skip, scale, bias."""
    x, skip = r(2, 3, 8), r(2, 3, 8)
    w, b = r(8, low=0.5, high=1.5), r(8)
    nodes = [helper.make_node("SkipSimplifiedLayerNormalization", ["x", "skip", "w", "b"], ["h", "", "", "s"],
                              domain="com.microsoft", epsilon=1e-5),
             helper.make_node("SimplifiedLayerNormalization", ["s", "w2"], ["y"], axis=-1, epsilon=1e-5),
             helper.make_node("Add", ["h", "y"], ["out"])]
    model = _contrib(nodes, {"x": x, "skip": skip}, {"w": w, "b": b, "w2": r(8, low=0.5, high=1.5)}, ["out"])
    _check_runtime(model, {"x": x, "skip": skip}, ["x", "skip", "w", "b", "w2"])


@pytest.mark.parametrize("interleaved", [0, 1])
def test_contrib_rotary_embedding(interleaved: int) -> None:
    """com.microsoft RotaryEmbedding on [B, S, N·D] with position ids (a projection weight before it)."""
    x, wq = r(2, 3, 8), r(8, 32)
    ang = RNG.uniform(0, 3, (16, 8)).astype(np.float32)
    pos = np.array([[0, 1, 2], [5, 6, 7]], np.int64)
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"]),
             helper.make_node("RotaryEmbedding", ["q", "pos", "cos", "sin"], ["y"], domain="com.microsoft",
                              num_heads=2, interleaved=interleaved)]
    model = _contrib(nodes, {"x": x, "pos": pos}, {"wq": wq, "cos": np.cos(ang), "sin": np.sin(ang)}, ["y"])
    _check_runtime(model, {"x": x, "pos": pos}, ["x", "wq"])


@pytest.mark.parametrize("packed,interleaved,half,d", [(False, 0, 8, 16), (True, 0, 8, 16), (False, 1, 8, 16),
                                                      (False, 0, None, 16), (True, 0, 8, 32)])
def test_contrib_group_query_attention(packed: bool, interleaved: int, half: int | None, d: int) -> None:
    """GroupQueryAttention at prefill (4 query heads on 2 KV heads, rotary inside, partial or not): the q/k/v
    projection weights' gradients, output and present key/value both in the loss."""
    b, s, hidden, heads, kv = 2, 4, 8, 4, 2
    x = r(b, s, hidden)
    consts = {"wq": r(hidden, heads * d), "wk": r(hidden, kv * d), "wv": r(hidden, kv * d)}
    nodes = [helper.make_node("MatMul", ["x", f"w{t}"], [t]) for t in "qkv"]
    qkv = ["q", "k", "v"]
    if packed:
        nodes.append(helper.make_node("Concat", ["q", "k", "v"], ["qkv"], axis=-1))
        qkv = ["qkv", "", ""]
    rotary = ["", ""]
    if half is not None:
        ang = RNG.uniform(0, 3, (16, half)).astype(np.float32)
        consts.update(cos=np.cos(ang), sin=np.sin(ang))
        rotary = ["cos", "sin"]
    nodes.append(helper.make_node(
        "GroupQueryAttention", qkv + ["past_k", "past_v", "seqlens_k", "total"] + rotary, ["y", "present_k", "present_v"],
        domain="com.microsoft", num_heads=heads, kv_num_heads=kv, do_rotary=int(half is not None),
        rotary_interleaved=interleaved))
    empty = np.zeros((b, kv, 0, d), np.float32)
    feeds = {"x": x, "past_k": empty, "past_v": empty, "seqlens_k": np.full(b, s - 1, np.int32),
             "total": np.array(s, np.int32)}
    model = _contrib(nodes, feeds, consts, ["y", "present_k", "present_v"])
    _check_runtime(model, feeds, ["wq", "wk", "wv"])
