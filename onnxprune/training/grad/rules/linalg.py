"""Matrix products: MatMul (with numpy-style batch broadcasting and 1-D operands) and Gemm."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import onnx

from onnxprune.errors import UnsupportedOpError
from onnxprune.training.grad.context import GradContext, Grads, Rule
from onnxprune.training.grad.rules._common import attr_float, attr_int, optional_input


def _swap_last(ctx: GradContext, x: str, rank: int) -> str:
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    return ctx.transpose(x, perm)


def _matmul(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    a, b = node.input[0], node.input[1]
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
    if rb == 2 and ra > 2:
        # a shared weight (x[N, T, K] @ W[K, C]): one [K, C] product over the flattened rows instead of
        # N products [K, C] summed afterwards (PP-OCR rec's head at batch 16: 48 MB less at the peak)
        k, c = ctx.shape(b) or [None, None]
        if isinstance(k, int) and isinstance(c, int):
            gb = ctx.emit("Gemm", [ctx.reshape(a, [-1, k]), ctx.reshape(gy, [-1, c])], transA=1)
            return [_sum_to_shape(ctx, ga, a, ry, node), gb]
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
                return ctx.sum_to_runtime_shape(grad, target, grad_rank - len(ts))
    out = ctx.reduce("ReduceSum", grad, axes, keepdims=True) if axes else grad
    return ctx.reshape_like(out, target)


def _gemm(ctx: GradContext, node: onnx.NodeProto, g: Grads) -> list[str | None]:
    a, b, c, y = node.input[0], node.input[1], optional_input(node, 2), node.output[0]
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


#: The ops this family differentiates.
RULES: Mapping[str, Rule] = MappingProxyType({
    "MatMul": _matmul,
    "Gemm": _gemm,
})
