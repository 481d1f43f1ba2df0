"""Activations: the ReLU family, Clip, sigmoids, Tanh, Softplus, GELU, and Softmax/LogSoftmax."""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType

import onnx

from onnxprune.errors import UnsupportedOpError
from onnxprune.training.grad.context import GradContext, Grads, Rule
from onnxprune.training.grad.rules._common import attr_float, attr_int, attr_str, optional_input


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
    lo, hi = optional_input(node, 1), optional_input(node, 2)
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


def _sigmoid(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    y = node.output[0]
    one_minus = ctx.emit("Sub", [ctx.scalar(1.0, y), y])
    return [ctx.emit("Mul", [g[0], ctx.emit("Mul", [y, one_minus])])]


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


def _tanh(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    y = node.output[0]
    d = ctx.emit("Sub", [ctx.scalar(1.0, y), ctx.emit("Mul", [y, y])])
    return [ctx.emit("Mul", [g[0], d])]


def _softplus(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    return [ctx.emit("Mul", [g[0], ctx.emit("Sigmoid", [node.input[0]])])]


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


#: The ops this family differentiates.
RULES: Mapping[str, Rule] = MappingProxyType({
    "Relu": _relu,
    "LeakyRelu": _leaky_relu,
    "PRelu": _prelu,
    "Clip": _clip,
    "Elu": _elu,
    "Selu": _selu,
    "Sigmoid": _sigmoid,
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": _hard_swish,
    "Tanh": _tanh,
    "Softplus": _softplus,
    "Gelu": _gelu,
    "Softmax": _softmax,
    "LogSoftmax": _log_softmax,
})
