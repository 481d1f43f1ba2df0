"""Numerical gradient checks for the VJP rules and whole gradient graphs.

onnxruntime has no float64 kernels for Conv, pooling, Erf and friends, so the float64 check runs on
onnx's reference evaluator (the spec's own implementation); the same graph in float32 is then run on
onnxruntime to prove it loads and agrees there too. Used by the tests; handy when writing a new rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxprune.training.artifacts import constants_to_initializers, params_to_inputs
from onnxprune.training.decompose import expand_contrib
from onnxprune.training.grad.context import collect_tensor_info
from onnxprune.training.grad.driver import build_gradients, upgrade_opset


def to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of ``model`` with every float32 tensor, cast and constant made float64."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    # inputs whose type the spec pins to float32 whatever the data type is
    pinned = {n.input[2] for n in g.node if n.op_type == "Resize" and len(n.input) > 2}
    pinned |= {n.input[1] for n in g.node if n.op_type == "Upsample" and len(n.input) > 1}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT and vi.name not in pinned:
            vi.type.tensor_type.elem_type = TensorProto.DOUBLE
    for i, init in enumerate(g.initializer):
        if init.data_type == TensorProto.FLOAT and init.name not in pinned:
            g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float64), init.name))
    for node in g.node:
        if node.op_type == "Constant" and node.output[0] in pinned:
            continue
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.DOUBLE
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64), a.t.name))
    return out


def with_linear_loss(model: onnx.ModelProto, out_shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """Append ``loss = Σ_k sum(Y_k · R_k)`` with one weight input ``R_k`` per float output.

    A random linear functional exercises every output element's gradient with one scalar loss.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    info = collect_tensor_info(out)
    terms = []
    dtype = TensorProto.FLOAT
    for o in list(g.output):
        o.type.tensor_type.shape.Clear()
        for d in out_shapes[o.name]:
            o.type.tensor_type.shape.dim.add().dim_value = int(d)
        if info[o.name].dtype not in (TensorProto.FLOAT, TensorProto.DOUBLE):
            continue
        r = f"gc_weight/{o.name}"
        g.input.append(helper.make_tensor_value_info(r, info[o.name].dtype, list(out_shapes[o.name])))
        prod = f"gc_prod/{o.name}"
        g.node.append(helper.make_node("Mul", [o.name, r], [prod]))
        g.node.append(helper.make_node("ReduceSum", [prod], [f"gc_term/{o.name}"], keepdims=0))
        terms.append(f"gc_term/{o.name}")
        dtype = info[o.name].dtype
    g.node.append(helper.make_node("Sum" if len(terms) > 1 else "Identity", terms, ["gc_loss"]))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("gc_loss", dtype, []))
    return out


def _reference(model: onnx.ModelProto):  # noqa: ANN202 - onnx's evaluator has no public type
    import math

    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    class Erf(OpRun):  # the stock reference Erf rounds through float32, useless for differences
        op_domain = ""

        def _run(self, x):  # noqa: ANN001, ANN202
            return (np.vectorize(math.erf, otypes=[x.dtype])(x),)

    from onnx.reference.ops.op_conv_transpose import ConvTranspose as _ConvTranspose

    class ConvTranspose(_ConvTranspose):  # the stock one mishandles group > 1 unless depthwise
        op_domain = ""

        def _run(self, X, W, B=None, group=None, **kw):  # noqa: ANN001, ANN003, ANN202, N803
            g = group or 1
            if g == 1:
                return super()._run(X, W, B, group=1, **kw)
            bs = np.split(B, g) if B is not None else [None] * g
            parts = [super(ConvTranspose, self)._run(x, w, b, group=1, **kw)[0]
                     for x, w, b in zip(np.split(X, g, axis=1), np.split(W, g, axis=0), bs)]
            return (np.concatenate(parts, axis=1),)

    class MaxPool(OpRun):  # the stock one reports indices in padded coordinates
        op_domain = ""

        def _run(self, x, auto_pad=None, ceil_mode=0, dilations=None, kernel_shape=None, pads=None,  # noqa: ANN001, ANN202
                 storage_order=0, strides=None):
            return _max_pool_reference(x, list(kernel_shape), strides, pads, dilations, int(ceil_mode or 0))

    class Gelu(OpRun):  # the expanded function body disagrees with the spec (and onnxruntime) here
        op_domain = ""

        def _run(self, x, approximate="none"):  # noqa: ANN001, ANN202
            if approximate == "tanh":
                u = math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)
                return (0.5 * x * (1 + np.tanh(u)),)
            erf = np.vectorize(math.erf, otypes=[x.dtype])
            return (0.5 * x * (1 + erf(x / math.sqrt(2))),)

    class LRN(OpRun):  # the stock one loops over the batch instead of the channels
        op_domain = ""

        def _run(self, x, alpha=1e-4, beta=0.75, bias=1.0, size=None):  # noqa: ANN001, ANN202
            lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
            sq = np.zeros_like(x)
            for c in range(x.shape[1]):
                sq[:, c] = np.sum(x[:, max(0, c - lo):c + hi + 1] ** 2, axis=1)
            return (x / (bias + alpha / size * sq) ** beta,)

    return ReferenceEvaluator(model, new_ops=[Erf, ConvTranspose, MaxPool, Gelu, LRN])


def _max_pool_reference(
    x: np.ndarray, kernel: list[int], strides: list[int] | None, pads: list[int] | None,
    dilations: list[int] | None, ceil_mode: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Plain-loop MaxPool with onnxruntime's index convention (flat over the whole tensor)."""
    import itertools

    n = len(kernel)
    strides = list(strides or [1] * n)
    dil = list(dilations or [1] * n)
    pads = list(pads or [0] * 2 * n)
    sp = x.shape[2:]
    out_sp = []
    for i in range(n):
        span = sp[i] + pads[i] + pads[i + n] - ((kernel[i] - 1) * dil[i] + 1)
        o = (-(-span // strides[i]) if ceil_mode else span // strides[i]) + 1
        if ceil_mode and (o - 1) * strides[i] >= sp[i] + pads[i]:
            o -= 1
        out_sp.append(o)
    y = np.empty(x.shape[:2] + tuple(out_sp), x.dtype)
    idx = np.empty(y.shape, np.int64)
    plane = int(np.prod(sp))
    for b, c in itertools.product(range(x.shape[0]), range(x.shape[1])):
        for o in itertools.product(*[range(v) for v in out_sp]):
            best, arg = -np.inf, -1
            for k in itertools.product(*[range(v) for v in kernel]):
                pos = [o[i] * strides[i] - pads[i] + k[i] * dil[i] for i in range(n)]
                if all(0 <= p < sp[i] for i, p in enumerate(pos)) and x[(b, c, *pos)] > best:
                    best, arg = x[(b, c, *pos)], int(np.ravel_multi_index(pos, sp))
            y[(b, c, *o)] = best
            idx[(b, c, *o)] = (b * x.shape[1] + c) * plane + arg
    return y, idx


def _ort(model: onnx.ModelProto):  # noqa: ANN202
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class GradCheck:
    """Largest relative errors found; ``analytic``/``numeric`` keep the float64 gradients."""

    max_rel_err: float  # float64 analytic vs central differences
    max_rel_err_ort32: float  # onnxruntime float32 gradient graph vs float64 analytic
    analytic: dict[str, np.ndarray]
    numeric: dict[str, np.ndarray]
    loss_weights: dict[str, np.ndarray] = field(default_factory=dict)  # the random functional's R_k inputs


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    scale = max(float(np.abs(b).max(initial=0.0)), 1e-3)
    return float(np.abs(a - b).max(initial=0.0)) / scale


def _central(loss: Callable[[np.ndarray], float], base: np.ndarray, picked: np.ndarray, eps: float) -> np.ndarray:
    """Central differences of ``loss`` at the flat positions ``picked`` of ``base`` (divided by the step actually
    taken, which float32 rounds)."""
    out = np.zeros(len(picked))
    for j, k in enumerate(picked):
        idx = np.unravel_index(k, base.shape)
        plus, minus = base.copy(), base.copy()
        plus[idx] += eps
        minus[idx] -= eps
        out[j] = (loss(plus) - loss(minus)) / (float(plus[idx]) - float(minus[idx]))
    return out


def check_gradients(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    wrt: Sequence[str],
    *,
    eps: float = 1e-6,
    max_elements: int = 96,
    seed: int = 0,
    run_ort: bool = True,
) -> GradCheck:
    """Compare the gradient graph of ``model`` against central differences in float64.

    ``wrt`` may name graph inputs or initializers (initializers become inputs fed from ``feeds`` or
    their stored value). At most ``max_elements`` randomly chosen entries per tensor are perturbed.
    Errors are max |a-b| / max(|b|), per tensor, maximum over tensors.
    """
    rng = np.random.default_rng(seed)
    model = upgrade_opset(constants_to_initializers(model))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    feeds = dict(feeds)
    for w in wrt:
        if w not in feeds:
            feeds[w] = inits[w]
    model = params_to_inputs(model, [w for w in wrt if w in inits])
    m64 = to_float64(model)
    f64 = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in feeds.items()}
    outs = _reference(m64).run(None, f64)
    shapes = {o.name: np.asarray(v).shape for o, v in zip(m64.graph.output, outs)}
    for o, v in zip(m64.graph.output, outs):
        if np.asarray(v).dtype.kind == "f":
            f64[f"gc_weight/{o.name}"] = rng.standard_normal(np.asarray(v).shape)
    lm64 = with_linear_loss(m64, shapes)
    res64 = build_gradients(lm64, "gc_loss", list(wrt))
    got = dict(zip([o.name for o in res64.model.graph.output], _reference(res64.model).run(None, f64)))
    analytic = {w: np.asarray(got[res64.grads[w]]) for w in wrt if w in res64.grads}
    fwd = _reference(lm64)
    numeric: dict[str, np.ndarray] = {}
    worst = 0.0
    for w in wrt:
        base = f64[w]
        num = np.zeros_like(base)
        flat_idx = np.arange(base.size)
        if base.size > max_elements:
            flat_idx = rng.choice(base.size, max_elements, replace=False)
        num.reshape(-1)[flat_idx] = _central(lambda v, w=w: float(fwd.run(None, {**f64, w: v})[0]), base, flat_idx, eps)
        numeric[w] = num
        a = analytic.get(w, np.zeros_like(base))
        worst = max(worst, _rel(a.reshape(-1)[flat_idx], num.reshape(-1)[flat_idx]))
    worst32 = 0.0
    if run_ort:
        f32 = {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in f64.items()}
        res32 = build_gradients(with_linear_loss(model, shapes), "gc_loss", list(wrt))
        sess = _ort(res32.model)
        names = {i.name for i in sess.get_inputs()}
        out32 = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {k: v for k, v in f32.items() if k in names})))
        for w, a in analytic.items():
            worst32 = max(worst32, _rel(np.asarray(out32[res32.grads[w]], np.float64), a))
    weights = {k: v for k, v in f64.items() if k.startswith("gc_weight/")}
    return GradCheck(worst, worst32, analytic, numeric, weights)


@dataclass(frozen=True)
class RuntimeGradCheck:
    """Gradients of a model with contrib ops: through their training expansion, against the deployed kernels."""

    expanded: GradCheck  # the expansion's gradient graph vs its own float64 central differences
    max_rel_err_runtime: float  # float64 analytic vs float32 central differences of the original graph on onnxruntime


def check_runtime_gradients(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    wrt: Sequence[str],
    *,
    eps: float = 1e-2,
    max_elements: int = 24,
    seed: int = 0,
) -> RuntimeGradCheck:
    """Check the training graph of ``model``'s contrib ops (:func:`~onnxprune.training.decompose.expand_contrib`)
    against central differences of ``model`` itself, run by onnxruntime's contrib kernels in float32.

    The reference evaluator cannot run contrib ops, and onnxruntime runs them in float32 only, so the
    second check uses a larger ``eps``; the gradients are those of the op that is deployed, not of a
    re-implementation of it.
    """
    res = check_gradients(expand_contrib(model), feeds, wrt, max_elements=max_elements, seed=seed)
    model = constants_to_initializers(model)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    f32 = {k: np.asarray(v, np.float32) if np.asarray(v).dtype.kind == "f" else v for k, v in feeds.items()}
    f32.update({w: inits[w] for w in wrt if w not in f32})
    f32.update({k: v.astype(np.float32) for k, v in res.loss_weights.items()})
    model = params_to_inputs(model, [w for w in wrt if w in inits])
    shapes = {o.name: res.loss_weights[f"gc_weight/{o.name}"].shape for o in model.graph.output}
    sess = _ort(with_linear_loss(model, shapes))

    rng = np.random.default_rng(seed + 1)
    worst = 0.0
    for w in wrt:
        picked = rng.choice(f32[w].size, min(max_elements, f32[w].size), replace=False)
        num = _central(lambda v, w=w: float(sess.run(None, {**f32, w: v})[0]), f32[w], picked, eps)
        worst = max(worst, _rel(res.analytic[w].reshape(-1)[picked], num))
    return RuntimeGradCheck(res, worst)
