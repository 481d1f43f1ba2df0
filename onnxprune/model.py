"""Loading and saving ONNX models: the one place that handles the ONNX file format.

Loading normalises what exporters do differently so the later stages see one form: weights in
``Constant``/``ConstantOfShape`` nodes or behind ``Identity`` become initializers, old opsets are
converted up to :data:`MIN_OPSET`, and external data is read (refusing paths that escape the model's
folder). Saving caps the IR version at what onnxruntime reads and switches to external data above 2 GB.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import shape_inference, version_converter
from onnx.external_data_helper import uses_external_data

from onnxprune.errors import BadInputError

log = logging.getLogger(__name__)

MIN_OPSET = 13
"""Older models are converted to this opset so per-op handlers see inputs (not attributes) for axes and sizes."""
MAX_IR_VERSION = 10
"""onnxruntime 1.31 reads IR <= 13; onnx 1.23 writes 14 by default. 10 covers opsets up to 22."""
PROTO_LIMIT = 2**31 - 1
EXTERNAL_THRESHOLD = 1800 * 2**20
"""Initializer bytes above which saving switches to external data (protobuf caps one message at 2 GiB)."""

from onnx_graphsurgeon.logger import G_LOGGER  # noqa: E402

G_LOGGER.severity = G_LOGGER.ERROR  # graphsurgeon warns about its own optional deps on every import


@dataclass
class LoadedModel:
    """A normalised model plus facts the later stages need about the original file."""

    model: onnx.ModelProto
    path: str
    original_opset: int
    file_bytes: int
    notes: list[str] = field(default_factory=list)


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def check_external_paths(model: onnx.ModelProto, base_dir: str | os.PathLike[str]) -> None:
    """Refuse external-data locations that leave ``base_dir`` (absolute paths, ``..``, symlinks out).

    A model file is untrusted input: ``../../etc/passwd`` as a tensor location is a known attack on loaders.

    Raises:
        BadInputError: naming the tensor and its location.
    """
    base = Path(base_dir).resolve()
    for tensor in _all_tensors(model):
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (base / location).resolve()
        if not location or os.path.isabs(location) or ".." in Path(location).parts or base not in target.parents:
            raise BadInputError(
                f"tensor {tensor.name!r} points to external data {location!r} outside the model's folder",
                field="model",
            )
        if not target.is_file():
            raise BadInputError(f"external data file {location!r} for tensor {tensor.name!r} is missing", field="model")


def _all_tensors(model: onnx.ModelProto):
    yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


def load_model(path: str | os.PathLike[str]) -> LoadedModel:
    """Read and normalise a model file.

    Raises:
        BadInputError: the file is missing, not ONNX, truncated, or has unsafe external data.

    Example:
        >>> loaded = load_model("examples/digits_cnn.onnx")
        >>> loaded.model.graph.input[0].name
        'input'
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BadInputError(f"model file {path!r} does not exist", field="model")
    size = os.path.getsize(path)
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # protobuf raises several types for garbage bytes
        raise BadInputError(f"{path!r} is not a readable ONNX model (truncated or not ONNX): {e}", field="model") from e
    if not model.graph.node or not model.opset_import:
        raise BadInputError(f"{path!r} is not a readable ONNX model (no graph nodes or opset)", field="model")
    check_external_paths(model, os.path.dirname(os.path.abspath(path)))
    try:
        onnx.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
    except Exception as e:
        raise BadInputError(f"could not read external data of {path!r}: {e}", field="model") from e
    loaded = LoadedModel(model=model, path=path, original_opset=default_opset(model), file_bytes=size)
    normalize(loaded)
    return loaded


def normalize(loaded: LoadedModel) -> None:
    """Convert old opsets up and fold constant weight subgraphs into initializers, in place."""
    model = loaded.model
    opset = default_opset(model)
    if opset < 9:
        raise BadInputError(f"opset {opset} is older than 9, the oldest onnxprune reads", field="model")
    if opset < MIN_OPSET:
        try:
            model = version_converter.convert_version(model, MIN_OPSET)
            loaded.notes.append(f"converted opset {opset} to {MIN_OPSET}")
        except Exception as e:
            raise BadInputError(f"could not convert opset {opset} to {MIN_OPSET}: {e}", field="model") from e
    # Constant folding runs onnxruntime, which reads IR <= 13: cap it as save_model does.
    model.ir_version = readable_ir_version(model)
    loaded.model = model
    if not _needs_folding(model):
        return  # nothing to fold: skip the graphsurgeon round trip (it copies every weight)
    graph = gs.import_onnx(model)
    try:
        graph.fold_constants(error_ok=False).cleanup()
    except Exception as e:
        log.warning("constant folding failed (%s); weights behind computed nodes will not be pruned", e)
    _bypass_identities(graph)
    graph.cleanup()
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = model.ir_version  # already made readable (and raised for converted old files) above
    out.producer_name, out.producer_version = model.producer_name, model.producer_version
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    loaded.model = out


def _needs_folding(model: onnx.ModelProto) -> bool:
    """Whether any node computes from constants only (Constant, ConstantOfShape, Identity of a weight...)."""
    known = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("Constant", "ConstantOfShape"):
            return True
        inputs = [i for i in node.input if i]
        if inputs and all(i in known for i in inputs):
            return True
    return False


def _all_const(node: gs.Node) -> bool:
    return bool(node.inputs) and all(isinstance(t, gs.Constant) for t in node.inputs if t is not None)


def _bypass_identities(graph: gs.Graph) -> None:
    """Let consumers of ``Identity(initializer)`` read the initializer directly (TorchScript export style)."""
    outputs = set(id(t) for t in graph.outputs)
    for node in list(graph.nodes):
        if node.op != "Identity" or not isinstance(node.inputs[0], gs.Constant) or id(node.outputs[0]) in outputs:
            continue
        src, dst = node.inputs[0], node.outputs[0]
        for consumer in list(dst.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is dst:
                    consumer.inputs[i] = src
        node.outputs.clear()


def initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(_tensor_bytes(t) for t in model.graph.initializer)


def readable_ir_version(model: onnx.ModelProto) -> int:
    """The model's IR version capped at :data:`MAX_IR_VERSION`, but never below what its opsets need."""
    floor = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    return max(min(model.ir_version or MAX_IR_VERSION, MAX_IR_VERSION), floor)


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> str:
    """Write ``model``; above the protobuf limit the weights go to ``<name>.data`` beside it.

    The IR version is capped at :data:`MAX_IR_VERSION` (or the minimum the opsets need) so the file loads
    in onnxruntime. Returns the path written.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    model.ir_version = readable_ir_version(model)
    if initializer_bytes(model) > EXTERNAL_THRESHOLD:
        location = os.path.basename(path) + ".data"
        data_path = os.path.join(os.path.dirname(os.path.abspath(path)), location)
        if os.path.exists(data_path):
            os.remove(data_path)
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=location, size_threshold=1024)
        # save_model turned the in-memory tensors into references; bring the data back for callers.
        onnx.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
    else:
        onnx.save_model(model, path)
    return path


def is_large(model: onnx.ModelProto) -> bool:
    return initializer_bytes(model) > EXTERNAL_THRESHOLD


WEIGHTLESS_MIN_BYTES = 1 << 20
"""Float initializers at least this large become typed inputs in :func:`weightless` copies."""


def weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose large float initializers are typed graph inputs instead: same shapes, no weight bytes.

    Shape inference and the checker see the same graph, but nothing near 2 GB is copied or serialised.
    Small and integer initializers stay, so Reshape targets and similar constants still propagate.
    The original is only read (detaching and re-adding its initializers would copy them).
    """
    big = {t.name: t for t in model.graph.initializer
           if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                              onnx.TensorProto.BFLOAT16) and _tensor_bytes(t) >= WEIGHTLESS_MIN_BYTES}
    copy = onnx.ModelProto()
    _copy_fields(model, copy, skip={"graph"})
    _copy_fields(model.graph, copy.graph, skip={"initializer"})
    copy.graph.initializer.extend(t for t in model.graph.initializer if t.name not in big)
    declared = {i.name for i in copy.graph.input}
    copy.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                            for t in big.values() if t.name not in declared)
    return copy


def _copy_fields(src, dst, skip: set[str]) -> None:  # noqa: ANN001 - any protobuf message pair
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        # protobuf 5+ has is_repeated; older releases only the label
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
        if repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _tensor_bytes(t: onnx.TensorProto) -> int:
    n = int(np.prod(t.dims)) if t.dims else 1
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


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
