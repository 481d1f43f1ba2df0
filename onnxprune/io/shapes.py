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


def check_model(model: onnx.ModelProto) -> None:
    """``onnx.checker`` with full shape checking, on a :func:`weightless` copy (same graph, types, shapes)."""
    onnx.checker.check_model(weightless(model), full_check=True)


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
