"""Shape values the graph computes at run time: folded where shapes allow, so rules see constants."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.analysis.graph import find_cache_io

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


def _symbols(graph: gs.Graph, shapes: dict[str, list[int | str]]) -> list[str]:
    """The symbolic input dims (the sequence length, a cache's past length), in order of appearance.

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
    return names


def _cache_aliases(graph: gs.Graph, shapes: dict[str, list[int | str]]) -> dict[str, str]:
    """Symbol → the symbol it equals at run time: every layer's KV cache has the same past length, though
    dynamo names each input's dim apart (``[s10, 2, s69, 24]``, ``[s10, 2, s89, 24]``)."""
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    for name in find_cache_io(graph):
        for k, d in enumerate(shapes.get(name) or []):
            if isinstance(d, str):
                aliases[d] = first.setdefault(k, d)
    return aliases


def _weights_as_inputs(graph: gs.Graph) -> None:
    """Float constants larger than a shape value become graph inputs of their shape: folding never needs their
    values, and every pass then exports and re-imports no weights (minutes saved on a 124M-parameter GPT-2)."""
    made: dict[str, gs.Variable] = {}
    for node in graph.nodes:
        for k, t in enumerate(node.inputs):
            if (isinstance(t, gs.Constant) and np.issubdtype(np.dtype(t.dtype), np.floating)
                    and int(np.prod(t.shape, dtype=np.int64)) > FOLDED_VALUE_MAX):
                node.inputs[k] = made.setdefault(t.name, gs.Variable(t.name, dtype=t.dtype, shape=list(t.shape)))
    graph.inputs.extend(made.values())


def _forget_symbolic_shapes(graph: gs.Graph) -> None:
    """Drop the symbolic shapes an exporter recorded past the inputs (dynamo's ``[s10, s70, 96]``): inference
    keeps a recorded shape over the static one it could now derive from the fixed inputs."""
    inputs = {id(t) for t in graph.inputs}
    for t in graph.tensors().values():
        if isinstance(t, gs.Variable) and id(t) not in inputs and t.shape is not None and not _static_dims(t.shape):
            t.shape = None


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

    Symbolic input dims get stand-ins (:func:`_symbols`). When Reshapes stay unknown and the inputs have
    three or more symbols, one may be the sum of two others (a decoder's ``attention_mask [batch, total]``
    with total = past + seq): those relations are tried and the one that resolves most is kept.
    """
    if not _needs_folding(graph, shapes) or sum(
            int(np.asarray(t.values).nbytes) for t in graph.tensors().values()
            if isinstance(t, gs.Constant)) > COMPLETE_SHAPES_MAX_BYTES:
        return ShapeFacts(shapes)
    aliases = _cache_aliases(graph, shapes)
    symbols = [s for s in _symbols(graph, shapes) if aliases.get(s, s) == s]
    best = _fold(graph, shapes, dict(zip(symbols, _primes_from(FIRST_STAND_IN))), aliases)
    if best is None:
        return ShapeFacts(shapes)
    left = _unresolved(graph, best.shapes)
    for stand_ins in _sum_stand_ins(symbols) if left else ():
        facts = _fold(graph, shapes, stand_ins, aliases)
        if facts is not None and _unresolved(graph, facts.shapes) < left:
            best, left = facts, _unresolved(graph, facts.shapes)
            if not left:
                break
    return best


MAX_SUM_SYMBOLS = 4


def _sum_stand_ins(symbols: list[str]) -> Iterator[dict[str, int]]:
    """Stand-ins where one symbol is the sum of two others (primes for the rest)."""
    if not 3 <= len(symbols) <= MAX_SUM_SYMBOLS:
        return
    for total in symbols:
        rest = [s for s in symbols if s != total]
        for a, b in itertools.combinations(rest, 2):
            values = dict(zip(rest, _primes_from(FIRST_STAND_IN)))
            values[total] = values[a] + values[b]
            yield values


def _unresolved(graph: gs.Graph, shapes: dict[str, list[int | str]]) -> int:
    """How many Reshapes still have an unknown input or output shape (the rules need both)."""
    return sum(1 for n in graph.nodes if n.op == "Reshape" and not all(
        _static_dims(shapes.get(t.name)) for t in (n.inputs[0], n.outputs[0])))


def _fold(graph: gs.Graph, shapes: dict[str, list[int | str]], stand_ins: dict[str, int], aliases: dict[str, str]
          ) -> ShapeFacts | None:
    """One folding of a copy with the symbolic input dims replaced by ``stand_ins`` (through ``aliases``); None
    when it fails."""
    import onnx

    folded_dims: dict[str, list[int | str]] = {}
    values: dict[str, np.ndarray] = {}
    try:
        copy = graph.copy()
        for t in copy.inputs:
            dims = shapes.get(t.name)
            if dims is not None:
                t.shape = [stand_ins[aliases.get(d, d)] if isinstance(d, str) else d for d in dims]
        _forget_symbolic_shapes(copy)
        _weights_as_inputs(copy)
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
        return None
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
