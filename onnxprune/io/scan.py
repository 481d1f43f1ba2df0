"""What the tensors of an ONNX file declare, read from the protobuf wire format without loading the model.

Walks the file through a read-only mmap and never materialises tensor data, so looking at a 2 GB model costs
almost no memory. The server uses it to vet an upload before any loader touches it, and the client uses it to
find the external-data files to send with a model; both then apply :mod:`onnxprune.io.safety`'s path rule.

Example:
    >>> [t.name for t in scan_tensors("examples/digits_cnn.onnx")][:1]    # doctest: +SKIP
    ['conv1.weight']
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from onnxprune.errors import BadInputError

EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_MAX_DEPTH = 64
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

    @property
    def is_external(self) -> bool:
        """Whether the data lives in another file (either marker counts: a loader honours both)."""
        return self.data_location == EXTERNAL or bool(self.external)


def scan_tensors(path: str | os.PathLike[str]) -> list[TensorInfo]:
    """What every tensor of the model file at ``path`` declares: dims, type, external data.

    Covers initializers, sparse tensors, tensor attributes, subgraphs, functions and training info.

    Raises:
        BadInputError: (field ``model``) the file is empty, truncated or not an ONNX model, or nests
            subgraphs absurdly deep.
    """
    with _mapped(path) as buf:
        top = {number for number, _, _, _ in _fields(buf, 0, len(buf))}
        if 7 not in top or 1 not in top:
            raise BadInputError("not an ONNX model: no ir_version or graph", field="model")
        return list(_walk(buf, "model", 0, len(buf), 0))


@contextmanager
def _mapped(path: str | os.PathLike[str]) -> Iterator[memoryview]:
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


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file read in ``chunk``-byte blocks: the content address the client and the blob stores share."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
