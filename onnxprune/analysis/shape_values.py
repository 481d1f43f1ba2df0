"""Shape values the graph computes at run time: folded where shapes allow, so rules see constants."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    pass


SHAPE_PASSES = 256
"""A cap only: folding stops when a pass removes no node. A Reshape target computed from the shape of the
layer before takes about three passes per layer (fold, infer, fold), so deep decoders need many."""


COMPLETE_SHAPES_MAX_BYTES = 1 << 30


def _static_dims(dims: list[int | str] | None) -> bool:
    return dims is not None and all(isinstance(d, int) and d > 0 for d in dims)


SHAPE_INPUTS = {"Reshape": 1, "Expand": 1, "Tile": 1, "ConstantOfShape": 0, "Pad": 1}


FOLDED_VALUE_MAX = 64


@dataclass
class ShapeFacts:
    """What folding a graph's shape arithmetic (inputs fixed) tells: tensor shapes, and the values of
    small integer tensors computed at runtime (Reshape/Expand targets)."""

    shapes: dict[str, list[int | str]]
    values: dict[str, np.ndarray] = field(default_factory=dict)


def _split_ranged_shapes(graph: gs.Graph) -> None:
    """Rewrite ``Shape(x, start, end)`` as ``Slice(Shape(x))``: graphsurgeon's shape folding ignores the range."""
    for node in list(graph.nodes):
        if node.op != "Shape" or ("start" not in node.attrs and "end" not in node.attrs):
            continue
        start, end = int(node.attrs.pop("start", 0)), int(node.attrs.pop("end", np.iinfo(np.int64).max))
        full = gs.Variable(f"{node.outputs[0].name}_full", dtype=np.int64)
        out = node.outputs[0]
        node.outputs = [full]
        bounds = [gs.Constant(f"{out.name}_{k}", np.array([v], np.int64)) for k, v in (("start", start), ("end", end))]
        graph.nodes.append(gs.Node("Slice", f"{node.name}_range", inputs=[full, *bounds], outputs=[out]))


def complete_shapes(graph: gs.Graph, shapes: dict[str, list[int | str]]) -> dict[str, list[int | str]]:
    """Shapes with the gaps plain shape inference leaves behind runtime shape arithmetic filled (see
    :func:`shape_facts`)."""
    return shape_facts(graph, shapes).shapes


FIRST_STAND_IN = 11


def _primes_from(start: int) -> Iterator[int]:
    n = start
    while True:
        if all(n % k for k in range(2, int(n ** 0.5) + 1)):
            yield n
        n += 1


def _stand_ins(graph: gs.Graph, shapes: dict[str, list[int | str]]) -> dict[str, int]:
    """A distinct small prime for every symbolic input dim (the sequence length, a cache's past length).

    The channel structure of a graph does not depend on these lengths, but its Reshape targets are
    computed from them at run time: folding with stand-ins makes those targets (and the shapes after
    them) concrete, so the rules see heads split and merged without ``--shape``. Primes keep a stand-in
    from equalling a channel count or a product of them by chance.
    """
    names: list[str] = []
    for t in graph.inputs:
        for d in shapes.get(t.name) or []:
            if isinstance(d, str) and d not in names:
                names.append(d)
    return dict(zip(names, _primes_from(FIRST_STAND_IN)))


def _needs_folding(graph: gs.Graph, shapes: dict[str, list[int | str]]) -> bool:
    for t in graph.tensors().values():
        if isinstance(t, gs.Variable) and t.name and not _static_dims(shapes.get(t.name)):
            return True
    return any(n.op in SHAPE_INPUTS and len(n.inputs) > SHAPE_INPUTS[n.op]
               and isinstance(n.inputs[SHAPE_INPUTS[n.op]], gs.Variable) for n in graph.nodes)


def shape_facts(graph: gs.Graph, shapes: dict[str, list[int | str]]) -> ShapeFacts:
    """Fold the shape arithmetic of a copy of ``graph`` and read shapes and small values off it.

    Exporters (Paddle, TorchScript) build Reshape targets from ``Shape`` → ``Slice``/``Gather`` →
    ``Concat``; with the inputs fixed those are constants, but ONNX shape inference does not fold them.
    On a copy, fold them (graphsurgeon's ``fold_shapes``) and re-infer until nothing changes; known
    shapes are kept, only missing or symbolic ones are filled. The graph itself is not changed.
    """
    import onnx

    if not _needs_folding(graph, shapes) or sum(
            int(np.asarray(t.values).nbytes) for t in graph.tensors().values()
            if isinstance(t, gs.Constant)) > COMPLETE_SHAPES_MAX_BYTES:
        return ShapeFacts(shapes)
    folded_dims: dict[str, list[int | str]] = {}
    values: dict[str, np.ndarray] = {}
    try:
        copy = graph.copy()
        stand_ins = _stand_ins(copy, shapes)
        for t in copy.inputs:
            dims = shapes.get(t.name)
            if dims is not None and all(isinstance(d, int) and d >= 0 for d in dims):
                t.shape = list(dims)
            elif dims is not None:
                t.shape = [stand_ins[d] if isinstance(d, str) else d for d in dims]
        _split_ranged_shapes(copy)
        model = gs.export_onnx(copy, do_type_check=False)
        count = len(model.graph.node)
        for _ in range(SHAPE_PASSES):
            model = onnx.shape_inference.infer_shapes(model)
            folded = gs.import_onnx(model)
            folded.fold_constants(fold_shapes=True, error_ok=True)
            for name, t in folded.tensors().items():
                if isinstance(t, gs.Constant) and name:
                    folded_dims[name] = list(t.shape)
                    v = np.asarray(t.values)
                    if v.size <= FOLDED_VALUE_MAX and np.issubdtype(v.dtype, np.integer):
                        values[name] = v
            folded.cleanup()
            model = gs.export_onnx(folded, do_type_check=False)
            if len(model.graph.node) == count:
                break
            count = len(model.graph.node)
        model = onnx.shape_inference.infer_shapes(model)
    except Exception as e:  # shape completion is best effort: the analysis then blocks what it cannot see
        log.warning("could not complete shapes by folding shape arithmetic: %s", e)
        return ShapeFacts(shapes)
    result = dict(shapes)
    for vi in list(model.graph.value_info) + list(model.graph.output):
        if result.get(vi.name) is not None and _static_dims(result[vi.name]):
            continue
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
            if _static_dims(dims):
                result[vi.name] = dims
    for name, dims in folded_dims.items():  # shape arithmetic folded to constants: their lengths are known now
        if not _static_dims(result.get(name)):
            result[name] = dims
    known = graph.tensors()
    return ShapeFacts(result, {k: v for k, v in values.items() if isinstance(known.get(k), gs.Variable)})
