"""Normalisation: BatchNormalization (inference mode), LayerNormalization, InstanceNormalization, LRN."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
import onnx

from onnxprune.errors import UnsupportedOpError
from onnxprune.training.grad.context import GradContext, Grads, Rule
from onnxprune.training.grad.rules._common import attr_float, attr_int, optional_input


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
    bias = optional_input(node, 2)
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


#: The ops this family differentiates.
RULES: Mapping[str, Rule] = MappingProxyType({
    "BatchNormalization": _batch_norm,
    "LayerNormalization": _layer_norm,
    "InstanceNormalization": _instance_norm,
    "LRN": _lrn,
})
