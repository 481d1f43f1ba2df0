"""The one external-data path check: a model file is untrusted input."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnx
from onnx.external_data_helper import uses_external_data

from onnxprune.errors import BadInputError

log = logging.getLogger(__name__)



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
