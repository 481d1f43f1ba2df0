"""onnxruntime's contrib ops as the onnxruntime-genai model builder emits them (fp32, CPU).

- ``SkipSimplifiedLayerNormalization`` (com.microsoft): RMSNorm of ``input + skip [+ bias]``; its fourth output
  is that sum, the residual stream the next block adds to. Input and skip are coupled like a residual Add, the
  scale follows the channels, and the cut is approximate (the statistic spans the channel axis).
  ``SimplifiedLayerNormalization`` lives in the default domain and reuses :func:`~.norm.layer_norm`.
- ``RotaryEmbedding`` (com.microsoft) rotates pairs of dims inside each head: heads pass through whole, so
  each head's dims are coupled (no per-dim cuts) and ``num_heads`` follows the kept heads.
- ``GroupQueryAttention`` (com.microsoft): query heads share key/value heads (``num_heads / kv_num_heads`` per
  KV head). A channel is a whole KV group: one KV head's key and value dims with its query heads' dims, from
  the packed or separate q/k/v projections, through the output to the o_proj rows and into the KV cache
  (``past_key``/``past_value`` in, ``present_key``/``present_value`` out, ``[B, kv_heads, T, head_size]``),
  with ``num_heads``/``kv_num_heads`` set to the kept counts. ``AnalysisOptions.heads == "dims"`` does not apply
  here: the op derives the head size from the widths and the rotary caches, so only whole groups go.

The language model's hidden width (the residual stream these normalise) is kept by the driver's ``lm_stream``
policy, with its reason; any other com.microsoft op has no rule and blocks what it reads.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.analysis.analyzer import Analyzer
from onnxprune.analysis.core import ChannelMap, FixupKind
from onnxprune.analysis.graph import optional_input
from onnxprune.analysis.index_mapping import FIXED, SplitAxisMapping
from onnxprune.analysis.rules.elementwise import broadcast

MS_DOMAIN = "com.microsoft"

GQA_QUERY, GQA_KEY, GQA_VALUE, GQA_PAST_KEY, GQA_PAST_VALUE = range(5)
GQA_BIAS = 10
"""attention_bias; inputs 5-9 (seqlens_k, total_sequence_length, cos/sin caches, position_ids) carry no
channels, inputs after the bias (head_sink) are per head."""


def skip_simplified_layer_norm(az: Analyzer, node: gs.Node) -> None:
    """Residual add and RMSNorm over the last axis: output 0 (normalised) and 3 (the sum) carry the channels."""
    maps = [az.map(t) for t in node.inputs[:2]]
    if all(m is None for m in maps):
        return
    rank = az.rank(node.inputs[0])
    if rank is None or any(m is not None and m.axis != rank - 1 for m in maps):
        for m in maps:
            az.block(m.ids if m is not None else None, f"{node.op} {node.name} normalizes the last axis, "
                                                        "which does not carry the channels alone")
        return
    _fill_shape(az, node.outputs[0], az.shape(node.inputs[0]))
    broadcast(az, node)
    out = az.map(node.outputs[0])
    if out is None:
        return
    az.approximate(out.ids, f"{node.op} {node.name} normalizes over the channels: a cut changes its statistics")
    for k in (1, 2):
        if len(node.outputs) > k and node.outputs[k].outputs:
            az.block(out.ids, f"{node.op} {node.name} mean/inv-std outputs are used")
    if len(node.outputs) > 3:
        _fill_shape(az, node.outputs[3], az.shape(node.inputs[0]))
        az.set_map(node.outputs[3], out)


def rotary_embedding(az: Analyzer, node: gs.Node) -> None:
    """Rotation within each head: ``[B, S, H·D]`` (heads coupled whole, ``num_heads`` updated when set) or
    ``[B, H, S, D]`` (heads on axis 1 pass); channels on the head dim block."""
    xm, rank = az.map(node.inputs[0]), az.rank(node.inputs[0])
    for t in node.inputs[1:]:
        if az.map(t) is not None:
            az.block(az.map(t).ids, f"{node.op} {node.name} reads channels as positions or rotary tables")
    if xm is None:
        return
    _fill_shape(az, node.outputs[0], az.shape(node.inputs[0]))
    if rank == 4 and xm.axis == 1:
        az.set_map(node.outputs[0], xm)
        return
    heads = _rotary_heads(az, node, len(xm.ids))
    if rank != 3 or xm.axis != 2 or heads is None:
        az.block(xm.ids, f"{node.op} {node.name} rotates dims within heads: only whole heads on the head axis "
                         "or of a [B, S, heads x head_size] input are cut")
        return
    head_ids = whole_heads(az, xm.ids, heads, f"{node.op} {node.name} rotates them with unprunable dims")
    if int(node.attrs.get("num_heads", 0)) > 0:
        az.fixup(node, FixupKind.ATTR_COUNT, [head_ids], attr="num_heads")
    az.set_map(node.outputs[0], ChannelMap(2, np.repeat(head_ids, len(xm.ids) // heads)))


def _rotary_heads(az: Analyzer, node: gs.Node, width: int) -> int | None:
    """The head count of a 3-D RotaryEmbedding input: ``num_heads``, else width / rotary dim (the cos
    cache holds half of it) when the rotation spans whole heads."""
    heads = int(node.attrs.get("num_heads", 0))
    if heads <= 0:
        cos = az.shape(optional_input(node, 2))
        rot = int(node.attrs.get("rotary_embedding_dim", 0)) or (2 * cos[-1] if cos and isinstance(cos[-1], int) else 0)
        heads = width // rot if rot > 0 and width % rot == 0 else 0
    return heads if heads > 0 and width % heads == 0 else None


def whole_heads(az: Analyzer, ids: np.ndarray, heads: int, reason: str) -> np.ndarray:
    """Couple the dims of each of ``heads`` consecutive blocks of ``ids``; one id per head (the dims of a
    head go together: attention mixes them)."""
    cols = SplitAxisMapping((heads, len(ids) // heads)).ties(ids, 0)
    out = cols[0]
    for col in cols[1:]:
        out = az.couple(out, col, reason)
    return out


def group_query_attention(az: Analyzer, node: gs.Node) -> None:
    """Whole KV groups through GroupQueryAttention (see the module docstring); what else it reads blocks."""
    for i, t in enumerate(node.inputs):
        if i > GQA_PAST_VALUE and az.map(t) is not None:
            az.block(az.map(t).ids, f"{node.op} {node.name} reads channels in input {i} ({t.name})")
    heads, kv_heads = int(node.attrs.get("num_heads", 0)), int(node.attrs.get("kv_num_heads", 0))
    qkv = _gqa_projections(az, node, heads, kv_heads)
    if qkv is None:
        return
    q, k, v, head_size = qkv
    reason = f"{node.op} {node.name} groups them with unprunable heads"
    groups = az.couple(whole_heads(az, k, kv_heads, reason), whole_heads(az, v, kv_heads, reason), reason)
    per_group = whole_heads(az, q, heads, reason).reshape(kv_heads, heads // kv_heads)
    for col in per_group.T:  # query head h reads KV head h // (heads / kv_heads)
        groups = az.couple(groups, col, reason)
    if not _gqa_per_head_inputs(az, node, groups):
        return
    az.fixup(node, FixupKind.ATTR_COUNT, [np.repeat(groups, heads // kv_heads)], attr="num_heads")
    az.fixup(node, FixupKind.ATTR_COUNT, [groups], attr="kv_num_heads")
    q_dims = az.shape(node.inputs[GQA_QUERY])
    _fill_shape(az, node.outputs[0], None if q_dims is None else [*q_dims[:-1], heads * head_size])
    az.set_map(node.outputs[0], ChannelMap(2, np.repeat(groups, heads // kv_heads * head_size)))
    _gqa_cache(az, node, groups)


def _gqa_projections(az: Analyzer, node: gs.Node, heads: int, kv_heads: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int] | None:
    """Query, key and value ids on the last axis (packed ``[B, S, (H + 2·KV)·D]`` query, or three inputs;
    an input without channels counts as fixed), with the head size; None (after blocking) when unreadable."""
    inputs = [optional_input(node, i) for i in (GQA_QUERY, GQA_KEY, GQA_VALUE)]
    maps = [az.map(t) for t in inputs]
    if all(m is None for m in maps):
        return None
    packed = inputs[GQA_KEY] is None
    counts = [heads + 2 * kv_heads] if packed else [heads, kv_heads, kv_heads]
    dims = [az.shape(t) for t in inputs[: len(counts)]]
    width = dims[0][-1] if dims[0] and heads > 0 and kv_heads > 0 and heads % kv_heads == 0 else None
    size = width // counts[0] if isinstance(width, int) else 0
    if size < 1 or any(d is None or len(d) != 3 or d[-1] != n * size for d, n in zip(dims, counts)) or any(
            m is not None and m.axis != 2 for m in maps):
        for m in maps:
            az.block(None if m is None else m.ids, f"{node.op} {node.name}: query/key/value layout not understood "
                                                   "(expected [B, S, heads x head_size] and num_heads, kv_num_heads)")
        return None
    if packed:
        ids = maps[0].ids
        return ids[: heads * size], ids[heads * size: (heads + kv_heads) * size], ids[(heads + kv_heads) * size:], size
    q, k, v = (m.ids if m is not None else np.full(n * size, FIXED, np.int64) for m, n in zip(maps, counts))
    return q, k, v, size


def _gqa_per_head_inputs(az: Analyzer, node: gs.Node, groups: np.ndarray) -> bool:
    """An attention bias over heads ``[B, H, S, T]`` or head sinks would need slicing too: they block."""
    bias, dims = optional_input(node, GQA_BIAS), az.shape(optional_input(node, GQA_BIAS))
    per_head = [i for i in range(GQA_BIAS + 1, len(node.inputs)) if optional_input(node, i) is not None]
    if bias is not None and (dims is None or len(dims) != 4 or dims[1] != 1):
        per_head.insert(0, GQA_BIAS)
    for i in per_head:
        az.block(groups, f"{node.op} {node.name} reads per-head input {i} ({node.inputs[i].name}), which is not sliced")
    return not per_head


def _gqa_cache(az: Analyzer, node: gs.Node, groups: np.ndarray) -> None:
    """past/present key and value ``[B, kv_heads, T, D]`` carry the groups on axis 1; a past that is a graph
    input and a present that is a graph output are generation state and shrink with them."""
    inputs = {t.name for t in az.graph.inputs}
    outputs = {t.name for t in az.graph.outputs}
    for past_i, present_i in ((GQA_PAST_KEY, 1), (GQA_PAST_VALUE, 2)):
        past = optional_input(node, past_i)
        present = node.outputs[present_i] if len(node.outputs) > present_i else None
        if past is not None and Analyzer.present(past):
            m, dims = az.map(past), az.shape(past)
            if dims is None or len(dims) != 4 or (isinstance(dims[1], int) and dims[1] != len(groups)):
                az.block(groups, f"{node.op} {node.name}: past cache {past.name} is not [B, kv_heads, T, head_size]")
                return
            if m is not None:
                az.couple(m.ids, groups, f"{node.op} {node.name} reads a past cache with other heads")
            elif past.name in inputs and present is not None and present.name in outputs:
                az.cache_io[past.name] = present.name
                az.set_map(past, ChannelMap(1, groups.copy()))
            else:
                az.block(groups, f"{node.op} {node.name} reads a computed past cache {past.name} without the heads")
                return
        if present is not None and Analyzer.present(present):
            az.set_map(present, ChannelMap(1, groups.copy()))


def _fill_shape(az: Analyzer, t: gs.Tensor, dims: list[int | str] | None) -> None:
    """Shape inference knows no contrib schema: give an output without a shape the one its op defines."""
    if dims is not None and t.name and az.shapes.get(t.name) is None:
        az.shapes[t.name] = list(dims)
