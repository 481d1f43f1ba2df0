"""Einsum dense layers (tf2onnx/jax2tf Keras exports: ``...i,ij->...j``, ``abc,cd->abd``): like MatMul.

A two-operand Einsum whose weight is a 2-D constant with one contracted index ``k`` (in the data
operand, not in the output) and one free index ``n`` (only in the weight and the output) is a dense
layer: the weight's ``n`` axis starts a group, its ``k`` axis follows the data's channels. Anything
else (multi-head ``abc,cde->abde``, two computed operands, repeated or broadcast indices) blocks with
the equation in the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from onnxprune.analysis.analyzer import Analyzer
from onnxprune.analysis.core import ChannelMap, SiteRole

ELLIPSIS = "..."


@dataclass(frozen=True)
class DenseEinsum:
    """Where a dense Einsum's indices sit: the data operand's contracted axis, the weight's axes, the output axis."""

    data: int
    """Which input is the data (the other is the weight)."""
    data_axis: int
    """The contracted index's axis in the data operand."""
    weight_in: int
    """The weight's contracted axis (rows)."""
    weight_out: int
    """The weight's free axis (columns)."""
    out_axis: int
    """The free index's axis in the output."""


def expand_term(term: str, rank: int) -> list[str] | None:
    """The index of every axis of a ``rank``-D operand; ``...`` becomes right-aligned ``…k`` labels (k counted from
    the right, so operands and output agree). None when the term does not fit the rank."""
    if term.count(ELLIPSIS) > 1:
        return None
    if ELLIPSIS not in term:
        return list(term) if len(term) == rank else None
    head, tail = term.split(ELLIPSIS)
    fill = rank - len(head) - len(tail)
    if fill < 0:
        return None
    return [*head, *(f"…{k}" for k in range(fill - 1, -1, -1)), *tail]


def dense_einsum(equation: str, ranks: tuple[int, int], weight: int, out_rank: int) -> DenseEinsum | None:
    """The dense-layer reading of ``equation`` (operand ranks ``ranks``, input ``weight`` constant), or None
    when it is not one.

    Example:
        >>> dense_einsum("...i,ij->...j", (3, 2), 1, 3)
        DenseEinsum(data=0, data_axis=2, weight_in=0, weight_out=1, out_axis=2)
    """
    eq = equation.replace(" ", "")
    if "->" not in eq:
        return None
    lhs, out_term = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != 2:
        return None
    data = 1 - weight
    x = expand_term(terms[data], ranks[data])
    w = expand_term(terms[weight], ranks[weight])
    out = expand_term(out_term, out_rank)
    if x is None or w is None or out is None or len(w) != 2 or any(len(set(s)) != len(s) for s in (x, w, out)):
        return None
    contracted = [i for i in w if i in x and i not in out]
    free = [i for i in w if i not in x and i in out]
    if len(contracted) != 1 or len(free) != 1 or any(i not in out for i in x if i != contracted[0]):
        return None
    if set(out) != (set(x) - set(contracted)) | set(free):
        return None
    k, n = contracted[0], free[0]
    return DenseEinsum(data, x.index(k), w.index(k), w.index(n), out.index(n))


def einsum(az: Analyzer, node: gs.Node) -> None:
    """A dense Einsum is a producer (the weight's free axis) and a consumer (its contracted axis)."""
    equation = str(node.attrs.get("equation", ""))
    consts = [i for i, t in enumerate(node.inputs) if az.const(t) is not None and az.map(t) is None]
    ranks = [az.rank(t) for t in [*node.inputs, node.outputs[0]]]
    dense = None
    if len(node.inputs) == 2 and len(consts) == 1 and all(r is not None for r in ranks):
        dense = dense_einsum(equation, (ranks[0], ranks[1]), consts[0], ranks[2])  # type: ignore[arg-type]
    if dense is None:
        az.block_inputs(node, f"Einsum {node.name} with equation {equation!r} is not a dense layer the analysis follows")
        return
    x_t, w_t = node.inputs[dense.data], node.inputs[1 - dense.data]
    xm, w = az.map(x_t), az.const(w_t)
    if xm is not None and xm.axis != dense.data_axis:
        az.block(xm.ids, f"Einsum {node.name} ({equation}) keeps them on a free axis beside its own outputs")
        xm = None
    if xm is not None:
        az.site(w_t, dense.weight_in, xm.ids, node, SiteRole.IN)
    ids = az.new_ids(int(w.shape[dense.weight_out]), node)
    az.site(w_t, dense.weight_out, ids, node, SiteRole.OUT)
    az.set_map(node.outputs[0], ChannelMap(dense.out_axis, ids))
