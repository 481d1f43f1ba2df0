"""How shape *values* flow: folding shape arithmetic, tracing shape entries, tracking channel counts.

Exporters compute Reshape targets, Slice bounds and Split sizes at runtime from ``Shape``. Three
questions matter to the channel analysis, each answered here:

* what shapes and small values does that arithmetic produce once the inputs are fixed
  (:func:`shape_facts`: fold a copy of the graph);
* where does one entry of a shape tensor come from — a constant to edit, or a dim of a runtime tensor
  (:func:`shape_source`);
* which runtime values depend on a channel count read by ``Shape`` and where they are used
  (:func:`follow_shape_reads`, :func:`check_shape_reads`): pruning changes them, which is fine only
  where the analysis knows it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

if TYPE_CHECKING:
    from onnxprune.analysis.analyzer import Analyzer
from onnxprune.analysis.core import FixupKind
from onnxprune.analysis.graph import optional_input, producer

log = logging.getLogger(__name__)

SHAPE_PASS = ("Cast", "Identity", "Unsqueeze", "Squeeze")


ARITHMETIC = ("Add", "Sub", "Mul", "Div")


def follow_shape_reads(az: Analyzer, node: gs.Node) -> list[tuple[int, int, str]]:
    """Track channel counts read by ``Shape`` through shape arithmetic, entry by entry.

    ``Shape(x)`` of a tensor with channels marks the entry of x's channel axis; Gather/Slice/Concat/
    Cast/Unsqueeze/Squeeze carry the marks. Any other consumer of a marked entry is returned as
    (input index, entry, tensor whose count it is) for :func:`check_shape_reads`: pruning x changes
    that value at runtime, which is fine only where the analysis knows it (a Reshape of x itself).
    """
    if node.op == "Shape":
        _start_shape_read(az, node)
        return []
    reads = [(i, az.shape_reads[t.name]) for i, t in enumerate(node.inputs) if t.name in az.shape_reads]
    if not reads:
        return []
    entries = _carry_shape_read(az, node)
    if entries is not None:
        if any(entries):
            az.shape_reads[node.outputs[0].name] = entries
        return []
    return [(i, p, origin) for i, marks in reads for p, origins in enumerate(marks) for origin in origins]


def _start_shape_read(az: Analyzer, node: gs.Node) -> None:
    x = node.inputs[0]
    m, rank = az.map(x), az.rank(x)
    if m is None or rank is None:
        return
    start = int(node.attrs.get("start", 0))
    end = int(node.attrs.get("end", rank))
    start, end = (min(max(v + rank if v < 0 else v, 0), rank) for v in (start, end))
    if start <= m.axis < end:
        entries: list[tuple[str, ...]] = [() for _ in range(start, end)]
        entries[m.axis - start] = (x.name,)
        az.shape_reads[node.outputs[0].name] = entries


def _carry_shape_read(az: Analyzer, node: gs.Node) -> list[tuple[str, ...]] | None:
    """The marks of a shape op's output, or None when ``node`` is not a shape op the analysis follows."""
    def marks(t: gs.Tensor) -> list[tuple[str, ...]] | None:
        if t.name in az.shape_reads:
            return az.shape_reads[t.name]
        dims = az.shape(t)
        if dims is None or len(dims) > 1 or (dims and not isinstance(dims[0], int)):
            return None
        return [()] * (dims[0] if dims else 1)

    src = marks(node.inputs[0]) if node.inputs else None
    if node.op in SHAPE_PASS and all(t.name not in az.shape_reads for t in node.inputs[1:]):
        return src
    if node.op in ARITHMETIC and src is not None and len(node.inputs) == 2 and node.inputs[1].name not in az.shape_reads:
        c, dims = az.const(node.inputs[1]), az.shape(node.inputs[1])
        if c is not None:
            return src if c.size == 1 else None
        # a count times (or over) a runtime scalar that no cut changes (h * d of a merge): the consumer checks it
        return src if node.op in ("Mul", "Div") and dims in ([], [1]) else None
    if node.op == "Gather" and int(node.attrs.get("axis", 0)) == 0 and src is not None:
        idx = az.const(node.inputs[1])
        return None if idx is None else [src[int(i)] for i in idx.reshape(-1)]
    if node.op == "Slice" and src is not None:
        bounds = [az.const(node.inputs[k]) if len(node.inputs) > k and node.inputs[k].name else None for k in (1, 2, 4)]
        if bounds[0] is None or bounds[1] is None or bounds[0].size != 1:
            return None
        step = 1 if bounds[2] is None else int(bounds[2].reshape(-1)[0])
        return src[slice(int(bounds[0].reshape(-1)[0]), int(bounds[1].reshape(-1)[0]), step)]
    if node.op == "Concat":
        parts = [marks(t) for t in node.inputs]
        return None if any(p is None for p in parts) else [e for p in parts for e in p]  # type: ignore[union-attr]
    return _carry_expand_arithmetic(az, node, src, marks)


def _is_minus_one_test(az: Analyzer, node: gs.Node | None) -> bool:
    """``Equal(t, c)`` with ``c`` all negative (TorchScript's expand: ``-1`` keeps a dim)."""
    if node is None or node.op != "Equal":
        return False
    c = az.const(node.inputs[1])
    c = az.folded.get(node.inputs[1].name) if c is None else c
    return c is not None and c.size > 0 and bool(np.all(c < 0))


def _carry_expand_arithmetic(
    az: Analyzer, node: gs.Node, src: list[tuple[str, ...]] | None,
    marks: Callable[[gs.Tensor], list[tuple[str, ...]] | None],
) -> list[tuple[str, ...]] | None:
    """TorchScript's ``expand`` target: ``Where(Equal(Reshape(t, [-1]), -1), ones, t)``. Flattening a shape
    vector keeps its entries; a count is never negative, so comparing it with a negative constant reads
    nothing a cut changes; Where picks entries from either value input."""
    if node.op == "Reshape" and src is not None:
        target = az.const(node.inputs[1])
        return src if target is not None and target.reshape(-1).tolist() in ([-1], [len(src)]) else None
    if node.op == "Equal" and src is not None and node.inputs[1].name not in az.shape_reads:
        return [()] * len(src) if _is_minus_one_test(az, node) else None
    if node.op == "Where" and node.inputs[0].name not in az.shape_reads:
        a, b = marks(node.inputs[1]), marks(node.inputs[2])
        if a is None or b is None or len(a) != len(b):
            return None
        return [tuple(dict.fromkeys(x + y)) for x, y in zip(a, b)]
    return None


def check_shape_reads(az: Analyzer, node: gs.Node, reads: list[tuple[int, int, str]]) -> None:
    """Block channels whose count a node computes with, unless it is a Reshape or Expand that gives the
    same channels the same axis, each a fixed number of times (the count then follows the cut by itself)."""
    for i, p, origin in reads:
        if (node.name, i, p) in az.pinned or (node.name, i, -1) in az.pinned:
            continue  # replaced by a constant when the cut happens
        source, out = az.maps.get(origin), az.map(node.outputs[0]) if node.outputs else None
        if node.op in ("Reshape", "Expand") and i == 1 and source is not None and out is not None:
            length = az.shape(node.inputs[1])
            rank = az.rank(node.outputs[0])
            axis = p + (rank - length[0]) if rank is not None and length and isinstance(length[0], int) else -1
            if out.axis == axis and (az.proportion(source.ids, out.ids) is not None
                                     or az.proportion(out.ids, source.ids) is not None):
                continue  # a count divided, or multiplied (repeat_kv's kv_heads · n_rep), along with the cut
        if source is not None and node.op == "Reshape" and i == 1 and _freeze_foreign_entry(az, node, p, origin):
            continue
        if source is not None:
            az.block(source.ids, f"{node.op} {node.name} computes with the channel count of {origin} (read by Shape)")


def _shares_class(az: Analyzer, a: np.ndarray, b: np.ndarray) -> bool:
    return bool({az.uf.find(int(i)) for i in a if i >= 0} & {az.uf.find(int(i)) for i in b if i >= 0})


def _freeze_foreign_entry(az: Analyzer, node: gs.Node, p: int, origin: str) -> bool:
    """Entry ``p`` of a Reshape target computed from the channel count of ``origin``, where the reshaped
    data carries none of those channels: timm's CoaT ``qkv(x).reshape(B, N, 3, h, C // h)`` with C read
    from the residual stream. No cut of the stream changes the data, so the entry is pinned to its value
    in the original (a SHAPE_FREEZE fixup on the one-entry Concat piece it arrives through).
    :func:`check_frozen_entries` checks again once every union is made."""
    source, data = az.maps[origin], az.map(node.inputs[0])
    if data is not None and _shares_class(az, source.ids, data.ids):
        return False
    src = shape_source(az, node, 1, p)
    if src is None or src.piece is None or src.of is None or src.of.name != origin:
        return False
    concat, k = src.piece
    value = az.folded.get(concat.inputs[k].name)
    if value is None:
        dims = az.shape(src.of)
        size = dims[src.dim] if dims is not None and 0 <= src.dim < len(dims) else None
        if not isinstance(size, int) or size % src.divisor:
            return False
        value = np.array([size // src.divisor * src.multiplier], np.int64)
    value = np.asarray(value, np.int64).reshape(-1)
    if value.size != 1:
        return False
    data_ids = np.empty(0, np.int64) if data is None else data.ids.copy()
    az.fixup(concat, FixupKind.SHAPE_FREEZE, [source.ids.copy()], input=k, value=int(value[0]), reshape=node.name,
             data_ids=data_ids, origin=origin)
    return True


def check_frozen_entries(az: Analyzer) -> None:
    """Block the channels of a frozen Reshape entry (:func:`_freeze_foreign_entry`) whose data tensor later
    joined their group: the cut would then change the data, and the pinned entry would no longer fit it."""
    for fix in az.fixups:
        if fix.kind == FixupKind.SHAPE_FREEZE and _shares_class(az, fix.ids[0], fix.data["data_ids"]):
            az.block(fix.ids[0], f"Reshape {fix.data['reshape']} computes with the channel count of "
                                 f"{fix.data['origin']} (read by Shape)")


@dataclass(frozen=True)
class ShapeEntry:
    """Where one entry of a shape tensor comes from: a constant (``owner.inputs[input][position]``,
    ``value``), or dim ``dim`` of a runtime tensor ``of`` (through ``Shape``) divided by ``divisor``."""

    owner: gs.Node
    input: int
    position: int
    value: int
    of: gs.Tensor | None = None
    dim: int = -1
    divisor: int = 1
    multiplier: int = 1  # times a fixed dim of another tensor: h * d of the merge reshape(b, t, h * d)
    piece: tuple[gs.Node, int] | None = None  # the one-entry Concat input it arrives through, if any


def _count_times_dim(az: Analyzer, mul: gs.Node) -> ShapeEntry | None:
    """``Shape(x)[h] * Shape(y)[d]``: a channel count (x carries channels on axis h) times a dim that
    carries none and has a known size (the head dim, in ``reshape(b, t, h * d)``)."""
    found = [shape_source(az, mul, j, 0) for j in (0, 1)]
    for count, other in (found, found[::-1]):
        if count is None or other is None or count.of is None or other.of is None or other.divisor != 1:
            continue
        m, o = az.map(count.of), az.map(other.of)
        dims = az.shape(other.of)
        size = dims[other.dim] if dims is not None and 0 <= other.dim < len(dims) else None
        if m is not None and m.axis == count.dim and (o is None or o.axis != other.dim) and isinstance(size, int):
            return dataclasses.replace(count, multiplier=count.multiplier * size * other.multiplier)
    return None


def shape_source(az: Analyzer, node: gs.Node, i: int, pos: int) -> ShapeEntry | None:
    """Trace entry ``pos`` of the 1-D int tensor ``node.inputs[i]`` back through Concat, Cast, Identity,
    Unsqueeze/Squeeze of scalars, Slice and Gather to a constant or to ``Shape`` of a tensor."""
    if len(node.inputs) <= i:
        return None
    t = node.inputs[i]
    value = az.const(t)
    if value is not None:
        flat = value.reshape(-1)
        return ShapeEntry(node, i, pos, int(flat[pos])) if pos < flat.size else None
    src = producer(t)
    if src is None:
        return None
    if src.op in ("Cast", "Identity") or (src.op in ("Unsqueeze", "Squeeze") and pos == 0):
        return shape_source(az, src, 0, pos)
    if src.op == "Reshape":  # a shape vector flattened (TorchScript's expand target)
        target = az.const(src.inputs[1])
        return shape_source(az, src, 0, pos) if target is not None and target.reshape(-1).tolist() == [-1] else None
    if src.op == "Where" and _is_minus_one_test(az, producer(src.inputs[0])):
        return shape_source(az, src, 2, pos)  # Where(t == -1, 1, t): the entry is t's, or 1 where t says -1
    if src.op == "Shape":
        rank = az.rank(src.inputs[0])
        start = int(src.attrs.get("start", 0))
        start = start + rank if rank is not None and start < 0 else start
        return ShapeEntry(src, 0, pos, -1, of=src.inputs[0], dim=start + pos)
    if src.op == "Gather" and int(src.attrs.get("axis", 0)) == 0:
        idx = az.const(src.inputs[1])
        return None if idx is None or pos >= idx.size else shape_source(az, src, 0, int(idx.reshape(-1)[pos]))
    if src.op == "Slice":
        starts, steps, length = az.const(optional_input(src, 1)), az.const(optional_input(src, 4)), az.shape(src.inputs[0])
        if starts is None or starts.size != 1 or length is None or len(length) != 1 or not isinstance(length[0], int):
            return None
        start = int(starts.reshape(-1)[0])
        start = start + length[0] if start < 0 else start
        step = 1 if steps is None else int(steps.reshape(-1)[0])
        return shape_source(az, src, 0, start + pos * step) if step > 0 and start >= 0 else None
    if src.op == "Div":  # a runtime channel count split in parts: unflatten(-1, (3, D)) of a fused projection
        c = az.const(src.inputs[1])
        inner = shape_source(az, src, 0, pos) if c is not None and c.size == 1 and int(c.reshape(-1)[0]) > 0 else None
        if inner is None or inner.of is None:
            return None
        return dataclasses.replace(inner, divisor=inner.divisor * int(c.reshape(-1)[0]))
    if src.op == "Mul":  # a runtime dim (the batch) times a constant count: [T, B * heads, d]
        for j in (0, 1):
            c = az.const(src.inputs[j])
            if c is not None and c.size == 1 and az.const(src.inputs[1 - j]) is None:
                return ShapeEntry(src, j, 0, int(c.reshape(-1)[0]))
        return _count_times_dim(az, src) if pos == 0 else None
    if src.op == "Concat":
        offset = 0
        for j, piece in enumerate(src.inputs):
            dims = az.shape(piece)
            if dims is None or len(dims) > 1 or (dims and not isinstance(dims[0], int)):
                return None
            size = dims[0] if dims else 1
            if pos < offset + size:
                found = shape_source(az, src, j, pos - offset)
                if found is not None and found.piece is None and size == 1 and len(dims) == 1:
                    found = dataclasses.replace(found, piece=(src, j))
                return found
            offset += size
    return None
