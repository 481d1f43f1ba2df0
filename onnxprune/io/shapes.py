"""The one --shape and shape-inference path: declared input shapes, inferred tensor shapes, the checker."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import onnx
from onnx import shape_inference

from onnxprune.errors import BadInputError
from onnxprune.io.weightless import weightless

log = logging.getLogger(__name__)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fill ``model``'s value_info by shape inference on a :func:`weightless` copy; returns ``model``.

    Inference never reads weight values, so this avoids serialising them (and works above 2 GB).
    """
    inferred = shape_inference.infer_shapes(weightless(model), data_prop=True)
    weights = {t.name for t in model.graph.initializer}
    del model.graph.value_info[:]
    model.graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in weights)
    for mine, theirs in zip(model.graph.output, inferred.graph.output):
        if not mine.type.tensor_type.HasField("shape"):
            mine.type.CopyFrom(theirs.type)
    return model


UNCHECKED_DOMAIN = "onnxprune.unchecked"
"""Domain that :func:`check_model` moves the nodes onnx has no schema for into, so its checker skips them."""


def check_model(model: onnx.ModelProto, *, full_check: bool = True) -> list[str]:
    """``onnx.checker`` on a :func:`weightless` copy (same graph, types, shapes), with full shape checking by default.

    Nodes whose op onnx has no schema for at the model's opset (onnxruntime's contrib ops: ``com.microsoft``
    ones, or ``SimplifiedLayerNormalization`` in the default domain) are moved to an unregistered domain in
    the copy, which the checker skips, so it still checks the graph's structure and every standard op around
    them. It cannot check those nodes themselves: onnxruntime loading the model is the authority for them.
    A domain the model does not import and nodes calling the model's own functions stay as they are.

    Returns:
        ``domain.op`` (``op`` in the default domain) of each op left unchecked, sorted; empty when none.

    Raises:
        onnx.checker.ValidationError: the checker rejects the rest of the model.
        onnx.shape_inference.InferenceError: with ``full_check``, shape inference finds an inconsistency.

    Example:
        >>> check_model(model)  # a graph with a com.microsoft.BiasGelu node between MatMuls
        ['com.microsoft.BiasGelu']
    """
    copy = weightless(model)
    unknown = _nodes_without_schema(copy)
    hidden = sorted({_op_name(n) for n in unknown})
    for node in unknown:
        node.domain = UNCHECKED_DOMAIN
    if hidden:
        copy.opset_import.append(onnx.helper.make_opsetid(UNCHECKED_DOMAIN, 1))
    onnx.checker.check_model(copy, full_check=full_check)
    return hidden


def ops_without_schema(model: onnx.ModelProto) -> list[str]:
    """``domain.op`` of each op in ``model`` (subgraphs included) that onnx has no schema for at the model's
    opset, sorted: the ops :func:`check_model` leaves to onnxruntime."""
    return sorted({_op_name(n) for n in _nodes_without_schema(model)})


def _op_name(node: onnx.NodeProto) -> str:
    return f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def _nodes_without_schema(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes (subgraphs included) whose op onnx has no schema for at the opset the model imports for its domain.

    A domain the model does not import is left out (the checker names the missing import), and so are
    calls of the model's own functions (the checker checks those).
    """
    opsets = {o.domain or "": o.version for o in model.opset_import}
    functions = {(f.domain, f.name) for f in model.functions}
    found: list[onnx.NodeProto] = []

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            for attr in node.attribute:
                for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                    visit(sub)
            domain = "" if node.domain == "ai.onnx" else node.domain
            if domain not in opsets or (node.domain, node.op_type) in functions:
                continue
            try:
                onnx.defs.get_schema(node.op_type, opsets[domain], domain)
            except onnx.defs.SchemaError:
                found.append(node)

    visit(model.graph)
    return found


def set_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> None:
    """Declare ``shapes`` (input name → full shape, as ``--shape`` gives them) on the model's inputs, in place.

    Raises:
        BadInputError: a name that is not an input, or a rank other than the input's declared one.
    """
    inputs = {i.name: i for i in model.graph.input}
    for name, dims in shapes.items():
        if name not in inputs:
            raise BadInputError(f"--shape names {name!r}, but the model's inputs are {sorted(inputs)}", field="shapes")
        tensor_type = inputs[name].type.tensor_type
        if tensor_type.HasField("shape") and len(tensor_type.shape.dim) != len(dims):
            raise BadInputError(
                f"--shape {name}: rank {len(dims)} but the input has rank {len(tensor_type.shape.dim)}", field="shapes"
            )
        tensor_type.shape.Clear()
        for d in dims:
            tensor_type.shape.dim.add().dim_value = int(d)


def with_static_inputs(model: onnx.ModelProto, shapes: dict[str, list[int]] | None, batch: int = 1) -> onnx.ModelProto:
    """A copy whose symbolic input dims are fixed: ``shapes`` first, then ``batch`` for a leading dim.

    Raises:
        BadInputError: ``shapes`` names an input the model does not have, or its rank is wrong.
    """
    shapes = dict(shapes or {})
    copy = weightless(model)
    set_input_shapes(copy, shapes)
    init_names = {t.name for t in copy.graph.initializer}
    for inp in copy.graph.input:
        if inp.name in init_names or inp.name in shapes:
            continue
        dims = inp.type.tensor_type.shape.dim
        if dims and not (dims[0].HasField("dim_value") and dims[0].dim_value > 0):
            dims[0].Clear()
            dims[0].dim_value = batch
    for out in copy.graph.output:  # inference keeps declared symbolic output dims; drop them so it infers
        tensor_type = out.type.tensor_type
        if any(not d.HasField("dim_value") for d in tensor_type.shape.dim):
            tensor_type.ClearField("shape")
    return copy


def static_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]] | None) -> dict[str, list[int | str]]:
    """Tensor name → inferred shape (ints, or strings for dims still symbolic), batch fixed to 1."""
    fixed = with_static_inputs(model, shapes)
    try:
        inferred = infer_shapes(fixed)
    except Exception as e:
        log.warning("shape inference failed (%s); shape-dependent patterns will be blocked", e)
        inferred = fixed
    result: dict[str, list[int | str]] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        result[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                           for d in vi.type.tensor_type.shape.dim]
    for t in model.graph.initializer:
        result[t.name] = list(t.dims)
    return result
