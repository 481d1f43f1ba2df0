"""Weight-free copies of a model: shape inference, the checker and sessions that need no weight bytes."""

from __future__ import annotations

import logging

import numpy as np
import onnx

log = logging.getLogger(__name__)



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
                              onnx.TensorProto.BFLOAT16) and tensor_bytes(t) >= WEIGHTLESS_MIN_BYTES}
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


def tensor_bytes(t: onnx.TensorProto) -> int:
    n = int(np.prod(t.dims)) if t.dims else 1
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
