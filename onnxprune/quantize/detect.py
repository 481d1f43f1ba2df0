"""Recognise a quantized graph, so stages that need float weights can refuse it with a clear message."""

from __future__ import annotations

import onnx

QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul", "QLinearAdd",
    "QLinearMul", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSigmoid",
    "QLinearLeakyRelu", "QLinearSoftmax", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat", "QGemm", "QAttention", "MatMulNBits",
})
"""Ops that only appear in quantized graphs (onnx standard and onnxruntime's com.microsoft contrib ops)."""


def quantized_nodes(model: onnx.ModelProto) -> list[str]:
    """Names (or ``op #index`` when unnamed) of the nodes of ``model``'s main graph that are quantized ops.

    Example:
        >>> quantized_nodes(onnx.load("model.int8.onnx"))[:2]  # doctest: +SKIP
        ['input_QuantizeLinear', 'input_DequantizeLinear']
    """
    return [n.name or f"{n.op_type} #{k}" for k, n in enumerate(model.graph.node) if n.op_type in QUANTIZED_OPS]


def has_float16(model: onnx.ModelProto) -> bool:
    """Whether ``model`` stores float16 weights (an FP16-converted graph)."""
    return any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
