"""Resize: the transpose of a separable per-axis interpolation matrix (nearest and linear modes)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
import onnx

from onnxprune.errors import UnsupportedOpError
from onnxprune.training.grad.context import GradContext, Grads, Rule
from onnxprune.training.grad.rules._common import attr, attr_int, attr_str, optional_input


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
    scales_v = ctx.const_value(optional_input(node, 2)) if optional_input(node, 2) else None
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


#: The ops this family differentiates.
RULES: Mapping[str, Rule] = MappingProxyType({
    "Resize": _resize,
})
