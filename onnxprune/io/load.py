"""Loading and saving ONNX models: the one place that handles the ONNX file format.

Loading normalises what exporters do differently so the later stages see one form: weights in
``Constant``/``ConstantOfShape`` nodes or behind ``Identity`` become initializers, old opsets are
converted up to :data:`MIN_OPSET`, and external data is read (refusing paths that escape the model's
folder). Saving caps the IR version at what onnxruntime reads and switches to external data above 2 GB.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter
from onnx_graphsurgeon.logger import G_LOGGER  # noqa: E402

from onnxprune.errors import BadInputError
from onnxprune.io.limits import MIN_OPSET, default_opset
from onnxprune.io.safety import check_external_paths
from onnxprune.io.limits import readable_ir_version

log = logging.getLogger(__name__)

G_LOGGER.severity = G_LOGGER.ERROR  # graphsurgeon warns about its own optional deps on every import


@dataclass
class LoadedModel:
    """A normalised model plus facts the later stages need about the original file."""

    model: onnx.ModelProto
    path: str
    original_opset: int
    file_bytes: int
    notes: list[str] = field(default_factory=list)


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
    """Convert old opsets up, give each Reshape/Expand its own target Concat (:func:`unshare_shape_targets`) and
    fold constant weight subgraphs into initializers, in place."""
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
    unshared = unshare_shape_targets(model)
    if unshared:
        loaded.notes.append(f"gave {unshared} Reshape/Expand nodes their own copy of a shared shape Concat")
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


SHAPE_TARGET_INPUTS = {"Reshape": 1, "Expand": 1}
"""Ops whose input at the index is a target shape that the analysis may rewrite entry by entry."""


def unshare_shape_targets(model: onnx.ModelProto) -> int:
    """Give every Reshape/Expand its own copy of the Concat that builds its target shape, in place; the number
    of copies made.

    The dynamo exporter builds ``view(B, S, heads, head_dim)``'s target once and feeds every layer's Reshape
    (queries of all layers, or keys and values of all layers) from that one Concat. A cut that removes heads in
    some layers only must then change the count for those Reshapes alone: the analysis records the edit on the
    Concat, so each Reshape needs its own.
    """
    nodes = list(model.graph.node)
    producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in nodes:
        index = SHAPE_TARGET_INPUTS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if index is not None and len(node.input) > index and node.input[index] in producer:
            readers.setdefault(node.input[index], []).append((node, index))
    outputs = {o.name for o in model.graph.output}
    taken = {n.name for n in nodes} | set(producer)
    copies: dict[int, list[onnx.NodeProto]] = {}
    for name, users in readers.items():
        concat = nodes[producer[name]]
        if concat.op_type != "Concat" or concat.domain not in ("", "ai.onnx") or len(users) < 2:
            continue
        keep_first = name not in outputs and sum(list(n.input).count(name) for n in nodes) == len(users)
        for node, index in users[1 if keep_first else 0:]:
            new_name = base = f"{name}_for_{node.name or node.output[0]}"
            while new_name in taken:
                new_name = f"{base}_{len(taken)}"
            taken.add(new_name)
            copy = onnx.NodeProto()
            copy.CopyFrom(concat)
            copy.name = f"{concat.name}_for_{node.name or node.output[0]}" if concat.name else ""
            del copy.output[:]
            copy.output.append(new_name)
            node.input[index] = new_name
            copies.setdefault(producer[name], []).append(copy)
    if not copies:
        return 0
    order = [m for k, n in enumerate(nodes) for m in (n, *copies.get(k, ()))]
    del model.graph.node[:]
    model.graph.node.extend(order)
    return sum(len(c) for c in copies.values())


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
