"""Weight-free copies of a model, for work that needs the graph but not the weight bytes.

Shape inference, the checker, type inference for captured tensors and sessions of models above 2 GB all
read a copy built field by field without the initializers, so nothing near the protobuf limit is copied
or serialised and the original is only read (detaching and re-adding its initializers would copy them).
"""

from __future__ import annotations

import numpy as np
import onnx

WEIGHTLESS_MIN_BYTES = 1 << 20
"""Float initializers at least this large become typed inputs in :func:`weightless` copies."""

FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
)


def without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of everything but the graph's initializers (the caller adds what it needs)."""
    copy = onnx.ModelProto()
    _copy_fields(model, copy, skip={"graph"})
    _copy_fields(model.graph, copy.graph, skip={"initializer"})
    return copy


def weightless(model: onnx.ModelProto, min_bytes: int = WEIGHTLESS_MIN_BYTES) -> onnx.ModelProto:
    """A copy whose float initializers of at least ``min_bytes`` are typed graph inputs instead.

    Same graph, shapes and types, no weight bytes. Small and integer initializers stay, so Reshape
    targets and similar constants still propagate through shape inference.
    """
    big = {t.name: t for t in model.graph.initializer
           if t.data_type in FLOAT_TYPES and tensor_bytes(t) >= min_bytes}
    copy = without_initializers(model)
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


def tensor_bytes(t: onnx.TensorProto) -> int:
    """Bytes of a tensor's values as declared by its dims and type (wherever the data lives)."""
    n = int(np.prod(t.dims)) if t.dims else 1
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
