"""Running a model with intermediate tensors as extra outputs (calibration, reconstruction, depth scores)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.errors import BadInputError
from onnxprune.io.weightless import weightless
from onnxprune.runtime.device import DeviceChoice
from onnxprune.runtime.session import build_session, read_model

logger = logging.getLogger(__name__)


def _known_types(model: onnx.ModelProto) -> dict[str, int]:
    types: dict[str, int] = {}
    for vi in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types


def _infer_types(model: onnx.ModelProto, names: list[str]) -> dict[str, int]:
    """Element types of ``names`` via shape inference on a weight-free copy (works above 2 GB)."""
    light = weightless(model, min_bytes=0)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False)
    except Exception as e:  # onnx raises several types; inference is best effort here
        logger.debug("shape inference for capture types failed: %s", e)
        return {}
    return {k: v for k, v in _known_types(inferred).items() if k in names}


def _capture_outputs(model: onnx.ModelProto, names: list[str]) -> tuple[list[onnx.ValueInfoProto], list[str]]:
    """Graph outputs to add for ``names``; also which names are inputs/initializers (not outputs)."""
    produced = {o for n in model.graph.node for o in n.output}
    inputs = {vi.name for vi in model.graph.input} | {t.name for t in model.graph.initializer}
    outputs = {vi.name for vi in model.graph.output}
    direct = [n for n in names if n in inputs and n not in produced]
    for name in names:
        if name not in produced and name not in inputs:
            raise BadInputError(f"tensor {name!r} is not produced by any node of the model", field="tensors")
    needed = [n for n in names if n in produced and n not in outputs]
    types = _known_types(model)
    missing = [n for n in needed if n not in types]
    if missing:
        types.update(_infer_types(model, missing))
    extra = []
    for name in needed:
        if name not in types:
            logger.debug("element type of %r unknown after shape inference; assuming float32", name)
        extra.append(helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None))
    return extra, direct


def iter_capture(
    model: onnx.ModelProto | str | os.PathLike[str],
    tensor_names: list[str],
    batches: Iterable[Mapping[str, np.ndarray]],
    device: str | DeviceChoice = "auto",
    threads: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Stream intermediate tensors over batches, building the session once.

    The tensors are added as graph outputs to a copy of the model (``model`` is not changed); their
    element types come from the model's value_info or shape inference, float32 when still unknown.
    Tensors that are graph inputs or initializers are returned from the feeds / the initializer.
    Only one batch's tensors are alive at a time unless the caller keeps them.

    Args:
        model: the model (with external data loaded) or its path.
        tensor_names: tensors to capture.
        batches: feeds, one mapping per batch.
        device: ``auto|cuda|cpu`` or a :class:`DeviceChoice`.
        threads: intra-op threads.

    Yields:
        For each batch, tensor name → array.

    Raises:
        BadInputError: a name is not a tensor of the model, the feeds do not match its inputs, or the
            file cannot be read.
        InvariantError: onnxruntime failed while running.
    """
    if not isinstance(model, onnx.ModelProto):
        model = read_model(Path(model), external=True)
    extra, direct = _capture_outputs(model, list(tensor_names))
    inits = {t.name: t for t in model.graph.initializer}
    fixed = {n: numpy_helper.to_array(inits[n]) for n in direct if n in inits}
    run_names = [n for n in tensor_names if n not in direct]
    with build_session(model, device, threads, extra) as sess:
        for feeds in batches:
            result = sess.run(feeds, run_names) if run_names else {}
            for name in direct:
                result[name] = fixed[name] if name in fixed else np.asarray(feeds[name])
            yield {n: result[n] for n in tensor_names}


def capture(
    model: onnx.ModelProto | str | os.PathLike[str],
    tensor_names: list[str],
    feeds: Mapping[str, np.ndarray],
    device: str | DeviceChoice = "auto",
    threads: int | None = None,
) -> dict[str, np.ndarray]:
    """Values of intermediate tensors for one batch of feeds (see :func:`iter_capture`).

    Raises:
        BadInputError: a name is not a tensor of the model, or the feeds do not match its inputs.
        InvariantError: onnxruntime failed while running.

    Example:
        >>> capture(model, ["relu1_out"], random_inputs(model), "cpu")["relu1_out"].shape
        (1, 8, 32, 32)
    """
    return next(iter_capture(model, tensor_names, [feeds], device, threads))
