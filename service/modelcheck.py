"""Safety checks on an uploaded ONNX model before any loader touches it.

ONNX external data names files by path; a model whose ``location`` is absolute or climbs out with ``..``
makes a loader read (and send back, inside a "pruned" model) any file the server can read. This module walks
the protobuf wire format of the model file directly, through an mmap and without materialising any tensor
data, so the check costs almost no memory even for a 2 GB model, and rejects:

- files that are not a ModelProto (random bytes) or end mid-field (truncated);
- external-data locations that are absolute, contain ``..``, or name a file that was not uploaded with the
  model; offset/length outside that file;
- tensors whose declared size (product of dims × element size) exceeds a limit (a 1 KB model can declare a
  petabyte tensor and make a loader allocate it).
"""

from __future__ import annotations

import math
import mmap
import posixpath
from contextlib import contextmanager
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from onnxprune.errors import BadInputError

_MAX_DEPTH = 64
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
# TensorProto.DataType → bits per element; unknown types count as 8 bits.
_BITS = {1: 32, 2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 9: 8, 10: 16, 11: 64, 12: 32, 13: 64, 14: 64, 15: 128,
         16: 16, 17: 8, 18: 8, 19: 8, 20: 8, 21: 4, 22: 4, 23: 4, 24: 8, 25: 2, 26: 2}

# (message kind, field number) → nested message kind, for the fields that can hold tensors.
_NESTED = {
    ("model", 7): "graph",
    ("model", 20): "training",
    ("model", 25): "function",
    ("training", 1): "graph",
    ("training", 2): "graph",
    ("function", 7): "node",
    ("graph", 1): "node",
    ("graph", 5): "tensor",
    ("graph", 15): "sparse",
    ("node", 5): "attribute",
    ("attribute", 5): "tensor",
    ("attribute", 6): "graph",
    ("attribute", 10): "tensor",
    ("attribute", 11): "graph",
    ("attribute", 22): "sparse",
    ("attribute", 23): "sparse",
    ("sparse", 1): "tensor",
    ("sparse", 2): "tensor",
}


@dataclass
class TensorInfo:
    """What a TensorProto declares, without its data."""

    name: str = ""
    dims: list[int] = field(default_factory=list)
    data_type: int = 0
    data_location: int = 0
    external: dict[str, str] = field(default_factory=dict)

    @property
    def declared_bytes(self) -> int:
        return math.ceil(math.prod(self.dims) * _BITS.get(self.data_type, 8) / 8)


def _truncated() -> BadInputError:
    return BadInputError("model file is truncated or not an ONNX model (a field runs past the end)", field="model")


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _truncated()
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Yield (field number, wire type, value or start, end) for each field of one message."""
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise BadInputError("not an ONNX model: invalid protobuf field number 0", field="model")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value, pos
        elif wire == 1 or wire == 5:
            size = 8 if wire == 1 else 4
            if pos + size > end:
                raise _truncated()
            yield number, wire, pos, pos + size
            pos += size
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise _truncated()
            yield number, wire, pos, pos + length
            pos += length
        else:
            raise BadInputError(f"not an ONNX model: unsupported protobuf wire type {wire}", field="model")


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _tensor(buf: memoryview, start: int, end: int) -> TensorInfo:
    info = TensorInfo()
    for number, wire, a, b in _fields(buf, start, end):
        if number == 1 and wire == 0:
            info.dims.append(_signed(a))
        elif number == 1 and wire == 2:
            pos = a
            while pos < b:
                value, pos = _varint(buf, pos, b)
                info.dims.append(_signed(value))
        elif number == 2 and wire == 0:
            info.data_type = a
        elif number == 8 and wire == 2:
            info.name = bytes(buf[a:b]).decode("utf-8", "replace")
        elif number == 14 and wire == 0:
            info.data_location = a
        elif number == 13 and wire == 2:
            entry = {k: bytes(buf[s:e]).decode("utf-8", "replace") for k, w, s, e in _fields(buf, a, b) if w == 2}
            info.external[entry.get(1, "")] = entry.get(2, "")
    return info


def _walk(buf: memoryview, kind: str, start: int, end: int, depth: int) -> Iterator[TensorInfo]:
    if depth > _MAX_DEPTH:
        raise BadInputError(f"model nests subgraphs deeper than {_MAX_DEPTH} levels", field="model")
    for number, wire, a, b in _fields(buf, start, end):
        nested = _NESTED.get((kind, number))
        if nested is None or wire != 2:
            continue
        if nested == "tensor":
            yield _tensor(buf, a, b)
        else:
            yield from _walk(buf, nested, a, b, depth + 1)


def _resolve_location(model_path: str, location: str, tensor: str) -> str:
    """The input-directory path an external-data location names, or BadInputError if it escapes."""
    if not location:
        raise BadInputError(f"tensor {tensor!r} has external data without a location", field="model")
    if location.startswith(("/", "\\")) or "\\" in location or ":" in location or "\0" in location:
        raise BadInputError(
            f"tensor {tensor!r}: external data location {location!r} is absolute; it must be a relative path "
            "next to the model",
            field="model",
        )
    if ".." in location.split("/"):
        raise BadInputError(
            f"tensor {tensor!r}: external data location {location!r} leaves the model's directory ('..')",
            field="model",
        )
    return posixpath.normpath(posixpath.join(posixpath.dirname(model_path), location))


def check_model(
    path: Path,
    *,
    model_path: str,
    files: Mapping[str, int],
    max_tensor_bytes: int,
) -> list[TensorInfo]:
    """Validate the model file at ``path`` without loading tensor data; return what its tensors declare.

    Args:
        path: the model file on disk.
        model_path: its relative path in the job's input directory (external locations resolve against it).
        files: relative path → size of every file uploaded with the model.
        max_tensor_bytes: the largest declared tensor accepted.

    Raises:
        BadInputError: (field ``model``) for anything listed in the module docstring.
    """
    with _mapped(path) as buf:
        return _check(buf, model_path, files, max_tensor_bytes)


def scan_tensors(path: Path) -> list[TensorInfo]:
    """What every tensor of the model file at ``path`` declares (dims, type, external data), read through an
    mmap without materialising any tensor data; the client uses it to find the external-data files to upload.

    Raises:
        BadInputError: the file is empty, truncated or not an ONNX model.
    """
    with _mapped(path) as buf:
        return _scan(buf)


@contextmanager
def _mapped(path: Path) -> Iterator[memoryview]:
    """The file's bytes through a read-only mmap (no copy); an empty file is refused before mapping."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            raise BadInputError("model file is empty", field="model")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            buf = memoryview(mm)
            try:
                yield buf
            finally:
                buf.release()


def _scan(buf: memoryview) -> list[TensorInfo]:
    top = {number for number, _, _, _ in _fields(buf, 0, len(buf))}
    if 7 not in top or 1 not in top:
        raise BadInputError("not an ONNX model: no ir_version or graph", field="model")
    return list(_walk(buf, "model", 0, len(buf), 0))


def _check(buf: memoryview, model_path: str, files: Mapping[str, int], max_tensor_bytes: int) -> list[TensorInfo]:
    tensors = _scan(buf)
    for t in tensors:
        if any(d < 0 for d in t.dims):
            raise BadInputError(f"tensor {t.name!r} declares negative dimensions {t.dims}", field="model")
        declared = t.declared_bytes
        if declared > max_tensor_bytes:
            raise BadInputError(
                f"tensor {t.name!r} declares {declared} bytes (dims {t.dims}), over the limit of {max_tensor_bytes}",
                field="model",
            )
        if t.data_location != _EXTERNAL and not t.external:
            continue
        target = _resolve_location(model_path, t.external.get("location", ""), t.name)
        if target not in files:
            raise BadInputError(
                f"tensor {t.name!r}: external data file {t.external.get('location')!r} was not uploaded with the "
                "model",
                field="model",
            )
        try:
            offset = int(t.external.get("offset", "0") or 0)
            length = int(t.external["length"]) if t.external.get("length") else declared
        except ValueError as e:
            raise BadInputError(
                f"tensor {t.name!r}: external data offset/length are not integers", field="model"
            ) from e
        if offset < 0 or length < 0 or offset + length > files[target]:
            raise BadInputError(
                f"tensor {t.name!r}: external data [{offset}, {offset + length}) lies outside {target!r} "
                f"({files[target]} bytes)",
                field="model",
            )
    return tensors
