"""Helpers several rule families share: reading node attributes and optional inputs, element counts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from onnxprune.errors import UnsupportedOpError
from onnxprune.training.grad.context import GradContext


def optional_input(node: onnx.NodeProto, i: int) -> str:
    """Name of input ``i`` of ``node``, or "" when the node leaves it off."""
    return node.input[i] if len(node.input) > i else ""


def attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    """Value of attribute ``name`` of ``node`` (ints/floats as lists), or ``default``."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def attr_int(node: onnx.NodeProto, name: str, default: int) -> int:
    return int(attr(node, name, default))  # type: ignore[call-overload]


def attr_float(node: onnx.NodeProto, name: str, default: float) -> float:
    return float(attr(node, name, default))  # type: ignore[arg-type]


def attr_ints(node: onnx.NodeProto, name: str, default: Sequence[int] | None = None) -> list[int]:
    """A list-of-ints attribute; raises when required (``default`` None) and missing."""
    value = attr(node, name, default)
    if value is None:
        raise UnsupportedOpError(f"{node.op_type} {node.name!r} lacks attribute {name!r}",
                                 op_type=node.op_type, node=node.name)
    return [int(v) for v in value]  # type: ignore[union-attr]


def attr_str(node: onnx.NodeProto, name: str, default: str) -> str:
    value = attr(node, name, default)
    return value.decode() if isinstance(value, bytes) else str(value)


def count_per_output(ctx: GradContext, x: str, y: str) -> str:
    """Elements of ``x`` per element of ``y`` as a float scalar (static when known)."""
    xs, ys = ctx.shape(x), ctx.shape(y)
    if xs and ys is not None and all(isinstance(d, int) for d in xs + ys):
        return ctx.scalar(float(np.prod(xs)) / float(np.prod(ys)), x)  # type: ignore[arg-type]
    dt = ctx.dtype(x)
    sizes = [ctx.emit("Cast", [ctx.emit("Size", [t])], to=dt) for t in (x, y)]
    return ctx.emit("Div", sizes)
