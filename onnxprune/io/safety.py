"""The one external-data path check: a model file is untrusted input.

ONNX external data names files by path. A location such as ``../../etc/passwd`` or ``/home/u/.ssh/id_rsa``
makes a loader read any file the process can read, and a pruned model then carries those bytes back to whoever
sent the model (a known attack on ONNX loaders). Every front door applies the same rule, from here:

- the location must be a non-empty relative path: no leading ``/`` or ``\\``, no drive letter, no NUL byte;
- no ``..`` component (``/`` and ``\\`` both count as separators, so the rule holds on Windows too);
- on disk, the resolved file must stay inside the model's folder (a symlink may not lead out) and exist;
- for a model shipped as a set of files (an upload), the file must be one of them.

:func:`check_external_paths` applies it to a loaded ModelProto (the library's loader),
:func:`external_files` to a file on disk without loading it (the client, before uploading), and
:func:`locate_in_files` to an uploaded set of files (the server, before any loader runs).
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Container, Iterable, Iterator
from pathlib import Path

import onnx

from onnxprune.errors import BadInputError
from onnxprune.io.scan import scan_tensors

_DRIVE = re.compile(r"^[A-Za-z]:")
_SEPARATORS = re.compile(r"[\\/]")


def _outside(tensor: str, location: str, why: str) -> BadInputError:
    return BadInputError(
        f"tensor {tensor!r} points to external data {location!r} outside the model's folder: {why}", field="model"
    )


def check_location(location: str, *, tensor: str = "") -> str:
    """Check an external-data location by its text alone; return it as a normalised relative POSIX path.

    Raises:
        BadInputError: (field ``model``) an empty location, a NUL byte, an absolute path or drive letter, a
            ``..`` component, or a location naming the folder itself.

    Example:
        >>> check_location("./weights/w.bin")
        'weights/w.bin'
    """
    if not location:
        raise BadInputError(f"tensor {tensor!r} has external data without a location", field="model")
    if "\0" in location:
        raise BadInputError(f"tensor {tensor!r}: external data location {location!r} contains a NUL byte",
                            field="model")
    if location.startswith(("/", "\\")) or _DRIVE.match(location):
        raise _outside(tensor, location, "the location is absolute; it must be a relative path next to the model")
    if ".." in _SEPARATORS.split(location):
        raise _outside(tensor, location, "the location leaves the folder with '..'")
    normalised = posixpath.normpath(location)
    if normalised == ".":
        raise BadInputError(f"tensor {tensor!r}: external data location {location!r} names the model's folder, "
                            "not a file", field="model")
    return normalised


def resolve_location(location: str, base_dir: str | os.PathLike[str], *, tensor: str = "") -> Path:
    """The file an external-data location names, checked on disk against the model's folder ``base_dir``.

    Raises:
        BadInputError: (field ``model``) anything :func:`check_location` refuses, a symlink that leads out of
            ``base_dir``, or a file that does not exist.
    """
    relative = check_location(location, tensor=tensor)
    base = Path(base_dir).resolve()
    target = (base / relative).resolve()
    if base not in target.parents:
        raise _outside(tensor, location, "a symlink leads out of the folder")
    if not target.is_file():
        raise BadInputError(f"external data file {location!r} for tensor {tensor!r} is missing", field="model")
    return target


def locate_in_files(location: str, model_path: str, files: Container[str], *, tensor: str = "") -> str:
    """The path, among ``files``, of the external data a model shipped as a set of files names.

    Args:
        location: the tensor's external-data location.
        model_path: the model's relative POSIX path within the set (locations resolve against its folder).
        files: the relative POSIX paths of every file shipped with the model.
        tensor: the tensor's name, for messages.

    Raises:
        BadInputError: (field ``model``) anything :func:`check_location` refuses, or a file not in ``files``.
    """
    relative = check_location(location, tensor=tensor)
    target = posixpath.normpath(posixpath.join(posixpath.dirname(model_path), relative))
    if target not in files:
        raise BadInputError(
            f"tensor {tensor!r}: external data file {location!r} was not uploaded with the model", field="model"
        )
    return target


def check_external_paths(model: onnx.ModelProto, base_dir: str | os.PathLike[str]) -> None:
    """Apply the rule to every tensor of a loaded model whose data lives in another file.

    Covers the tensors a loader reads: initializers, sparse tensors, tensor attributes, subgraphs, functions.

    Raises:
        BadInputError: naming the tensor and its location.
    """
    for tensor in _all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            resolve_location(location, base_dir, tensor=tensor.name)


def external_files(model_path: str | os.PathLike[str]) -> list[str]:
    """The external-data files the model file at ``model_path`` names, as checked relative POSIX paths.

    Reads the file's wire format only (see :mod:`onnxprune.io.scan`): a 2 GB model costs no memory here.
    Whoever sends these files on (the client uploading a model) must never be made to send a file from
    outside the model's folder, so every location passes :func:`resolve_location` first.

    Raises:
        BadInputError: not an ONNX model, or a location the rule refuses.
    """
    base = Path(model_path).parent
    found: set[str] = set()
    for info in scan_tensors(model_path):
        if info.is_external:
            location = info.external.get("location", "")
            resolve_location(location, base, tensor=info.name)
            found.add(check_location(location, tensor=info.name))
    return sorted(found)


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    for graph in _graphs(model):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        yield from _attribute_tensors(graph.node)
    for function in model.functions:
        yield from _attribute_tensors(function.node)


def _graphs(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    """Every graph of the model: the main one, training graphs, and subgraphs in attributes (If/Loop/Scan)."""
    pending = [model.graph, *(g for info in model.training_info for g in (info.initialization, info.algorithm))]
    pending += [g for function in model.functions for node in function.node for g in _subgraphs(node)]
    while pending:
        graph = pending.pop()
        yield graph
        pending += [g for node in graph.node for g in _subgraphs(node)]


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def _attribute_tensors(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.TensorProto]:
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            sparse_tensors = [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []
            for sparse in [*sparse_tensors, *attr.sparse_tensors]:
                yield from (sparse.values, sparse.indices)
