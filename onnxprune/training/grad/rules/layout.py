"""Shape and indexing ops: Reshape and friends, Transpose, Expand, Concat/Split, Slice, Pad, Tile, Gather, Trilu.

Ops that move elements around (Slice, Pad, Tile, Gather off axis 0) apply themselves to a grid of flat
indices and scatter-add the gradient back through it, so any steps, pads or repeats come out right.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxprune.training.grad.context import GradContext, Grads, Rule
from onnxprune.training.grad.rules._common import attr, attr_int, attr_str, optional_input


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


def _expand(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    return [ctx.reduce_to(g[0], node.input[0], node.output[0], node), None]


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
    if len(node.input) == 1:
        return [g[0]]
    dims = [(ctx.shape(x) or [None] * rank)[axis] for x in node.input]
    if all(isinstance(d, int) for d in dims):  # one constant: shape inference then sees the parts' shapes
        split = ctx.ints([int(d) for d in dims])  # type: ignore[arg-type]
    else:
        split = ctx.emit("Concat", [_dim_along(ctx, x, axis) for x in node.input], axis=0)
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
    if optional_input(node, 3):
        inputs.append(node.input[3])
    while inputs and not inputs[-1]:
        inputs.pop()
    picked = ctx.emit("Pad", inputs, mode=mode)
    return [_scatter_flat(ctx, x, picked, g[0], n, extra=1)] + [None] * (len(node.input) - 1)


def _tile(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    """Tile the index grid too, then scatter-add every copy's grad back to its source."""
    x = node.input[0]
    n, grid = _index_grid(ctx, x)
    picked = ctx.emit("Tile", [grid, node.input[1]])
    return [_scatter_flat(ctx, x, picked, g[0], n), None]


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


def _trilu(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    """Trilu keeps a triangle and zeroes the rest: the same triangle of the gradient passes back."""
    return [ctx.emit("Trilu", [g[0], *node.input[1:]], upper=attr_int(node, "upper", 1)), None]


def _gather_elements(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    data, indices = node.input[0], node.input[1]
    axis = attr_int(node, "axis", 0)
    gd = ctx.emit("ScatterElements", [ctx.zeros_like(data), indices, g[0]], axis=axis, reduction="add")
    return [gd, None]


#: The ops this family differentiates.
RULES: Mapping[str, Rule] = MappingProxyType({
    "Flatten": _reshape_back,
    "Reshape": _reshape_back,
    "Squeeze": _reshape_back,
    "Unsqueeze": _reshape_back,
    "Transpose": _transpose_rule,
    "Expand": _expand,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Pad": _pad,
    "Tile": _tile,
    "Gather": _gather,
    "GatherElements": _gather_elements,
    "Trilu": _trilu,
})
