"""Reductions: ReduceSum/ReduceMean spread the gradient back; ReduceMax/ReduceMin route it to the extremes."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import onnx

from onnxprune.errors import UnsupportedOpError
from onnxprune.training.grad.context import GradContext, Grads, Rule
from onnxprune.training.grad.rules._common import attr, attr_int, count_per_output, optional_input


def _reduce_axes(ctx: GradContext, node: onnx.NodeProto) -> list[int] | None:
    """Normalised reduction axes, or None for 'all axes'; [] means identity (noop_with_empty_axes)."""
    rank = ctx.rank(node.input[0], node)
    axes = attr(node, "axes")
    if axes is None and optional_input(node, 1):
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
            gx = ctx.emit("Div", [gx, count_per_output(ctx, x, y)])
        return [gx] + extra

    return rule


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


#: The ops this family differentiates.
RULES: Mapping[str, Rule] = MappingProxyType({
    "ReduceSum": _reduce_sum_or_mean(mean=False),
    "ReduceMean": _reduce_sum_or_mean(mean=True),
    "ReduceMax": _reduce_extreme,
    "ReduceMin": _reduce_extreme,
})
