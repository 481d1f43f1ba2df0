"""Elementwise arithmetic and maths: broadcasting binary ops, n-ary Sum/Max/Min/Mean, Pow, unary maths (Sin/Cos
for rotary tables trained on purpose), Cast, Where.

Broadcast inputs get their gradient summed back to their own shape (:meth:`GradContext.reduce_to`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
import onnx

from onnxprune.training.grad.context import GradContext, Grads, Rule


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


def _pow(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    x, p, y = node.input[0], node.input[1], node.output[0]
    pm1 = ctx.emit("Sub", [p, ctx.const(np.asarray(1, ctx.np_dtype(p)))])
    dpx = ctx.emit("Mul", [ctx.emit("Pow", [x, pm1]), ctx.emit("Cast", [p], to=ctx.dtype(x))])
    gx = ctx.reduce_to(ctx.emit("Mul", [g[0], dpx]), x, y, node)
    gp: str | None = None
    if ctx.dtype(p) == ctx.dtype(x):
        gp = ctx.reduce_to(ctx.emit("Mul", [ctx.emit("Mul", [g[0], y]), ctx.emit("Log", [x])]), p, y, node)
    return [gx, gp]


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


def _erf(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    x = node.input[0]
    e = ctx.emit("Exp", [ctx.emit("Neg", [ctx.emit("Mul", [x, x])])])
    return [ctx.emit("Mul", [g[0], ctx.emit("Mul", [e, ctx.scalar(2.0 / math.sqrt(math.pi), x)])])]


def _sin(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    return [ctx.emit("Mul", [g[0], ctx.emit("Cos", [node.input[0]])])]


def _cos(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    return [ctx.emit("Neg", [ctx.emit("Mul", [g[0], ctx.emit("Sin", [node.input[0]])])])]


def _cast(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    return [ctx.emit("Cast", [g[0]], to=ctx.dtype(node.input[0]))]


def _where(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    c, a, b, y = node.input[0], node.input[1], node.input[2], node.output[0]
    zero = ctx.scalar(0.0, y)
    ga = ctx.reduce_to(ctx.emit("Where", [c, g[0], zero]), a, y, node)
    gb = ctx.reduce_to(ctx.emit("Where", [c, zero, g[0]]), b, y, node)
    return [None, ga, gb]


#: The ops this family differentiates.
RULES: Mapping[str, Rule] = MappingProxyType({
    "Identity": _identity,
    "Dropout": _identity,
    "Add": _add,
    "Sub": _sub,
    "Mul": _mul,
    "Div": _div,
    "Neg": _neg,
    "Sum": _sum,
    "Max": _max_min,
    "Min": _max_min,
    "Mean": _mean,
    "Pow": _pow,
    "Exp": _exp,
    "Log": _log,
    "Sqrt": _sqrt,
    "Reciprocal": _reciprocal,
    "Abs": _abs,
    "Erf": _erf,
    "Sin": _sin,
    "Cos": _cos,
    "Cast": _cast,
    "Where": _where,
})
