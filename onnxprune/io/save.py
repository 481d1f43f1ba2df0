"""Saving models: the IR version onnxruntime reads, external data above the protobuf limit."""

from __future__ import annotations

import logging
import os

import onnx

from onnxprune.io.limits import EXTERNAL_THRESHOLD, readable_ir_version
from onnxprune.io.weightless import tensor_bytes

log = logging.getLogger(__name__)


def initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(tensor_bytes(t) for t in model.graph.initializer)




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
