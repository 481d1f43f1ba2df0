"""Contrib ops rewritten into standard ONNX ops, for training only.

onnxruntime-genai's model builder emits ``SimplifiedLayerNormalization`` and the ``com.microsoft`` ops
``SkipSimplifiedLayerNormalization``, ``RotaryEmbedding`` and ``GroupQueryAttention``. onnxruntime has no
gradient kernels for them, and writing VJP rules for fused kernels would repeat the rules of the ops they
fuse. So the copy of the model that the training graph is built from gets each such node replaced by an
equivalent subgraph of standard ops (:func:`expand_contrib`); the existing VJP rules differentiate those,
and because initializer names do not change, the trained weights map back onto the deployed model,
which keeps its contrib ops. Each expansion is checked against onnxruntime's own kernel in the tests.

Expansions cover what training needs: GroupQueryAttention at prefill (an empty past) with full causal
attention; anything else (a past, a local window, softcap, extra inputs) raises :class:`BadInputError`
naming the attribute or input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxprune.errors import BadInputError
from onnxprune.io.limits import default_opset
from onnxprune.registry import OpRegistry
from onnxprune.training.grad.context import (
    FLOAT_TYPES,
    GradContext,
    TensorInfo,
    collect_tensor_info,
)
from onnxprune.training.grad.rules._common import (
    attr,
    attr_float,
    attr_int,
    optional_input,
)

MS = "com.microsoft"
#: Opset the expansions are written for (Split/Unsqueeze/ReduceSum take their axes as inputs).
MIN_EXPAND_OPSET = 13
#: What masked attention scores are set to (torch's choice): exp() of it is 0, and no NaN when a row is masked.
MASKED = float(np.finfo(np.float32).min)

#: An expansion: (emitter, node) → appends nodes to ``ctx.nodes`` that write the node's used outputs by name.
Expand = Callable[[GradContext, onnx.NodeProto], None]


@dataclass(frozen=True)
class Expansion:
    """How to rewrite one op; ``needs_shapes``: it reads inferred shapes (head sizes, ranks) of its inputs."""

    expand: Expand
    needs_shapes: bool = False


class ExpansionRegistry(OpRegistry[Expansion]):
    """Maps (domain, op type) to an :class:`Expansion`; build one per use with :func:`default_expansions`."""

    def __init__(self) -> None:
        super().__init__("training expansion")


# ------------------------------------------------------------------------------------------ helpers
def _refuse(node: onnx.NodeProto, what: str) -> BadInputError:
    return BadInputError(f"{node.op_type} node {node.name!r}: {what}; onnxprune can fine-tune it only without "
                         "that (the deployed model is not affected)", field="model")


def _output(node: onnx.NodeProto, i: int) -> str:
    return node.output[i] if len(node.output) > i else ""


def _write(ctx: GradContext, value: str, name: str) -> None:
    """Let the node's output ``name`` carry ``value`` (skipped for outputs the model leaves off)."""
    if name:
        ctx.nodes.append(helper.make_node("Identity", [value], [name], name=ctx.fresh("out")))


def _scalar(ctx: GradContext, value: float, dtype: int) -> str:
    return ctx.const(np.asarray(value, helper.tensor_dtype_to_np_dtype(dtype)), "s")


def _dtype(ctx: GradContext, *names: str) -> int:
    """The float type of the first of ``names`` whose type is known (float32 otherwise)."""
    for n in names:
        ti = ctx.info.get(n)
        if n and ti is not None and ti.dtype in FLOAT_TYPES:
            return ti.dtype
    return TensorProto.FLOAT


def _dim(ctx: GradContext, x: str, axis: int) -> str:
    """``x.shape[axis]`` as a 1-element int64 tensor."""
    return ctx.emit("Gather", [ctx.emit("Shape", [x]), ctx.ints([axis])], axis=0)


def _refuse_outputs(node: onnx.NodeProto, used: set[str], produced: tuple[int, ...]) -> None:
    for i, o in enumerate(node.output):
        if o and o in used and i not in produced:
            raise _refuse(node, f"output {i} ({o!r}) is read by the graph but has no training expansion")


# ------------------------------------------------------------------------------------------ RMSNorm
def _rms(ctx: GradContext, x: str, axes: list[int], eps: float, scale: str, dtype: int) -> tuple[str, str]:
    """``(x · inv · scale, inv)`` with ``inv = 1/sqrt(mean(x², axes) + eps)`` (keepdims)."""
    ms = ctx.reduce("ReduceMean", ctx.emit("Mul", [x, x]), axes, keepdims=True)
    inv = ctx.emit("Reciprocal", [ctx.emit("Sqrt", [ctx.emit("Add", [ms, _scalar(ctx, eps, dtype)])])])
    return ctx.emit("Mul", [ctx.emit("Mul", [x, inv]), scale]), inv


def _simplified_layer_norm(ctx: GradContext, node: onnx.NodeProto) -> None:
    """SimplifiedLayerNormalization (default domain in onnxruntime): RMSNorm over ``axis`` … last."""
    axis = attr_int(node, "axis", -1)
    if axis >= 0:
        shape = ctx.shape(node.input[0])
        if shape is None:
            raise _refuse(node, f"axis={axis} needs the input's rank (use a negative axis or fix the input shapes)")
        axis -= len(shape)
    eps = attr_float(node, "epsilon", 1e-5)
    y, inv = _rms(ctx, node.input[0], list(range(axis, 0)), eps, node.input[1], _dtype(ctx, node.input[1], node.input[0]))
    _write(ctx, y, node.output[0])
    _write(ctx, inv, _output(node, 1))


def _skip_simplified_layer_norm(ctx: GradContext, node: onnx.NodeProto) -> None:
    """SkipSimplifiedLayerNormalization: ``s = input + skip (+ bias)``; outputs RMSNorm(s)·gamma, -, inv_std_var, s."""
    x, skip, gamma, bias = (optional_input(node, i) for i in range(4))
    s = ctx.emit("Add", [x, skip])
    if bias:
        s = ctx.emit("Add", [s, bias])
    eps = attr_float(node, "epsilon", 1e-12)
    y, inv = _rms(ctx, s, [-1], eps, gamma, _dtype(ctx, gamma, x))
    _write(ctx, y, node.output[0])
    _write(ctx, inv, _output(node, 2))
    _write(ctx, s, _output(node, 3))


# ------------------------------------------------------------------------------------------ rotary
def _static_last(ctx: GradContext, name: str, per: int = 1) -> int | None:
    """``name.shape[-1] // per`` when shape inference knows it."""
    shape = ctx.shape(name) if name else None
    return shape[-1] // per if shape and isinstance(shape[-1], int) and shape[-1] > 0 else None


def _rotate(ctx: GradContext, x: str, cos: str, sin: str, half: int, head: int, interleaved: bool) -> str:
    """Rotary embedding of the first ``2·half`` features of ``x`` ([B, ·, ·, head]); ``cos``/``sin`` end in
    ``half`` and broadcast against ``x[..., :half]``. The rest of each head passes unchanged.

    Split with constant sizes (not Slice) so shape inference keeps every shape and the backward is a Concat.
    """
    rest = head - 2 * half
    parts = ctx.emit_multi("Split", [x, ctx.ints([2 * half, rest])], 2, axis=-1) if rest else [x]
    if not interleaved:
        x1, x2 = ctx.emit_multi("Split", [parts[0], ctx.ints([half, half])], 2, axis=-1)
        o1 = ctx.emit("Sub", [ctx.emit("Mul", [x1, cos]), ctx.emit("Mul", [x2, sin])])
        o2 = ctx.emit("Add", [ctx.emit("Mul", [x2, cos]), ctx.emit("Mul", [x1, sin])])
        return ctx.emit("Concat", [o1, o2] + parts[1:], axis=-1)
    pairs = ctx.reshape(parts[0], [0, 0, 0, half, 2])
    even, odd = ctx.emit_multi("Split", [pairs, ctx.ints([1, 1])], 2, axis=-1)
    c, s = ctx.unsqueeze(cos, [-1]), ctx.unsqueeze(sin, [-1])
    oe = ctx.emit("Sub", [ctx.emit("Mul", [even, c]), ctx.emit("Mul", [odd, s])])
    oo = ctx.emit("Add", [ctx.emit("Mul", [odd, c]), ctx.emit("Mul", [even, s])])
    out = ctx.reshape(ctx.emit("Concat", [oe, oo], axis=-1), [0, 0, 0, 2 * half])
    return ctx.emit("Concat", [out] + parts[1:], axis=-1) if rest else out


def _half(ctx: GradContext, node: onnx.NodeProto, cache: str) -> int:
    """Half the rotary width: the cos cache's last dim."""
    half = _static_last(ctx, cache)
    if half is None:
        raise _refuse(node, f"a cos cache {cache!r} of unknown width (store it as an initializer)")
    return half


def _head_size(ctx: GradContext, node: onnx.NodeProto, x: str, per: int) -> int:
    d = _static_last(ctx, x, per)
    if d is None:
        raise _refuse(node, f"an input {x!r} whose head size is unknown (fix the input shapes)")
    return d


def _rotary_embedding(ctx: GradContext, node: onnx.NodeProto) -> None:
    """com.microsoft RotaryEmbedding: input [B, S, N·D] or [B, N, S, D], position_ids [B, S], cos/sin [P, r/2]."""
    x, pos, cos_cache, sin_cache = (optional_input(node, i) for i in range(4))
    if attr_int(node, "is_packed_batching", 0):
        raise _refuse(node, "is_packed_batching=1")
    if attr_float(node, "scale", 1.0) != 1.0:
        raise _refuse(node, "scale != 1")
    pshape, xshape = ctx.shape(pos), ctx.shape(x)
    if pshape is None or len(pshape) != 2:
        raise _refuse(node, f"position_ids of shape {pshape} (only [batch, sequence] position ids are expanded)")
    if xshape is None or len(xshape) not in (3, 4):
        raise _refuse(node, f"input of rank {None if xshape is None else len(xshape)} (fix the input shapes)")
    heads = attr_int(node, "num_heads", 0)
    dim = attr_int(node, "rotary_embedding_dim", 0)
    if dim and not heads and len(xshape) == 3:
        raise _refuse(node, "rotary_embedding_dim without num_heads")
    half = dim // 2 if dim else _half(ctx, node, cos_cache)
    cos, sin = (ctx.emit("Gather", [c, pos], axis=0) for c in (cos_cache, sin_cache))  # [B, S, width]
    if dim:
        cos, sin = (ctx.emit("Slice", [c, ctx.ints([0]), ctx.ints([half]), ctx.ints([-1])]) for c in (cos, sin))
    interleaved = bool(attr_int(node, "interleaved", 0))
    if len(xshape) == 4:  # [B, N, S, D]: cos as [B, 1, S, half]
        head = _head_size(ctx, node, x, 1)
        y = _rotate(ctx, x, ctx.unsqueeze(cos, [1]), ctx.unsqueeze(sin, [1]), half, head, interleaved)
    else:  # [B, S, N·D] as [B, S, N, D] (D = the rotary width without num_heads): cos as [B, S, 1, half]
        head = _head_size(ctx, node, x, heads) if heads else 2 * half
        x4 = ctx.reshape(x, [0, 0, -1, head])
        y4 = _rotate(ctx, x4, ctx.unsqueeze(cos, [2]), ctx.unsqueeze(sin, [2]), half, head, interleaved)
        y = ctx.reshape(y4, [0, 0, -1])
    _write(ctx, y, node.output[0])


# ------------------------------------------------------------------------------------------ attention
def _check_gqa(ctx: GradContext, node: onnx.NodeProto) -> None:
    """Refuse what the prefill expansion does not compute, naming the attribute or input."""
    checks = {"local_window_size": (-1, "local_window_size != -1 (sliding-window attention)"),
              "softcap": (0.0, "softcap != 0"), "smooth_softmax": (0, "smooth_softmax=1"),
              "qk_output": (0, "qk_output != 0")}
    for name, (want, what) in checks.items():
        if attr(node, name, want) != want:
            raise _refuse(node, what)
    extra = [n for n in node.input[9:] if n]
    if extra:
        raise _refuse(node, f"inputs {extra} (position_ids / attention_bias / head_sink)")
    for past in (optional_input(node, 3), optional_input(node, 4)):
        shape = ctx.shape(past) if past else None
        if shape is not None and len(shape) == 4 and isinstance(shape[2], int) and shape[2] > 0:
            raise _refuse(node, f"a past of length {shape[2]} in {past!r} (training runs at prefill, past length 0)")


def _heads(ctx: GradContext, node: onnx.NodeProto, q_heads: int, kv_heads: int) -> tuple[str, str, str, int]:
    """query, key, value as [B, S, heads, D] (split from packed QKV when key is absent), and D."""
    q, k, v = (optional_input(node, i) for i in range(3))
    per = q_heads if k else q_heads + 2 * kv_heads
    d = _static_last(ctx, q, per) or _static_last(ctx, optional_input(node, 3))
    if d is None:
        raise _refuse(node, f"a query {q!r} whose head size is unknown (fix the input shapes)")
    if k:
        return (ctx.reshape(q, [0, 0, q_heads, d]), ctx.reshape(k, [0, 0, kv_heads, d]),
                ctx.reshape(v, [0, 0, kv_heads, d]), d)
    packed = ctx.reshape(q, [0, 0, per, d])
    q4, k4, v4 = ctx.emit_multi("Split", [packed, ctx.ints([q_heads, kv_heads, kv_heads])], 3, axis=2)
    return q4, k4, v4, d


def _causal_keep(ctx: GradContext, scores: str, seqlens_k: str) -> str:
    """bool [B, 1, 1, S, T]: key j is seen by query i when j ≤ i and j ≤ seqlens_k[b] (the last valid key)."""
    zero, one = ctx.int_scalar(0), ctx.int_scalar(1)
    rows = ctx.emit("Range", [zero, ctx.emit("Squeeze", [_dim(ctx, scores, -2), ctx.ints([0])]), one])
    cols = ctx.emit("Range", [zero, ctx.emit("Squeeze", [_dim(ctx, scores, -1), ctx.ints([0])]), one])
    causal = ctx.emit("LessOrEqual", [ctx.unsqueeze(cols, [0]), ctx.unsqueeze(rows, [1])])  # [S, T]
    last = ctx.emit("Cast", [seqlens_k], to=TensorProto.INT64)
    valid = ctx.emit("LessOrEqual", [ctx.unsqueeze(cols, [0]), ctx.unsqueeze(last, [1])])  # [B, T]
    return ctx.emit("And", [causal, ctx.reshape(valid, [0, 1, 1, 1, -1])])


def _group_query_attention(ctx: GradContext, node: onnx.NodeProto) -> None:
    """GroupQueryAttention at prefill: causal softmax attention, each KV head shared by its query heads.

    Query heads are grouped as [B, KV, G, S, D] (head h reads KV head h // G) and keys broadcast as
    [B, KV, 1, S, D], so no KV repeat is materialised. present_* = past (length 0) ++ keys/values after rotary.
    """
    _check_gqa(ctx, node)
    q_heads = attr_int(node, "num_heads", 0)
    kv_heads = attr_int(node, "kv_num_heads", 0)
    if q_heads <= 0 or kv_heads <= 0 or q_heads % kv_heads:
        raise _refuse(node, f"num_heads={q_heads} is not a positive multiple of kv_num_heads={kv_heads}")
    groups = q_heads // kv_heads
    dtype = _dtype(ctx, optional_input(node, 7), optional_input(node, 0))
    q4, k4, v4, d = _heads(ctx, node, q_heads, kv_heads)
    if attr_int(node, "do_rotary", 0):
        half = _half(ctx, node, optional_input(node, 7))
        seq = _dim(ctx, q4, 1)
        rows = [ctx.unsqueeze(ctx.emit("Slice", [c, ctx.ints([0]), seq, ctx.ints([0])]), [1])  # [S, 1, half]
                for c in (optional_input(node, 7), optional_input(node, 8))]
        interleaved = bool(attr_int(node, "rotary_interleaved", 0))
        q4, k4 = (_rotate(ctx, t, rows[0], rows[1], half, d, interleaved) for t in (q4, k4))
    k_t, v_t = ctx.transpose(k4, [0, 2, 1, 3]), ctx.transpose(v4, [0, 2, 1, 3])  # [B, KV, S, D]
    q_g = ctx.transpose(ctx.reshape(q4, [0, 0, kv_heads, groups, -1]), [0, 2, 3, 1, 4])  # [B, KV, G, S, D]
    scale = attr_float(node, "scale", 0.0)
    factor = _scalar(ctx, scale or 1 / np.sqrt(d), dtype)
    keys = ctx.transpose(ctx.unsqueeze(k_t, [2]), [0, 1, 2, 4, 3])  # [B, KV, 1, D, T]
    scores = ctx.emit("Mul", [ctx.emit("MatMul", [q_g, keys]), factor])
    keep = _causal_keep(ctx, scores, optional_input(node, 5))
    probs = ctx.emit("Softmax", [ctx.emit("Where", [keep, scores, _scalar(ctx, MASKED, dtype)])], axis=-1)
    out = ctx.emit("MatMul", [probs, ctx.unsqueeze(v_t, [2])])  # [B, KV, G, S, D]
    _write(ctx, ctx.reshape(ctx.transpose(out, [0, 3, 1, 2, 4]), [0, 0, -1]), node.output[0])
    for past, new, i in ((optional_input(node, 3), k_t, 1), (optional_input(node, 4), v_t, 2)):
        present = ctx.emit("Concat", [past, new], axis=2) if past else new
        _write(ctx, present, _output(node, i))


def default_expansions() -> ExpansionRegistry:
    """A fresh registry with the expansions of the onnxruntime-genai builder's contrib ops."""
    reg = ExpansionRegistry()
    reg.register("SimplifiedLayerNormalization", Expansion(_simplified_layer_norm))
    reg.register("SkipSimplifiedLayerNormalization", Expansion(_skip_simplified_layer_norm), domain=MS)
    reg.register("RotaryEmbedding", Expansion(_rotary_embedding, needs_shapes=True), domain=MS)
    reg.register("GroupQueryAttention", Expansion(_group_query_attention, needs_shapes=True), domain=MS)
    return reg


#: Outputs each expansion writes (by position); a graph reading another one is refused.
PRODUCED: dict[str, tuple[int, ...]] = {
    "SimplifiedLayerNormalization": (0, 1), "SkipSimplifiedLayerNormalization": (0, 2, 3),
    "RotaryEmbedding": (0,), "GroupQueryAttention": (0, 1, 2),
}


# ------------------------------------------------------------------------------------------ driver
def expandable_nodes(model: onnx.ModelProto, registry: ExpansionRegistry | None = None) -> list[onnx.NodeProto]:
    """The nodes :func:`expand_contrib` would rewrite."""
    reg = registry if registry is not None else default_expansions()
    return [n for n in model.graph.node if reg.get(n.op_type, n.domain) is not None]


#: Initializers up to this many elements keep their values in the copy shape inference reads (shape targets).
_SMALL = 64


def _shapes(model: onnx.ModelProto, nodes: list[onnx.NodeProto], extra: list[onnx.TensorProto]) -> dict[str, TensorInfo]:
    """Shape inference on ``model`` with ``nodes`` as its graph, weights declared but not copied (cheap for big models)."""
    g = model.graph
    small = [t for t in list(g.initializer) + extra if int(np.prod(t.dims)) <= _SMALL]
    big = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in g.initializer
           if int(np.prod(t.dims)) > _SMALL]
    light = helper.make_model(helper.make_graph(nodes, "shapes", list(g.input) + big, list(g.output), small),
                              opset_imports=list(model.opset_import))
    light.ir_version = model.ir_version
    return collect_tensor_info(light)


def _expand_all(model: onnx.ModelProto, reg: ExpansionRegistry) -> None:
    """Rewrite in place, in graph order; expansions that read shapes see every earlier node already expanded."""
    graph = model.graph
    info = _shapes(model, list(graph.node), [])
    taken = {o for n in graph.node for o in n.output} | {i.name for i in graph.input} | {t.name for t in graph.initializer}
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    done: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    todo = list(graph.node)
    fresh = True  # ``info`` holds the inferred shapes of the graph as it is now
    for k, node in enumerate(todo):
        exp = reg.get(node.op_type, node.domain)
        if exp is None:
            done.append(node)
            continue
        _refuse_outputs(node, used, PRODUCED[node.op_type])
        if exp.needs_shapes and not fresh:
            info = _shapes(model, done + todo[k:], inits)
            fresh = True
        ctx = GradContext(info=info, constants={}, opset=default_opset(model), taken=taken,
                          scope=f"expand/{node.name or node.op_type}")
        exp.expand(ctx, node)
        done.extend(ctx.nodes)
        inits.extend(ctx.initializers)
        fresh = False
    del graph.node[:]
    graph.node.extend(done)
    graph.initializer.extend(inits)


def expand_contrib(model: onnx.ModelProto, registry: ExpansionRegistry | None = None) -> onnx.ModelProto:
    """Copy of ``model`` with every contrib node that has an expansion rewritten into standard ops.

    Returns ``model`` itself when it has none. Initializer names are kept, so weights trained on the
    result apply to ``model`` unchanged (:func:`~onnxprune.training.artifacts.apply_checkpoint`).

    Raises:
        BadInputError: a node uses a feature its expansion does not compute (the message names it), or the
            model's opset is below :data:`MIN_EXPAND_OPSET`.

    Example:
        >>> train_base = expand_contrib(onnx.load("genai/model.onnx"))  # doctest: +SKIP
    """
    reg = registry if registry is not None else default_expansions()
    if not expandable_nodes(model, reg):
        return model
    if default_opset(model) < MIN_EXPAND_OPSET:
        raise BadInputError(f"the model imports opset {default_opset(model)}; fine-tuning its contrib ops needs "
                            f"opset {MIN_EXPAND_OPSET} or later", field="model")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _expand_all(out, reg)
    return out


__all__ = ["Expansion", "ExpansionRegistry", "default_expansions", "expand_contrib", "expandable_nodes"]
