"""Per-op channel propagation rules for the analysis driver (:mod:`onnxprune.analysis.driver`).

Each rule reads the :class:`~onnxprune.analysis.core.ChannelMap` of a node's inputs and either sets the
maps of its outputs (recording the weights to slice and the fixups a cut needs) or blocks the ids it
cannot follow, always with a reason. An op without a rule blocks its inputs (the driver's policy).

Beyond plain CNNs: grouped convolution couples channel j of every group (each group loses the same
offsets); Reshape splits put ids on one new axis and couple the others (attention heads, channel
shuffle, fused Q/K/V) and update the target entry, even when it is computed at runtime; MatMul of two
computed tensors couples heads on batch axes and contracted features; LayerNormalization over the
channels (fused, or decomposed into ReduceMean/Sub/Pow/Sqrt/Div) couples γ/β across the residual
stream; Gather from a constant table is an embedding producer; a two-operand Einsum with a 2-D constant weight
is a dense layer; onnxruntime's contrib ops from the genai model builder (GroupQueryAttention, RotaryEmbedding,
SkipSimplifiedLayerNormalization) have rules in their com.microsoft domain; recurrent and control-flow ops block.
"""

from __future__ import annotations

from onnxprune.analysis.analyzer import RuleRegistry
from onnxprune.analysis.rules.contrib import (
    MS_DOMAIN,
    group_query_attention,
    rotary_embedding,
    skip_simplified_layer_norm,
)
from onnxprune.analysis.rules.conv import conv, conv_transpose
from onnxprune.analysis.rules.elementwise import (
    BROADCAST,
    NO_CHANNELS,
    POOLS,
    REDUCE,
    UNARY,
    broadcast,
    no_channels,
    pad,
    pool,
    reduce,
    resize,
    softmax,
    unary,
)
from onnxprune.analysis.rules.einsum import einsum
from onnxprune.analysis.rules.layout import (
    concat,
    expand,
    flatten,
    gather,
    reshape,
    slice_,
    split,
    squeeze,
    tile,
    transpose,
    unsqueeze,
)
from onnxprune.analysis.rules.linear import gemm, matmul
from onnxprune.analysis.rules.norm import batch_norm, layer_norm
from onnxprune.analysis.rules.opaque import (
    CONTROL_FLOW,
    RECURRENT,
    control_flow,
    recurrent,
)


def default_registry() -> RuleRegistry:
    """A fresh registry holding every built-in rule (a new object each call: tests can extend their own)."""
    reg = RuleRegistry()
    reg.register("Conv", conv)
    reg.register("ConvTranspose", conv_transpose)
    reg.register("Gemm", gemm)
    reg.register("MatMul", matmul)
    reg.register("Einsum", einsum)
    reg.register(("BatchNormalization", "InstanceNormalization"), batch_norm)
    reg.register(UNARY, unary)
    reg.register(POOLS, pool)
    reg.register(BROADCAST, broadcast)
    reg.register(REDUCE, reduce)
    reg.register(NO_CHANNELS, no_channels)
    reg.register("Concat", concat)
    reg.register("Split", split)
    reg.register("Slice", slice_)
    reg.register("Flatten", flatten)
    reg.register("Reshape", reshape)
    reg.register("Transpose", transpose)
    reg.register("Squeeze", squeeze)
    reg.register("Unsqueeze", unsqueeze)
    reg.register(("Softmax", "LogSoftmax", "Hardmax"), softmax)
    reg.register(("Resize", "Upsample"), resize)
    reg.register("Pad", pad)
    reg.register(("LayerNormalization", "SimplifiedLayerNormalization"), layer_norm)  # onnxruntime keeps the
    # latter in the default domain
    reg.register("SkipSimplifiedLayerNormalization", skip_simplified_layer_norm, MS_DOMAIN)
    reg.register("RotaryEmbedding", rotary_embedding, MS_DOMAIN)
    reg.register("GroupQueryAttention", group_query_attention, MS_DOMAIN)
    reg.register("Gather", gather)
    reg.register("Expand", expand)
    reg.register("Tile", tile)
    reg.register(RECURRENT, recurrent)
    reg.register(CONTROL_FLOW, control_flow)
    return reg
