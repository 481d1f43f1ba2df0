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


def without_initializers(model: onnx.ModelProto, drop: frozenset[str] = frozenset()) -> onnx.ModelProto:
    """A copy of everything but the graph's initializers (the caller adds what it needs) and the nodes
    whose first output is in ``drop``."""
    copy = onnx.ModelProto()
    _copy_fields(model, copy, skip={"graph"})
    _copy_fields(model.graph, copy.graph, skip={"initializer", "node"} if drop else {"initializer"})
    if drop:
        copy.graph.node.extend(n for n in model.graph.node if not (n.output and n.output[0] in drop))
    return copy


def weightless(model: onnx.ModelProto, min_bytes: int = WEIGHTLESS_MIN_BYTES, *,
               constants: bool = False) -> onnx.ModelProto:
    """A copy whose float initializers of at least ``min_bytes`` are typed graph inputs instead.

    Same graph, shapes and types, no weight bytes. Small and integer initializers stay, so Reshape
    targets and similar constants still propagate through shape inference. With ``constants``, float
    ``Constant`` nodes of at least ``min_bytes`` (where Paddle exports keep their weights) become typed
    inputs too (:func:`constant_weights` gives their values); off by default, as the nodes leave the graph.
    """
    big = {t.name: t for t in model.graph.initializer
           if t.data_type in FLOAT_TYPES and tensor_bytes(t) >= min_bytes}
    held = constant_weights(model, min_bytes) if constants else {}
    copy = without_initializers(model, frozenset(held))
    copy.graph.initializer.extend(t for t in model.graph.initializer if t.name not in big)
    declared = {i.name for i in copy.graph.input}
    copy.graph.input.extend(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims))
                            for name, t in (*big.items(), *held.items()) if name not in declared)
    return copy


def constant_weights(model: onnx.ModelProto, min_bytes: int = WEIGHTLESS_MIN_BYTES) -> dict[str, onnx.TensorProto]:
    """Output name → value of the main graph's ``Constant`` nodes that hold a float tensor of ``min_bytes`` or more."""
    held: dict[str, onnx.TensorProto] = {}
    for node in model.graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        for a in node.attribute:
            if a.name == "value" and a.t.data_type in FLOAT_TYPES and tensor_bytes(a.t) >= min_bytes:
                held[node.output[0]] = a.t
    return held


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
