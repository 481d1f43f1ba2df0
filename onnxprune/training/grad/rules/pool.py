"""Pooling: average pools as a ConvTranspose with a ones kernel, max pools routed to the winners."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxprune.errors import UnsupportedOpError
from onnxprune.training.grad.context import GradContext, Grads, Rule
from onnxprune.training.grad.rules._common import attr, attr_int, attr_ints, count_per_output
from onnxprune.training.grad.rules._window import conv_geometry, spatial_dims, transpose_pads


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
    in_sp = spatial_dims(ctx, x, node)
    kernel = attr_ints(node, "kernel_shape")
    strides, dil, pb, pe, out_sp = conv_geometry(ctx, node, in_sp, kernel)
    known = ctx.shape(y)
    if known is not None and all(isinstance(d, int) for d in known[2:]):
        out_sp = [int(d) for d in known[2:]]  # type: ignore[arg-type]
    include = bool(attr(node, "count_include_pad", 0))
    counts = _pool_counts(in_sp, out_sp, kernel, strides, dil, pb, pe, include)
    inv = ctx.const((1.0 / counts).astype(ctx.np_dtype(x)), "pool_inv")
    gs = ctx.reshape(ctx.emit("Mul", [g[0], inv]), [-1, 1] + out_sp)
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dil)]
    pe_new, opad = transpose_pads(in_sp, out_sp, strides, eff, pb)
    ones = ctx.const(np.ones([1, 1] + kernel, ctx.np_dtype(x)), "pool_ones")
    gx = ctx.emit(
        "ConvTranspose", [gs, ones], strides=strides, dilations=dil, pads=pb + pe_new,
        output_padding=opad if any(opad) else None, kernel_shape=kernel,
    )
    return [ctx.reshape_like(gx, x)]


def _global_average_pool(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    x, y = node.input[0], node.output[0]
    return [ctx.emit("Div", [ctx.emit("Expand", [g[0], ctx.shape_of(x)]), count_per_output(ctx, x, y)])]


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


def _global_max_pool(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    x, y = node.input[0], node.output[0]
    axes = list(range(2, ctx.rank(x, node)))
    mask = ctx.emit("Cast", [ctx.emit("Equal", [x, y])], to=ctx.dtype(x))
    ties = ctx.reduce("ReduceSum", mask, axes, keepdims=True)
    return [ctx.emit("Mul", [mask, ctx.emit("Div", [g[0], ties])])]


#: The ops this family differentiates.
RULES: Mapping[str, Rule] = MappingProxyType({
    "AveragePool": _average_pool,
    "GlobalAveragePool": _global_average_pool,
    "MaxPool": _max_pool,
    "GlobalMaxPool": _global_max_pool,
})
