"""Vector-Jacobian product rules, one per ONNX op, in standard ONNX ops.

Each rule gets the forward node and the gradients of its outputs (None where no gradient flows) and
returns one gradient name (or None) per input. Rules emit nodes through the
:class:`~onnxprune.training.grad.driver.GradContext` and never touch the graph; the driver wires them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxprune.errors import UnsupportedOpError
from onnxprune.training.grad.driver import GradContext, attr, attr_float, attr_int, attr_ints, attr_str

Grads = Sequence[str | None]
Rule = Callable[[GradContext, onnx.NodeProto, Grads], list[str | None]]

#: Ops whose outputs carry no gradient: shapes, indices, comparisons, piecewise-constant maths.
NON_DIFFERENTIABLE = frozenset({
    "Shape", "Size", "Constant", "ConstantOfShape", "Range", "NonZero", "ArgMax", "ArgMin",
    "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or", "Xor",
    "Floor", "Ceil", "Round", "Sign", "EyeLike", "RandomNormal", "RandomNormalLike", "RandomUniform",
    "RandomUniformLike", "Multinomial", "Bernoulli", "IsNaN", "IsInf", "OneHot",
})


class VJPRegistry:
    """Maps (domain, op type) to a VJP rule. Build one per use; registering an op twice is an error."""

    def __init__(self, non_differentiable: frozenset[str] = NON_DIFFERENTIABLE) -> None:
        self._rules: dict[tuple[str, str], Rule] = {}
        self.non_differentiable = non_differentiable

    def register(self, op_type: str, rule: Rule, domain: str = "") -> None:
        """Add ``rule`` for ``op_type``.

        Raises:
            ValueError: a rule for this op is already registered.
        """
        key = (domain, op_type)
        if key in self._rules:
            raise ValueError(f"a VJP rule for {domain or 'ai.onnx'}::{op_type} is already registered")
        self._rules[key] = rule

    def rule(self, op_type: str, domain: str = "") -> Rule | None:
        """The rule for ``op_type``, or None (the driver turns that into UnsupportedOpError)."""
        return self._rules.get(("" if domain == "ai.onnx" else domain, op_type))

    def ops(self) -> list[str]:
        return sorted(op for _, op in self._rules)

    def __contains__(self, op_type: str) -> bool:
        return ("", op_type) in self._rules


def _in(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if len(node.input) > i else ""


# ---------------------------------------------------------------------------------------------------
# Elementwise arithmetic and activations
# ---------------------------------------------------------------------------------------------------
def _identity(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    return [g[0]] + [None] * (len(node.input) - 1)


def _add(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    a, b, y = node.input[0], node.input[1], node.output[0]
    return [ctx.reduce_to(g[0], a, y, node), ctx.reduce_to(g[0], b, y, node)]


def _sum(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    return [ctx.reduce_to(g[0], x, node.output[0], node) for x in node.input]


def _sub(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    a, b, y = node.input[0], node.input[1], node.output[0]
    return [ctx.reduce_to(g[0], a, y, node), ctx.reduce_to(ctx.emit("Neg", [g[0]]), b, y, node)]


def _mul(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    a, b, y = node.input[0], node.input[1], node.output[0]
    return [
        ctx.reduce_to(ctx.emit("Mul", [g[0], b]), a, y, node),
        ctx.reduce_to(ctx.emit("Mul", [g[0], a]), b, y, node),
    ]


def _div(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    a, b, y = node.input[0], node.input[1], node.output[0]
    ga = ctx.emit("Div", [g[0], b])
    gb = ctx.emit("Neg", [ctx.emit("Mul", [ga, y])])  # -g·a/b² = -(g/b)·y
    return [ctx.reduce_to(ga, a, y, node), ctx.reduce_to(gb, b, y, node)]


def _neg(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    return [ctx.emit("Neg", [g[0]])]


def _relu(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    x = node.input[0]
    mask = ctx.emit("Greater", [x, ctx.scalar(0.0, x)])
    return [ctx.emit("Where", [mask, g[0], ctx.scalar(0.0, x)])]


def _leaky_relu(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    x = node.input[0]
    alpha = attr_float(node, "alpha", 0.01)
    mask = ctx.emit("Greater", [x, ctx.scalar(0.0, x)])
    return [ctx.emit("Where", [mask, g[0], ctx.emit("Mul", [g[0], ctx.scalar(alpha, x)])])]


def _prelu(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    x, slope, y = node.input[0], node.input[1], node.output[0]
    zero = ctx.scalar(0.0, x)
    mask = ctx.emit("Greater", [x, zero])
    gx = ctx.emit("Where", [mask, g[0], ctx.emit("Mul", [g[0], slope])])
    gs = ctx.emit("Where", [mask, zero, ctx.emit("Mul", [g[0], x])])
    return [ctx.reduce_to(gx, x, y, node), ctx.reduce_to(gs, slope, y, node)]


def _clip(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    x = node.input[0]
    lo, hi = _in(node, 1), _in(node, 2)
    if ctx.opset < 11:  # min/max were attributes
        lo = ctx.scalar(attr_float(node, "min", -3.4e38), x)
        hi = ctx.scalar(attr_float(node, "max", 3.4e38), x)
    mask = None
    if lo:
        mask = ctx.emit("GreaterOrEqual", [x, lo])
    if hi:
        m2 = ctx.emit("LessOrEqual", [x, hi])
        mask = m2 if mask is None else ctx.emit("And", [mask, m2])
    gx = g[0] if mask is None else ctx.emit("Where", [mask, g[0], ctx.scalar(0.0, x)])
    return [gx] + [None] * (len(node.input) - 1)


def _sigmoid(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    y = node.output[0]
    one_minus = ctx.emit("Sub", [ctx.scalar(1.0, y), y])
    return [ctx.emit("Mul", [g[0], ctx.emit("Mul", [y, one_minus])])]


def _tanh(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    y = node.output[0]
    d = ctx.emit("Sub", [ctx.scalar(1.0, y), ctx.emit("Mul", [y, y])])
    return [ctx.emit("Mul", [g[0], d])]


def _hard_sigmoid(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    x = node.input[0]
    alpha = attr_float(node, "alpha", 0.2)
    beta = attr_float(node, "beta", 0.5)
    t = ctx.emit("Add", [ctx.emit("Mul", [x, ctx.scalar(alpha, x)]), ctx.scalar(beta, x)])
    mask = ctx.emit("And", [ctx.emit("Greater", [t, ctx.scalar(0.0, x)]), ctx.emit("Less", [t, ctx.scalar(1.0, x)])])
    ga = ctx.emit("Mul", [g[0], ctx.scalar(alpha, x)])
    return [ctx.emit("Where", [mask, ga, ctx.scalar(0.0, x)])]


def _hard_swish(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    # y = x·clip(x/6 + 1/2, 0, 1): dy/dx = 0 below -3, 1 above 3, x/3 + 1/2 between
    x = node.input[0]
    mid = ctx.emit("Add", [ctx.emit("Mul", [x, ctx.scalar(1.0 / 3.0, x)]), ctx.scalar(0.5, x)])
    d = ctx.emit("Where", [ctx.emit("Greater", [x, ctx.scalar(3.0, x)]), ctx.scalar(1.0, x), mid])
    d = ctx.emit("Where", [ctx.emit("Less", [x, ctx.scalar(-3.0, x)]), ctx.scalar(0.0, x), d])
    return [ctx.emit("Mul", [g[0], d])]


def _erf(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    x = node.input[0]
    e = ctx.emit("Exp", [ctx.emit("Neg", [ctx.emit("Mul", [x, x])])])
    return [ctx.emit("Mul", [g[0], ctx.emit("Mul", [e, ctx.scalar(2.0 / math.sqrt(math.pi), x)])])]


def _exp(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    return [ctx.emit("Mul", [g[0], node.output[0]])]


def _log(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    return [ctx.emit("Div", [g[0], node.input[0]])]


def _sqrt(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    y = node.output[0]
    return [ctx.emit("Div", [ctx.emit("Mul", [g[0], ctx.scalar(0.5, y)]), y])]


def _reciprocal(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    y = node.output[0]
    return [ctx.emit("Neg", [ctx.emit("Mul", [g[0], ctx.emit("Mul", [y, y])])])]


def _abs(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    return [ctx.emit("Mul", [g[0], ctx.emit("Sign", [node.input[0]])])]


def _softplus(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    return [ctx.emit("Mul", [g[0], ctx.emit("Sigmoid", [node.input[0]])])]


def _pow(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    x, p, y = node.input[0], node.input[1], node.output[0]
    pm1 = ctx.emit("Sub", [p, ctx.const(np.asarray(1, ctx.np_dtype(p)))])
    dpx = ctx.emit("Mul", [ctx.emit("Pow", [x, pm1]), ctx.emit("Cast", [p], to=ctx.dtype(x))])
    gx = ctx.reduce_to(ctx.emit("Mul", [g[0], dpx]), x, y, node)
    gp: str | None = None
    if ctx.dtype(p) == ctx.dtype(x):
        gp = ctx.reduce_to(ctx.emit("Mul", [ctx.emit("Mul", [g[0], y]), ctx.emit("Log", [x])]), p, y, node)
    return [gx, gp]


def _cast(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    return [ctx.emit("Cast", [g[0]], to=ctx.dtype(node.input[0]))]


def _where(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    c, a, b, y = node.input[0], node.input[1], node.input[2], node.output[0]
    zero = ctx.scalar(0.0, y)
    ga = ctx.reduce_to(ctx.emit("Where", [c, g[0], zero]), a, y, node)
    gb = ctx.reduce_to(ctx.emit("Where", [c, zero, g[0]]), b, y, node)
    return [None, ga, gb]


def _expand(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    return [ctx.reduce_to(g[0], node.input[0], node.output[0], node), None]


# ---------------------------------------------------------------------------------------------------
# Softmax family and normalisation
# ---------------------------------------------------------------------------------------------------
def _softmax_axis(ctx: GradContext, node: onnx.NodeProto) -> int:
    if ctx.opset < 13:
        raise UnsupportedOpError(
            f"{node.op_type} before opset 13 flattens to 2-D; upgrade the model", op_type=node.op_type, node=node.name
        )
    return attr_int(node, "axis", -1)


def _softmax(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    y = node.output[0]
    axis = _softmax_axis(ctx, node)
    dot = ctx.reduce("ReduceSum", ctx.emit("Mul", [g[0], y]), [axis], keepdims=True)
    return [ctx.emit("Mul", [y, ctx.emit("Sub", [g[0], dot])])]


def _log_softmax(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    y = node.output[0]
    axis = _softmax_axis(ctx, node)
    total = ctx.reduce("ReduceSum", g[0], [axis], keepdims=True)
    return [ctx.emit("Sub", [g[0], ctx.emit("Mul", [ctx.emit("Exp", [y]), total])])]


def _batch_norm(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    """Inference-mode BN: statistics are frozen constants, so it is a per-channel affine map."""
    if attr_int(node, "training_mode", 0):
        raise UnsupportedOpError(
            f"BatchNormalization {node.name!r} is in training mode; export the model in eval mode",
            op_type=node.op_type,
            node=node.name,
        )
    x, scale, mean, var = node.input[0], node.input[1], node.input[3], node.input[4]
    eps = attr_float(node, "epsilon", 1e-5)
    rank = ctx.rank(x, node)
    bshape = [-1] + [1] * (rank - 2)
    inv = ctx.emit("Reciprocal", [ctx.emit("Sqrt", [ctx.emit("Add", [var, ctx.scalar(eps, var)])])])
    gx = ctx.emit("Mul", [g[0], ctx.reshape(ctx.emit("Mul", [scale, inv]), bshape)])
    axes = [0] + list(range(2, rank))
    xhat = ctx.emit("Mul", [ctx.emit("Sub", [x, ctx.reshape(mean, bshape)]), ctx.reshape(inv, bshape)])
    gscale = ctx.reduce("ReduceSum", ctx.emit("Mul", [g[0], xhat]), axes, keepdims=False)
    gbias = ctx.reduce("ReduceSum", g[0], axes, keepdims=False)
    return [gx, gscale, gbias, None, None]


def _layer_norm(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    x, scale, y = node.input[0], node.input[1], node.output[0]
    bias = _in(node, 2)
    rank = ctx.rank(x, node)
    axis = attr_int(node, "axis", -1)
    axis = axis + rank if axis < 0 else axis
    axes = list(range(axis, rank))
    eps = attr_float(node, "epsilon", 1e-5)
    # recompute mean/rstd rather than use the optional outputs: their dtype follows stash_type
    mu = ctx.reduce("ReduceMean", x, axes, keepdims=True)
    d = ctx.emit("Sub", [x, mu])
    var = ctx.reduce("ReduceMean", ctx.emit("Mul", [d, d]), axes, keepdims=True)
    rstd = ctx.emit("Reciprocal", [ctx.emit("Sqrt", [ctx.emit("Add", [var, ctx.scalar(eps, x)])])])
    xhat = ctx.emit("Mul", [d, rstd])
    gy = g[0]
    gxhat = ctx.emit("Mul", [gy, scale])
    m1 = ctx.reduce("ReduceMean", gxhat, axes, keepdims=True)
    m2 = ctx.reduce("ReduceMean", ctx.emit("Mul", [gxhat, xhat]), axes, keepdims=True)
    inner = ctx.emit("Sub", [ctx.emit("Sub", [gxhat, m1]), ctx.emit("Mul", [xhat, m2])])
    gx = ctx.emit("Mul", [rstd, inner])
    gscale = ctx.reduce_to(ctx.emit("Mul", [gy, xhat]), scale, y, node)
    gbias = ctx.reduce_to(gy, bias, y, node) if bias else None
    return [gx, gscale, gbias]


# ---------------------------------------------------------------------------------------------------
# Linear algebra
# ---------------------------------------------------------------------------------------------------
def _swap_last(ctx: GradContext, x: str, rank: int) -> str:
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    return ctx.transpose(x, perm)


def _matmul(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    a, b, y = node.input[0], node.input[1], node.output[0]
    ra, rb = ctx.rank(a, node), ctx.rank(b, node)
    gy = g[0]
    a2, b2 = a, b
    if ra == 1:  # (K) @ (...,K,N): treat a as (1,K) and restore the dropped axis of y
        a2 = ctx.unsqueeze(a, [0])
        gy = ctx.unsqueeze(gy, [-2])
    if rb == 1:  # (...,M,K) @ (K): b as (K,1)
        b2 = ctx.unsqueeze(b, [1])
        gy = ctx.unsqueeze(gy, [-1])
    ry = max(max(ra, 2), max(rb, 2))
    ga = ctx.emit("MatMul", [gy, _swap_last(ctx, b2, max(rb, 2))])
    gb = ctx.emit("MatMul", [_swap_last(ctx, a2, max(ra, 2)), gy])
    return [_sum_to_shape(ctx, ga, a, ry, node), _sum_to_shape(ctx, gb, b, ry, node)]


def _sum_to_shape(ctx: GradContext, grad: str, target: str, grad_rank: int, node: onnx.NodeProto) -> str:
    """Undo MatMul's batch broadcasting (shape inference does not know the grad's shape)."""
    ts = ctx.shape(target)
    if ts is None:
        raise UnsupportedOpError(f"MatMul {node.name!r}: rank of {target!r} unknown", op_type="MatMul", node=node.name)
    if len(ts) == grad_rank and all(isinstance(d, int) for d in ts):
        known = ctx.shape(node.output[0])
        batch_equal = known is not None and len(known) == grad_rank and known[:-2] == ts[:-2]
        if batch_equal:
            return grad
    lead = grad_rank - len(ts) if len(ts) >= 2 else grad_rank - 2
    axes = list(range(max(lead, 0)))
    if len(ts) >= 2:
        for i, d in enumerate(ts[:-2]):
            yd = (ctx.shape(node.output[0]) or [None] * grad_rank)[lead + i]
            if d == 1 and yd != 1:
                axes.append(lead + i)
            elif not isinstance(d, int) or (d == 1 and yd is None):
                return ctx.reshape(_dynamic_sum(ctx, grad, target, grad_rank), ctx.shape_of(target))
    out = ctx.reduce("ReduceSum", grad, axes, keepdims=True) if axes else grad
    return ctx.reshape_like(out, target)


def _dynamic_sum(ctx: GradContext, grad: str, target: str, grad_rank: int) -> str:
    rank_t = ctx.rank(target)
    gshape = ctx.shape_of(grad)
    tshape = ctx.shape_of(target)
    lead = grad_rank - rank_t
    padded = ctx.emit("Concat", [ctx.ints([1] * lead), tshape], axis=0) if lead > 0 else tshape
    one = ctx.int_scalar(1)
    mask = ctx.emit("And", [ctx.emit("Equal", [padded, one]), ctx.emit("Not", [ctx.emit("Equal", [gshape, one])])])
    axes_t = ctx.reshape(ctx.emit("NonZero", [mask]), [-1])
    return ctx.emit("ReduceSum", [grad, axes_t], keepdims=1, noop_with_empty_axes=1)


def _gemm(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    a, b, c, y = node.input[0], node.input[1], _in(node, 2), node.output[0]
    alpha = attr_float(node, "alpha", 1.0)
    beta = attr_float(node, "beta", 1.0)
    ta = attr_int(node, "transA", 0)
    tb = attr_int(node, "transB", 0)
    gy = g[0]
    if ta:
        ga = ctx.emit("Gemm", [b, gy], alpha=alpha, transA=tb, transB=1)
    else:
        ga = ctx.emit("Gemm", [gy, b], alpha=alpha, transB=1 - tb)
    if tb:
        gb = ctx.emit("Gemm", [gy, a], alpha=alpha, transA=1, transB=ta)
    else:
        gb = ctx.emit("Gemm", [a, gy], alpha=alpha, transA=1 - ta)
    gc: str | None = None
    if c:
        gcs = gy if beta == 1.0 else ctx.emit("Mul", [gy, ctx.scalar(beta, y)])
        gc = ctx.reduce_to(gcs, c, y, node)
    return [ga, gb, gc]


# ---------------------------------------------------------------------------------------------------
# Convolution and pooling
# ---------------------------------------------------------------------------------------------------
def _conv_geometry(
    ctx: GradContext, node: onnx.NodeProto, in_sp: list[int], kernel: list[int]
) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    """strides, dilations, pads_begin, pads_end, output spatial size; auto_pad made explicit."""
    n = len(in_sp)
    strides = attr_ints(node, "strides", [1] * n)
    dil = attr_ints(node, "dilations", [1] * n)
    pads = attr_ints(node, "pads", [0] * 2 * n)
    auto = attr_str(node, "auto_pad", "NOTSET")
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dil)]
    pb, pe = pads[:n], pads[n:]
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pb, pe = [], []
        for size, s, e in zip(in_sp, strides, eff):
            out = -(-size // s)
            total = max(0, (out - 1) * s + e - size)
            small, big = total // 2, total - total // 2
            pb.append(small if auto == "SAME_UPPER" else big)
            pe.append(big if auto == "SAME_UPPER" else small)
    elif auto == "VALID":
        pb, pe = [0] * n, [0] * n
    ceil = attr_int(node, "ceil_mode", 0)
    out_sp = []
    for size, s, e, b, en in zip(in_sp, strides, eff, pb, pe):
        span = size + b + en - e
        o = (-(-span // s) if ceil else span // s) + 1
        if ceil and (o - 1) * s >= size + b:  # the last window must start inside the input or left pad
            o -= 1
        out_sp.append(o)
    return strides, dil, pb, pe, out_sp


def _transpose_pads(
    in_sp: list[int], out_sp: list[int], strides: list[int], eff: list[int], pb: list[int]
) -> tuple[list[int], list[int]]:
    """End pads and output_padding that make ConvTranspose return exactly ``in_sp``."""
    pe_new, opad = [], []
    for size, o, s, e, b in zip(in_sp, out_sp, strides, eff, pb):
        end = s * (o - 1) + e - b - size
        pe_new.append(max(end, 0))
        opad.append(max(-end, 0))
    return pe_new, opad


def _spatial(ctx: GradContext, x: str, node: onnx.NodeProto) -> list[int]:
    """Static spatial dims of ``x`` (the batch may stay symbolic)."""
    shape = ctx.shape(x)
    if shape is None or not all(isinstance(d, int) for d in shape[2:]):
        raise UnsupportedOpError(
            f"gradient of {node.op_type} {node.name!r} needs static spatial dims for {x!r}, got {shape}; "
            f"fix input shapes with --shape",
            op_type=node.op_type, node=node.name,
        )
    return [int(d) for d in shape[2:]]  # type: ignore[arg-type]


#: Largest kernel (elements) for which the weight gradient is built from one input slice per kernel
#: offset (a MatMul each) instead of one Conv whose "kernel" is the whole output map: measured ~1.8x
#: faster per training step on CPU for 3x3 convs; big kernels would mean too many small ops.
PATCH_MAX_KERNEL = 49


def _conv_weight_grad_patches(
    ctx: GradContext, x: str, gy: str, ws: list[int], out_sp: list[int], group: int,
    strides: list[int], dil: list[int], pb: list[int], pe: list[int],
) -> str:
    """dL/dW from one strided Slice of the padded input per kernel offset, contracted with ``gy``.

    Per offset a batched MatMul over (sample, group) gives [g, C/g, M/g]; depthwise uses Mul+ReduceSum.
    """
    import itertools

    m, cg, kernel = ws[0], ws[1], ws[2:]
    mg = m // group
    nsp = len(kernel)
    axes = list(range(2, 2 + nsp))
    p_total = int(np.prod(out_sp))
    depthwise = cg == 1 and mg == 1
    if any(pb) or any(pe):
        x = ctx.emit("Pad", [x, ctx.ints([0, 0] + pb + [0, 0] + pe)])
    g_t = None if depthwise else ctx.transpose(ctx.reshape(gy, [-1, group, mg, p_total]), [0, 1, 3, 2])
    parts = []
    for off in itertools.product(*[range(k) for k in kernel]):
        starts = [o * d for o, d in zip(off, dil)]
        ends = [st + (n - 1) * s + 1 for st, n, s in zip(starts, out_sp, strides)]
        piece = ctx.emit("Slice", [x, ctx.ints(starts), ctx.ints(ends), ctx.ints(axes), ctx.ints(strides)])
        if depthwise:
            part = ctx.reduce("ReduceSum", ctx.emit("Mul", [piece, gy]), [0] + axes, keepdims=False)  # [C]
        else:
            prod = ctx.emit("MatMul", [ctx.reshape(piece, [-1, group, cg, p_total]), g_t])  # [N, g, C/g, M/g]
            part = ctx.reduce("ReduceSum", prod, [0], keepdims=False)
        parts.append(ctx.unsqueeze(part, [-1]))
    stacked = ctx.emit("Concat", parts, axis=-1) if len(parts) > 1 else parts[0]  # [C, K] or [g, C/g, M/g, K]
    if not depthwise:
        stacked = ctx.transpose(stacked, [0, 2, 1, 3])  # [g, M/g, C/g, K]
    return ctx.reshape(stacked, ws)


def _conv_weight_grad(
    ctx: GradContext, x: str, gy: str, ws: list[int], in_sp: list[int], out_sp: list[int], group: int,
    strides: list[int], dil: list[int], pb: list[int], pe: list[int],
) -> str:
    """dL/dW of ``y = Conv(x, W)``: correlate ``x`` with ``gy``, batch and channels swapped.

    The batch becomes the reduction channel, so one Conv (strides and dilations exchanged) does it;
    groups fold into the channel axis. Extra rows from padding beyond the last window are sliced off.
    """
    m, cg = ws[0], ws[1]
    nsp = len(in_sp)
    kernel = ws[2:]
    if int(np.prod(kernel)) <= PATCH_MAX_KERNEL and all(p >= 0 for p in pb + pe):
        return _conv_weight_grad_patches(ctx, x, gy, ws, out_sp, group, strides, dil, pb, pe)
    sp = list(range(2, 2 + nsp))
    if group == 1:
        xt = ctx.transpose(x, [1, 0] + sp)
        gt = ctx.transpose(gy, [1, 0] + sp)
    else:
        mg = m // group
        xr = ctx.reshape(x, [-1, group, cg] + in_sp)
        xt = ctx.reshape(ctx.transpose(xr, [2, 1, 0] + [i + 1 for i in sp]), [cg, -1] + in_sp)
        gr = ctx.reshape(gy, [-1, group, mg] + out_sp)
        gt = ctx.reshape(ctx.transpose(gr, [1, 2, 0] + [i + 1 for i in sp]), [m, -1] + out_sp)
    gw = ctx.emit("Conv", [xt, gt], group=group, strides=dil, dilations=strides, pads=pb + pe, kernel_shape=out_sp)
    gw = ctx.transpose(gw, [1, 0] + sp)
    got = [(size + b + e - ((o - 1) * s + 1)) // d + 1 for size, b, e, o, s, d in zip(in_sp, pb, pe, out_sp, strides, dil)]
    if got != kernel:
        gw = ctx.emit("Slice", [gw, ctx.ints([0] * nsp), ctx.ints(kernel), ctx.ints(sp)])
    return gw


def _conv_transpose(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    """ConvTranspose is the adjoint of Conv: its input grad is a Conv, its weight grad a Conv weight grad
    with the roles of input and output exchanged."""
    x, w = node.input[0], node.input[1]
    bias = _in(node, 2)
    gy = g[0]
    ws = ctx.static_shape(w, node)
    in_sp = _spatial(ctx, x, node)
    out_sp = _spatial(ctx, node.output[0], node)
    kernel = ws[2:]
    n = len(kernel)
    group = attr_int(node, "group", 1)
    strides = attr_ints(node, "strides", [1] * n)
    dil = attr_ints(node, "dilations", [1] * n)
    opad = attr_ints(node, "output_padding", [0] * n)
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dil)]
    pads = attr(node, "pads")
    if pads is None:  # derive from output_shape / auto_pad (or none)
        total = [s * (i - 1) + op + e - o for s, i, op, e, o in zip(strides, in_sp, opad, eff, out_sp)]
        auto = attr(node, "auto_pad", b"NOTSET")
        upper = (auto.decode() if isinstance(auto, bytes) else str(auto)) != "SAME_LOWER"
        pb = [t // 2 if upper else t - t // 2 for t in total]
        pe = [t - b for t, b in zip(total, pb)]
    else:
        pb, pe = list(pads[:n]), list(pads[n:])  # type: ignore[index]
    res: list[str | None] = [None] * len(node.input)
    res[0] = ctx.emit("Conv", [gy, w], group=group, strides=strides, dilations=dil, pads=pb + pe, kernel_shape=kernel)
    # as a Conv from gy's space (Cout channels) to x's (Cin): weight W[Cin, Cout/g, k]
    res[1] = _conv_weight_grad(ctx, gy, x, ws, out_sp, in_sp, group, strides, dil, pb, pe)
    if bias:
        res[2] = ctx.reduce("ReduceSum", gy, [0] + list(range(2, 2 + n)), keepdims=False)
    return res


def _conv(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    x, w, y = node.input[0], node.input[1], node.output[0]
    bias = _in(node, 2)
    gy = g[0]
    ws = ctx.static_shape(w, node)
    in_sp = _spatial(ctx, x, node)
    kernel = ws[2:]
    group = attr_int(node, "group", 1)
    strides, dil, pb, pe, out_sp = _conv_geometry(ctx, node, in_sp, kernel)
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dil)]
    nsp = len(kernel)
    res: list[str | None] = [None] * len(node.input)
    # input gradient: the transposed convolution with the same weights (measured faster on CPU than
    # a stride-1 Conv with the flipped kernel)
    pe_new, opad = _transpose_pads(in_sp, out_sp, strides, eff, pb)
    res[0] = ctx.emit(
        "ConvTranspose", [gy, w], group=group, strides=strides, dilations=dil, pads=pb + pe_new,
        output_padding=opad if any(opad) else None, kernel_shape=kernel,
    )
    res[1] = _conv_weight_grad(ctx, x, gy, ws, in_sp, out_sp, group, strides, dil, pb, pe)
    if bias:
        res[2] = ctx.reduce("ReduceSum", gy, [0] + list(range(2, 2 + nsp)), keepdims=False)
    return res


def _pool_counts(
    in_sp: list[int], out_sp: list[int], kernel: list[int], strides: list[int], dil: list[int],
    pb: list[int], pe: list[int], include_pad: bool,
) -> np.ndarray:
    """How many elements each AveragePool window divides by (separable per axis)."""
    total = np.ones(out_sp, np.float64)
    for axis, (size, o, k, s, d, b, e) in enumerate(zip(in_sp, out_sp, kernel, strides, dil, pb, pe)):
        lo, hi = (-b, size + e) if include_pad else (0, size)
        counts = np.zeros(o)
        for i in range(o):
            pos = i * s - b + d * np.arange(k)
            counts[i] = np.count_nonzero((pos >= lo) & (pos < hi))
        shape = [1] * len(out_sp)
        shape[axis] = o
        total = total * counts.reshape(shape)
    return total


def _average_pool(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    x, y = node.input[0], node.output[0]
    in_sp = _spatial(ctx, x, node)
    kernel = attr_ints(node, "kernel_shape")
    strides, dil, pb, pe, out_sp = _conv_geometry(ctx, node, in_sp, kernel)
    known = ctx.shape(y)
    if known is not None and all(isinstance(d, int) for d in known[2:]):
        out_sp = [int(d) for d in known[2:]]  # type: ignore[arg-type]
    include = bool(attr(node, "count_include_pad", 0))
    counts = _pool_counts(in_sp, out_sp, kernel, strides, dil, pb, pe, include)
    inv = ctx.const((1.0 / counts).astype(ctx.np_dtype(x)), "pool_inv")
    gs = ctx.reshape(ctx.emit("Mul", [g[0], inv]), [-1, 1] + out_sp)
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dil)]
    pe_new, opad = _transpose_pads(in_sp, out_sp, strides, eff, pb)
    ones = ctx.const(np.ones([1, 1] + kernel, ctx.np_dtype(x)), "pool_ones")
    gx = ctx.emit(
        "ConvTranspose", [gs, ones], strides=strides, dilations=dil, pads=pb + pe_new,
        output_padding=opad if any(opad) else None, kernel_shape=kernel,
    )
    return [ctx.reshape_like(gx, x)]


def _tiled_max_pool(ctx: GradContext, node: onnx.NodeProto, g: str) -> str | None:
    """Non-overlapping windows that tile the input exactly: route grads by ``x == max`` (ties share).

    Avoids the Indices output, which onnxruntime computes ~20x slower than the plain MaxPool.
    Returns None when the windows overlap, pad, dilate or leave a remainder.
    """
    x, y = node.input[0], node.output[0]
    shape = ctx.shape(x)
    kernel = attr_ints(node, "kernel_shape")
    n = len(kernel)
    strides = attr_ints(node, "strides", [1] * n)
    plain = (
        strides == kernel
        and not any(attr_ints(node, "pads", [0] * 2 * n))
        and all(d == 1 for d in attr_ints(node, "dilations", [1] * n))
        and attr(node, "auto_pad", b"NOTSET") in (b"NOTSET", b"VALID")
    )
    if not plain or shape is None or not all(isinstance(d, int) and d % k == 0 for d, k in zip(shape[2:], kernel)):
        return None
    # nearest upsampling by whole blocks (asymmetric + floor maps output o to input o // k exactly);
    # every tensor stays NCHW-contiguous, which onnxruntime's elementwise kernels need to be fast
    scales = ctx.const(np.asarray([1.0, 1.0] + [float(k) for k in kernel], np.float32), "pool_scales")

    def up(t: str) -> str:
        return ctx.emit("Resize", [t, "", scales], mode="nearest", coordinate_transformation_mode="asymmetric",
                        nearest_mode="floor")

    mask = ctx.emit("Cast", [ctx.emit("Equal", [x, up(y)])], to=ctx.dtype(x))
    ties = ctx.emit("Mul", [ctx.emit("AveragePool", [mask], kernel_shape=kernel, strides=kernel),
                            ctx.scalar(float(np.prod(kernel)), x)])
    return ctx.emit("Mul", [mask, up(ctx.emit("Div", [g, ties]))])


def _max_pool(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    """Scatter-add the output grads to the argmax positions given by the Indices output."""
    x, y = node.input[0], node.output[0]
    tiled = _tiled_max_pool(ctx, node, g[0])  # type: ignore[arg-type]
    if tiled is not None:
        return [tiled]
    if attr_int(node, "storage_order", 0):
        raise UnsupportedOpError(
            f"MaxPool {node.name!r} uses column-major indices (storage_order=1)", op_type=node.op_type, node=node.name
        )
    idx = ctx.forward_output(node, 1, TensorProto.INT64, ctx.shape(y))
    rank = ctx.rank(x, node)
    shape = ctx.shape_of(x)
    # runtimes disagree whether indices count from the tensor or the plane start: normalise to planes
    plane = ctx.emit("ReduceProd", [ctx.emit("Slice", [shape, ctx.ints([2]), ctx.ints([rank])])], keepdims=0)
    planes = ctx.emit("ReduceProd", [ctx.emit("Slice", [shape, ctx.ints([0]), ctx.ints([2])])], keepdims=0)
    local = ctx.emit("Mod", [idx, plane])
    offsets = ctx.emit("Mul", [ctx.emit("Range", [ctx.int_scalar(0), planes, ctx.int_scalar(1)]), plane])
    nc1 = ctx.emit("Concat", [ctx.emit("Slice", [shape, ctx.ints([0]), ctx.ints([2])]), ctx.ints([1] * (rank - 2))], axis=0)
    flat_idx = ctx.reshape(ctx.emit("Add", [local, ctx.reshape(offsets, nc1)]), [-1])
    zeros = ctx.emit("ConstantOfShape", [ctx.reshape(ctx.emit("Size", [x]), [1])],
                     value=helper.make_tensor("v", ctx.dtype(x), [1], [0]))
    gx = ctx.emit("ScatterElements", [zeros, flat_idx, ctx.reshape(g[0], [-1])], axis=0, reduction="add")
    return [ctx.reshape(gx, shape)]


def _global_average_pool(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    x, y = node.input[0], node.output[0]
    return [ctx.emit("Div", [ctx.emit("Expand", [g[0], ctx.shape_of(x)]), _count(ctx, x, y)])]


def _count(ctx: GradContext, x: str, y: str) -> str:
    """Elements of ``x`` per element of ``y`` as a float scalar (static when known)."""
    xs, ys = ctx.shape(x), ctx.shape(y)
    if xs and ys is not None and all(isinstance(d, int) for d in xs + ys):
        return ctx.scalar(float(np.prod(xs)) / float(np.prod(ys)), x)  # type: ignore[arg-type]
    dt = ctx.dtype(x)
    sizes = [ctx.emit("Cast", [ctx.emit("Size", [t])], to=dt) for t in (x, y)]
    return ctx.emit("Div", sizes)


# ---------------------------------------------------------------------------------------------------
# Reductions
# ---------------------------------------------------------------------------------------------------
def _reduce_axes(ctx: GradContext, node: onnx.NodeProto) -> list[int] | None:
    """Normalised reduction axes, or None for 'all axes'; [] means identity (noop_with_empty_axes)."""
    rank = ctx.rank(node.input[0], node)
    axes = attr(node, "axes")
    if axes is None and _in(node, 1):
        value = ctx.const_value(node.input[1])
        if value is None:
            raise UnsupportedOpError(
                f"{node.op_type} {node.name!r} takes its axes from a computed tensor; only constant axes are supported",
                op_type=node.op_type, node=node.name,
            )
        axes = [int(v) for v in value.reshape(-1)]
    if not axes:
        return [] if attr_int(node, "noop_with_empty_axes", 0) else None
    return sorted(a + rank if a < 0 else a for a in axes)  # type: ignore[union-attr]


def _reduce_sum_or_mean(mean: bool) -> Rule:
    def rule(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
        x, y = node.input[0], node.output[0]
        axes = _reduce_axes(ctx, node)
        extra: list[str | None] = [None] * (len(node.input) - 1)
        if axes == []:
            return [g[0]] + extra
        gy = g[0]
        if not attr_int(node, "keepdims", 1):
            gy = ctx.unsqueeze(gy, axes if axes is not None else list(range(ctx.rank(x, node))))
        gx = ctx.emit("Expand", [gy, ctx.shape_of(x)])
        if mean:
            gx = ctx.emit("Div", [gx, _count(ctx, x, y)])
        return [gx] + extra

    return rule


# ---------------------------------------------------------------------------------------------------
# Shape and indexing ops
# ---------------------------------------------------------------------------------------------------
def _reshape_back(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    """Flatten, Reshape, Squeeze, Unsqueeze: the gradient takes the input's shape back."""
    return [ctx.reshape_like(g[0], node.input[0])] + [None] * (len(node.input) - 1)


def _transpose_rule(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    given = attr(node, "perm")
    if given is None:
        perm = list(reversed(range(ctx.rank(node.input[0], node))))
    else:
        perm = [int(p) for p in given]  # type: ignore[union-attr]
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return [ctx.transpose(g[0], inv)]


def _dim_along(ctx: GradContext, x: str, axis: int) -> str:
    """Size of ``x`` along ``axis`` as a 1-element int64 tensor (constant when known)."""
    shape = ctx.shape(x)
    if shape is not None and isinstance(shape[axis], int):
        return ctx.ints([int(shape[axis])])  # type: ignore[arg-type]
    return ctx.emit("Slice", [ctx.shape_of(x), ctx.ints([axis]), ctx.ints([axis + 1])])


def _concat(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    rank = ctx.rank(node.output[0], node)
    axis = attr_int(node, "axis", 0)
    axis = axis + rank if axis < 0 else axis
    sizes = [_dim_along(ctx, x, axis) for x in node.input]
    split = ctx.emit("Concat", sizes, axis=0) if len(sizes) > 1 else sizes[0]
    if len(node.input) == 1:
        return [g[0]]
    return list(ctx.emit_multi("Split", [g[0], split], len(node.input), axis=axis))


def _split(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    axis = attr_int(node, "axis", 0)
    parts = [gi if gi is not None else ctx.zeros_like(y) for gi, y in zip(g, node.output)]
    gx = ctx.emit("Concat", parts, axis=axis) if len(parts) > 1 else parts[0]
    return [gx] + [None] * (len(node.input) - 1)


def _index_grid(ctx: GradContext, x: str) -> tuple[str, str]:
    """(flat element count, int64 tensor shaped like ``x`` holding each element's flat index)."""
    n = ctx.emit("Size", [x])
    grid = ctx.reshape(ctx.emit("Range", [ctx.int_scalar(0), n, ctx.int_scalar(1)]), ctx.shape_of(x))
    return n, grid


def _scatter_flat(ctx: GradContext, x: str, positions: str, g: str, size: str, extra: int = 0) -> str:
    """Add ``g`` into a zero tensor like ``x`` at flat ``positions`` (duplicates accumulate)."""
    length = ctx.reshape(size, [1])
    if extra:
        length = ctx.emit("Add", [length, ctx.ints([extra])])
    zeros = ctx.emit("ConstantOfShape", [length], value=helper.make_tensor("v", ctx.dtype(x), [1], [0]))
    flat = ctx.emit("ScatterElements", [zeros, ctx.reshape(positions, [-1]), ctx.reshape(g, [-1])],
                    axis=0, reduction="add")
    if extra:
        flat = ctx.emit("Slice", [flat, ctx.ints([0]), ctx.reshape(size, [1])])
    return ctx.reshape(flat, ctx.shape_of(x))


def _slice(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    """Slice the index grid the same way, then scatter the grads back (any steps, negative too)."""
    x = node.input[0]
    n, grid = _index_grid(ctx, x)
    picked = ctx.emit("Slice", [grid] + list(node.input[1:]))
    return [_scatter_flat(ctx, x, picked, g[0], n)] + [None] * (len(node.input) - 1)


def _pad(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    """Pad the index grid; padded cells point at a dummy slot that is dropped (edge/reflect accumulate)."""
    x = node.input[0]
    mode = attr_str(node, "mode", "constant")
    n, grid = _index_grid(ctx, x)
    inputs = [grid, node.input[1], n if mode == "constant" else ""]
    if _in(node, 3):
        inputs.append(node.input[3])
    while inputs and not inputs[-1]:
        inputs.pop()
    picked = ctx.emit("Pad", inputs, mode=mode)
    return [_scatter_flat(ctx, x, picked, g[0], n, extra=1)] + [None] * (len(node.input) - 1)


def _gather(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    data, indices = node.input[0], node.input[1]
    rank = ctx.rank(data, node)
    axis = attr_int(node, "axis", 0)
    axis = axis + rank if axis < 0 else axis
    if axis == 0:  # embeddings: ScatterND adds the rows of duplicate ids
        dim0 = ctx.emit("Slice", [ctx.shape_of(data), ctx.ints([0]), ctx.ints([1])])
        wrapped = ctx.emit("Where", [ctx.emit("Less", [indices, ctx.const(np.asarray(0, ctx.np_dtype(indices)))]),
                                     ctx.emit("Add", [indices, ctx.emit("Cast", [dim0], to=ctx.dtype(indices))]), indices])
        ids = ctx.unsqueeze(ctx.emit("Cast", [wrapped], to=TensorProto.INT64), [-1])
        gd = ctx.emit("ScatterND", [ctx.zeros_like(data), ids, g[0]], reduction="add")
        return [gd, None]
    n, grid = _index_grid(ctx, data)
    picked = ctx.emit("Gather", [grid, indices], axis=axis)
    return [_scatter_flat(ctx, data, picked, g[0], n), None]


def _gather_elements(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    data, indices = node.input[0], node.input[1]
    axis = attr_int(node, "axis", 0)
    gd = ctx.emit("ScatterElements", [ctx.zeros_like(data), indices, g[0]], axis=axis, reduction="add")
    return [gd, None]


# ---------------------------------------------------------------------------------------------------
# Resize: the transpose of a separable per-axis interpolation matrix
# ---------------------------------------------------------------------------------------------------
def _resize_matrix(node: onnx.NodeProto, size_in: int, size_out: int, scale: float) -> np.ndarray:
    mode = attr_str(node, "mode", "nearest")
    ctm = attr_str(node, "coordinate_transformation_mode", "half_pixel")
    nmode = attr_str(node, "nearest_mode", "round_prefer_floor")
    mat = np.zeros((size_out, size_in))
    for o in range(size_out):
        if ctm == "half_pixel":
            xo = (o + 0.5) / scale - 0.5
        elif ctm == "pytorch_half_pixel":
            xo = (o + 0.5) / scale - 0.5 if size_out > 1 else 0.0
        elif ctm == "align_corners":
            xo = o * (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
        elif ctm == "asymmetric":
            xo = o / scale
        elif ctm == "tf_half_pixel_for_nn":
            xo = (o + 0.5) / scale
        else:
            raise UnsupportedOpError(
                f"Resize {node.name!r}: coordinate_transformation_mode {ctm!r} has no gradient rule",
                op_type=node.op_type, node=node.name,
            )
        if mode == "nearest":
            frac = xo - math.floor(xo)
            if nmode == "floor":
                i = math.floor(xo)
            elif nmode == "ceil":
                i = math.ceil(xo)
            elif nmode == "round_prefer_ceil":
                i = math.floor(xo) + (1 if frac >= 0.5 else 0)
            else:
                i = math.floor(xo) + (1 if frac > 0.5 else 0)
            mat[o, min(max(i, 0), size_in - 1)] = 1.0
        elif mode == "linear":
            xc = min(max(xo, 0.0), size_in - 1)
            i0 = int(math.floor(xc))
            i1 = min(i0 + 1, size_in - 1)
            w1 = xc - i0
            mat[o, i0] += 1.0 - w1
            mat[o, i1] += w1
        else:
            raise UnsupportedOpError(
                f"Resize {node.name!r}: mode {mode!r} has no gradient rule (nearest and linear do)",
                op_type=node.op_type, node=node.name,
            )
    return mat


def _resize(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    x, y = node.input[0], node.output[0]
    if attr_int(node, "antialias", 0) or attr(node, "axes") is not None:
        raise UnsupportedOpError(
            f"Resize {node.name!r}: antialias/axes have no gradient rule", op_type=node.op_type, node=node.name
        )
    xs = ctx.static_shape(x, node)
    ys = ctx.static_shape(y, node)
    scales_v = ctx.const_value(_in(node, 2)) if _in(node, 2) else None
    if scales_v is not None and scales_v.size == 0:
        scales_v = None
    gx = g[0]
    rank = len(xs)
    for axis in range(rank):
        scale = float(scales_v[axis]) if scales_v is not None else ys[axis] / xs[axis]
        mat = _resize_matrix(node, xs[axis], ys[axis], scale)
        if mat.shape[0] == mat.shape[1] and np.array_equal(mat, np.eye(mat.shape[0])):
            continue
        m = ctx.const(mat.astype(ctx.np_dtype(x)), "resize_mat")  # (out, in)
        if axis == rank - 1:
            gx = ctx.emit("MatMul", [gx, m])
        else:
            perm = list(range(rank))
            perm[axis], perm[-1] = perm[-1], perm[axis]
            gx = ctx.transpose(ctx.emit("MatMul", [ctx.transpose(gx, perm), m]), perm)
    return [gx] + [None] * (len(node.input) - 1)


# ---------------------------------------------------------------------------------------------------
# Less common ops: more activations, max reductions, instance norm, LRN, Tile
# ---------------------------------------------------------------------------------------------------
def _elu(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    x, y = node.input[0], node.output[0]
    alpha = attr_float(node, "alpha", 1.0)
    neg = ctx.emit("Add", [y, ctx.scalar(alpha, x)])  # d/dx α(eˣ-1) = y + α for x ≤ 0
    mask = ctx.emit("Greater", [x, ctx.scalar(0.0, x)])
    return [ctx.emit("Mul", [g[0], ctx.emit("Where", [mask, ctx.scalar(1.0, x), neg])])]


def _selu(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    x, y = node.input[0], node.output[0]
    alpha = attr_float(node, "alpha", 1.67326319217681884765625)
    gamma = attr_float(node, "gamma", 1.05070102214813232421875)
    neg = ctx.emit("Add", [y, ctx.scalar(alpha * gamma, x)])  # γα·eˣ = y + γα for x ≤ 0
    mask = ctx.emit("Greater", [x, ctx.scalar(0.0, x)])
    return [ctx.emit("Mul", [g[0], ctx.emit("Where", [mask, ctx.scalar(gamma, x), neg])])]


def _gelu(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    x = node.input[0]

    def c(v: float) -> str:
        return ctx.scalar(v, x)

    def add(p: str, q: str) -> str:
        return ctx.emit("Add", [p, q])

    def mul(p: str, q: str) -> str:
        return ctx.emit("Mul", [p, q])

    x2 = mul(x, x)
    if attr_str(node, "approximate", "none") == "tanh":
        # y = x/2·(1 + tanh(u)), u = k(x + 0.044715x³): dy/dx = (1 + t)/2 + x/2·(1 - t²)·k(1 + 3·0.044715x²)
        k = math.sqrt(2.0 / math.pi)
        t = ctx.emit("Tanh", [mul(mul(x, add(c(1.0), mul(x2, c(0.044715)))), c(k))])
        du = mul(add(c(1.0), mul(x2, c(3 * 0.044715))), c(k))
        sech2 = ctx.emit("Sub", [c(1.0), mul(t, t)])
        d = add(mul(add(c(1.0), t), c(0.5)), mul(mul(mul(x, sech2), du), c(0.5)))
    else:  # y = x·Φ(x): dy/dx = Φ(x) + x·φ(x)
        cdf = mul(add(c(1.0), ctx.emit("Erf", [mul(x, c(1 / math.sqrt(2.0)))])), c(0.5))
        pdf = mul(ctx.emit("Exp", [mul(x2, c(-0.5))]), c(1 / math.sqrt(2 * math.pi)))
        d = add(cdf, mul(x, pdf))
    return [mul(g[0], d)]


def _reduce_extreme(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    x, y = node.input[0], node.output[0]
    axes = _reduce_axes(ctx, node)
    extra: list[str | None] = [None] * (len(node.input) - 1)
    if axes == []:
        return [g[0]] + extra
    all_axes = axes if axes is not None else list(range(ctx.rank(x, node)))
    gy, yk = g[0], y
    if not attr_int(node, "keepdims", 1):
        gy, yk = ctx.unsqueeze(gy, all_axes), ctx.unsqueeze(y, all_axes)
    mask = ctx.emit("Cast", [ctx.emit("Equal", [x, yk])], to=ctx.dtype(x))
    ties = ctx.reduce("ReduceSum", mask, all_axes, keepdims=True)
    return [ctx.emit("Mul", [mask, ctx.emit("Div", [gy, ties])])] + extra


def _global_max_pool(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    x, y = node.input[0], node.output[0]
    axes = list(range(2, ctx.rank(x, node)))
    mask = ctx.emit("Cast", [ctx.emit("Equal", [x, y])], to=ctx.dtype(x))
    ties = ctx.reduce("ReduceSum", mask, axes, keepdims=True)
    return [ctx.emit("Mul", [mask, ctx.emit("Div", [g[0], ties])])]


def _max_min(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    """Elementwise Max/Min: each input gets the grad where it is the winner (ties split)."""
    y = node.output[0]
    masks = [ctx.emit("Cast", [ctx.emit("Equal", [x, y])], to=ctx.dtype(y)) for x in node.input]
    count = ctx.emit("Sum", masks) if len(masks) > 1 else masks[0]
    share = ctx.emit("Div", [g[0], count])
    return [ctx.reduce_to(ctx.emit("Mul", [share, m]), x, y, node) for x, m in zip(node.input, masks)]


def _mean(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    share = ctx.emit("Mul", [g[0], ctx.scalar(1.0 / len(node.input), node.output[0])])
    return [ctx.reduce_to(share, x, node.output[0], node) for x in node.input]


def _instance_norm(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    """Per-sample, per-channel normalisation over the spatial axes; scale/bias per channel."""
    x, scale = node.input[0], node.input[1]
    rank = ctx.rank(x, node)
    axes = list(range(2, rank))
    eps = attr_float(node, "epsilon", 1e-5)
    bshape = [-1] + [1] * (rank - 2)
    mu = ctx.reduce("ReduceMean", x, axes, keepdims=True)
    d = ctx.emit("Sub", [x, mu])
    var = ctx.reduce("ReduceMean", ctx.emit("Mul", [d, d]), axes, keepdims=True)
    rstd = ctx.emit("Reciprocal", [ctx.emit("Sqrt", [ctx.emit("Add", [var, ctx.scalar(eps, x)])])])
    xhat = ctx.emit("Mul", [d, rstd])
    gxhat = ctx.emit("Mul", [g[0], ctx.reshape(scale, bshape)])
    m1 = ctx.reduce("ReduceMean", gxhat, axes, keepdims=True)
    m2 = ctx.reduce("ReduceMean", ctx.emit("Mul", [gxhat, xhat]), axes, keepdims=True)
    gx = ctx.emit("Mul", [rstd, ctx.emit("Sub", [ctx.emit("Sub", [gxhat, m1]), ctx.emit("Mul", [xhat, m2])])])
    outer = [0] + axes
    gscale = ctx.reduce("ReduceSum", ctx.emit("Mul", [g[0], xhat]), outer, keepdims=False)
    gbias = ctx.reduce("ReduceSum", g[0], outer, keepdims=False)
    return [gx, gscale, gbias]


def _lrn(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    """y = x·d^-β, d = bias + α/n·Σ_window x²; channel-window sums are a Conv with a ones kernel."""
    x, y = node.input[0], node.output[0]
    shape = ctx.static_shape(x, node)
    size = attr_int(node, "size", 1)
    alpha = attr_float(node, "alpha", 1e-4)
    beta = attr_float(node, "beta", 0.75)
    bias = attr_float(node, "bias", 1.0)
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2  # window [c-lo, c+hi]
    c = shape[1]
    ones = ctx.const(np.ones((1, 1, size, 1), ctx.np_dtype(x)), "lrn_ones")

    def window_sum(t: str, before: int, after: int) -> str:
        flat = ctx.reshape(t, [-1, 1, c, int(np.prod(shape[2:]))])
        summed = ctx.emit("Conv", [flat, ones], pads=[before, 0, after, 0], kernel_shape=[size, 1])
        return ctx.reshape(summed, shape)

    d = ctx.emit("Add", [ctx.emit("Mul", [window_sum(ctx.emit("Mul", [x, x]), lo, hi), ctx.scalar(alpha / size, x)]),
                         ctx.scalar(bias, x)])
    direct = ctx.emit("Mul", [g[0], ctx.emit("Pow", [d, ctx.scalar(-beta, x)])])
    t = ctx.emit("Div", [ctx.emit("Mul", [g[0], y]), d])  # g·x·d^(-β-1)
    back = window_sum(t, hi, lo)  # transpose window: every c whose window holds j
    cross = ctx.emit("Mul", [ctx.emit("Mul", [x, back]), ctx.scalar(2.0 * alpha * beta / size, x)])
    return [ctx.emit("Sub", [direct, cross])]


def _tile(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    """Tile the index grid too, then scatter-add every copy's grad back to its source."""
    x = node.input[0]
    n, grid = _index_grid(ctx, x)
    picked = ctx.emit("Tile", [grid, node.input[1]])
    return [_scatter_flat(ctx, x, picked, g[0], n), None]


# ---------------------------------------------------------------------------------------------------
def default_registry() -> VJPRegistry:
    """A fresh registry with every built-in rule (callers may add their own to it)."""
    reg = VJPRegistry()
    table: dict[str, Rule] = {
        "Identity": _identity, "Dropout": _identity,
        "Add": _add, "Sub": _sub, "Mul": _mul, "Div": _div, "Neg": _neg, "Sum": _sum,
        "Relu": _relu, "LeakyRelu": _leaky_relu, "PRelu": _prelu, "Clip": _clip,
        "Sigmoid": _sigmoid, "HardSigmoid": _hard_sigmoid, "HardSwish": _hard_swish, "Tanh": _tanh,
        "Erf": _erf, "Exp": _exp, "Log": _log, "Sqrt": _sqrt, "Reciprocal": _reciprocal, "Abs": _abs,
        "Softplus": _softplus, "Pow": _pow, "Cast": _cast, "Where": _where, "Expand": _expand,
        "Softmax": _softmax, "LogSoftmax": _log_softmax,
        "BatchNormalization": _batch_norm, "LayerNormalization": _layer_norm,
        "MatMul": _matmul, "Gemm": _gemm, "Conv": _conv, "ConvTranspose": _conv_transpose,
        "MaxPool": _max_pool, "AveragePool": _average_pool, "GlobalAveragePool": _global_average_pool,
        "ReduceMean": _reduce_sum_or_mean(mean=True), "ReduceSum": _reduce_sum_or_mean(mean=False),
        "Flatten": _reshape_back, "Reshape": _reshape_back, "Squeeze": _reshape_back, "Unsqueeze": _reshape_back,
        "Transpose": _transpose_rule, "Concat": _concat, "Split": _split, "Slice": _slice, "Pad": _pad,
        "Gather": _gather, "GatherElements": _gather_elements, "Resize": _resize,
        "Elu": _elu, "Selu": _selu, "Gelu": _gelu, "ReduceMax": _reduce_extreme, "ReduceMin": _reduce_extreme,
        "GlobalMaxPool": _global_max_pool, "Max": _max_min, "Min": _max_min, "Mean": _mean,
        "InstanceNormalization": _instance_norm, "LRN": _lrn, "Tile": _tile,
    }
    for op, rule in table.items():
        reg.register(op, rule)
    return reg
