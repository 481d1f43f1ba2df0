"""Gemm and MatMul: output features start groups; batched MatMul carries channels through batch dims."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.analysis.analyzer import Analyzer
from onnxprune.analysis.core import ChannelMap, SiteRole
from onnxprune.analysis.graph import optional_input


def gemm(az: Analyzer, node: gs.Node) -> None:
    a_t, b_t, c_t = node.inputs[0], node.inputs[1], optional_input(node, 2)
    am, b = az.map(a_t), az.const(b_t)
    if b is None:
        az.block_inputs(node, f"Gemm {node.name} weights are computed at runtime")
        return
    trans_a, trans_b = int(node.attrs.get("transA", 0)), int(node.attrs.get("transB", 0))
    if am is not None and am.axis != (0 if trans_a else 1):
        az.block(am.ids, f"Gemm {node.name} reads features on another axis")
        am = None
    if am is not None:
        az.site(b_t, 1 if trans_b else 0, am.ids, node, SiteRole.IN)
    n = int(b.shape[0 if trans_b else 1])
    ids = az.new_ids(n, node)
    az.site(b_t, 0 if trans_b else 1, ids, node, SiteRole.OUT)
    if c_t is not None:
        c = az.const(c_t)
        if c is None:
            az.block(ids, f"Gemm {node.name} adds a computed C")
        elif c.ndim >= 1 and c.shape[-1] == n and n > 1:
            az.site(c_t, c.ndim - 1, ids, node, SiteRole.PARAM)
    az.set_map(node.outputs[0], ChannelMap(1, ids))


def matmul(az: Analyzer, node: gs.Node) -> None:
    """MatMul with a constant right operand is a producer (its columns) and a consumer (its rows).

    A constant of rank > 2 (batched weights) is sliced on its last two axes. Two computed operands
    (attention scores and context) are handled by :func:`batched_matmul`.
    """
    a_t, b_t = node.inputs
    b = az.const(b_t)
    if b is None or az.map(b_t) is not None:
        batched_matmul(az, node)
        return
    if b.ndim < 2:
        az.block_inputs(node, f"MatMul {node.name} has a 1-D weight")
        return
    am, rank = az.map(a_t), az.rank(a_t)
    if am is not None and (rank is None or am.axis != rank - 1):
        az.block(am.ids, f"MatMul {node.name} reads features on another axis")
        am = None
    if am is not None:
        az.site(b_t, b.ndim - 2, am.ids, node, SiteRole.IN)
    ids = az.new_ids(int(b.shape[-1]), node)
    az.site(b_t, b.ndim - 1, ids, node, SiteRole.OUT)
    out_rank = az.rank(node.outputs[0]) or (max(rank, b.ndim) if rank is not None else None)
    if out_rank is None:
        az.block(ids, f"MatMul {node.name} output rank unknown")
        return
    az.set_map(node.outputs[0], ChannelMap(out_rank - 1, ids))


def batched_matmul(az: Analyzer, node: gs.Node) -> None:
    """MatMul of two computed tensors [.., M, K] @ [.., K, N] (attention): channels may sit on a batch
    axis (heads: coupled between the operands), on M or N (passed to the output), or on K on both
    sides (contracted: coupled, the output carries none of them)."""
    a_t, b_t = node.inputs
    am, bm = az.map(a_t), az.map(b_t)
    if am is None and bm is None:
        return
    ra, rb, ro = az.rank(a_t), az.rank(b_t), az.rank(node.outputs[0])
    maps = [m for m in (am, bm) if m is not None]
    if ra is None or rb is None or ro is None or ra < 2 or rb < 2:
        for m in maps:
            az.block(m.ids, f"MatMul {node.name}: operand ranks unknown or 1-D")
        return
    out: dict[int, np.ndarray] = {}
    contracted: list[ChannelMap] = []
    for m, r, inner, outer, row_axis in ((am, ra, ra - 1, ra - 2, ro - 2), (bm, rb, rb - 2, rb - 1, ro - 1)):
        if m is None:
            continue
        if m.axis == inner:
            contracted.append(m)
        elif m.axis == outer:
            out[row_axis] = m.ids
        else:
            axis = ro - r + m.axis
            out[axis] = az.couple(out[axis], m.ids, f"MatMul {node.name} couples heads with unprunable ones") \
                if axis in out and len(out[axis]) == len(m.ids) else m.ids
    if contracted:
        if len(contracted) == 2 and len(am.ids) == len(bm.ids):
            az.couple(am.ids, bm.ids, f"MatMul {node.name} contracts them with unprunable features")
        else:
            for m in contracted:
                az.block(m.ids, f"MatMul {node.name} contracts them with a computed operand that has none")
    if not _batch_dims_agree(az, node, out, ro):
        return
    if len(out) > 1:
        for ids in out.values():
            az.block(ids, f"MatMul {node.name} would carry channels on two axes")
        return
    if out:
        axis, ids = next(iter(out.items()))
        az.set_map(node.outputs[0], ChannelMap(axis, ids))


def _batch_dims_agree(az: Analyzer, node: gs.Node, out: dict[int, np.ndarray], ro: int) -> bool:
    """A batch-axis channel map needs the other operand to have it too, or to broadcast (size 1)."""
    ok = True
    for axis, ids in out.items():
        if axis >= ro - 2:
            continue
        for t in node.inputs:
            m, dims = az.map(t), az.shape(t)
            local = axis - (ro - len(dims)) if dims is not None else -1
            if m is not None and m.axis == local:
                continue
            if dims is None or (local >= 0 and dims[local] != 1):
                az.block(ids, f"MatMul {node.name} pairs them with {t.name}, which has no prunable channels")
                ok = False
    return ok
