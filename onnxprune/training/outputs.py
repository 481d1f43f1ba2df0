"""What each graph output means, so losses read logits over the right axis (DESIGN.md, "Output semantics").

A model's last ops say what its outputs are: a trailing Softmax gives probabilities over one axis, LogSoftmax
log-probabilities, Sigmoid independent Bernoulli probabilities; anything else is taken as raw scores. A loss
must read the tensor *before* that activation (cross-entropy on probabilities squashes the gradients) and
reduce over the axis the activation normalises (the class axis), which for ``[N, T, C]`` sequence outputs is
not axis 1. This module finds both, looking back from each output through ops that only move data (Identity,
Cast, Transpose, Reshape, Flatten, Squeeze, Unsqueeze), and rebuilds the logits in the output's own layout
(:func:`add_logits_views`) so labels and teacher values keep the output's shape. Pure onnx/numpy.

Example:
    >>> sem = output_semantics(model)["probs"]  # doctest: +SKIP
    >>> sem.kind, sem.logits, sem.class_axis  # doctest: +SKIP
    (<OutputKind.PROBS: 'probs'>, 'logits', 2)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

import numpy as np
import onnx
from onnx import helper

from onnxprune.errors import BadInputError
from onnxprune.io.limits import default_opset
from onnxprune.training.grad.context import FLOAT_TYPES, Dim, TensorInfo, collect_tensor_info
from onnxprune.training.grad.rules._common import attr_int, attr_ints

#: Ops between an activation and the output that move data without changing values.
SHAPE_OPS = frozenset({"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze"})
VALUE_PRESERVING = frozenset({"Identity", "Cast"})
VIEW_PREFIX = "logits_view/"


class OutputKind(StrEnum):
    """What the values of one graph output are."""

    PROBS = "probs"  # Softmax over the class axis
    LOG_PROBS = "log_probs"  # LogSoftmax over the class axis
    SIGMOID = "sigmoid"  # independent Bernoulli probabilities per element
    LOGITS = "logits"  # no trailing activation found: raw scores (or regression values)

    @property
    def categorical(self) -> bool:
        """True for a distribution over the class axis (Softmax/LogSoftmax)."""
        return self in (OutputKind.PROBS, OutputKind.LOG_PROBS)


@dataclass(frozen=True)
class OutputSemantics:
    """One graph output: its kind, the pre-activation tensor, and the class axis.

    Attributes:
        output: the graph output's name.
        kind: what its values are.
        logits: the tensor the activation reads (the output itself for ``LOGITS``).
        class_axis: the class axis in the output's axes (normalised when the rank is known; None when the
            activation's axis could not be followed through the ops after it). For ``SIGMOID`` and ``LOGITS``
            it is :func:`default_class_axis` of the rank unless a caller set it.
        rank: the output's rank, None when shape inference could not tell.
        logits_axis: the class axis in ``logits``' own axes (differs from ``class_axis`` after a Transpose).
        class_span: how many consecutive axes from ``class_axis`` hold the classes: 1, except for a Softmax
            before opset 13 whose flatten semantics normalise over every axis from ``axis`` on.
        path: outputs of the data-moving nodes from the activation to the graph output, in order;
            :func:`add_logits_views` replays them on ``logits``.
        note: why ``class_axis`` is None, or that a caller set it.
    """

    output: str
    kind: OutputKind
    logits: str
    class_axis: int | None
    rank: int | None
    logits_axis: int | None = None
    class_span: int = 1
    path: tuple[str, ...] = ()
    note: str = ""

    def compatible(self, other: OutputSemantics) -> bool:
        """Same kind family, rank and class axes: one's logits can stand in for the other's."""
        same_family = self.kind == other.kind or (self.kind.categorical and other.kind.categorical)
        return (same_family and self.rank == other.rank and self.class_axis == other.class_axis
                and self.class_span == other.class_span)

    def to_json(self) -> dict[str, Any]:
        """Plain fields for a manifest."""
        return {"output": self.output, "kind": self.kind.value, "logits": self.logits, "class_axis": self.class_axis,
                "rank": self.rank, "logits_axis": self.logits_axis, "class_span": self.class_span,
                "path": list(self.path), "note": self.note}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> OutputSemantics:
        """Inverse of :meth:`to_json`."""
        return cls(data["output"], OutputKind(data["kind"]), data["logits"], data["class_axis"], data["rank"],
                   data.get("logits_axis"), int(data.get("class_span", 1)), tuple(data.get("path", ())),
                   data.get("note", ""))


def default_class_axis(rank: int | None) -> int | None:
    """Class axis assumed for outputs with no activation to say so (and for Sigmoid outputs).

    The choice, by rank: 2 → 1 (``[N, C]``); 3 → 2, the last axis (``[N, T, C]``: language models and CTC
    recognisers emit per-position scores; pass an override for channels-first ``[N, C, L]`` maps); 4 and
    more → 1 (``[N, C, H, W]`` dense maps, channels first as ONNX lays them out); 1 → 0; unknown → 1.
    """
    if rank is None:
        return 1
    if rank == 0:
        return None
    if rank == 1:
        return 0
    return 2 if rank == 3 else 1


def _normalise(axis: int, rank: int | None) -> int:
    if rank is None:
        return axis
    if not -rank <= axis < rank:
        raise BadInputError(f"class axis {axis} is out of range for rank {rank}", field="class_axis")
    return axis % rank


# ------------------------------------------------------------------------------------------------
# following a class span through data-moving ops


@dataclass(frozen=True)
class _Span:
    """Classes on axes ``[start, stop)`` of a tensor of rank ``rank``."""

    start: int
    stop: int
    rank: int


def _product(dims: Sequence[Dim]) -> tuple[int, tuple[str, ...]] | None:
    """Static product and sorted symbols of ``dims``; None when a dim is unknown."""
    static, symbols = 1, []
    for d in dims:
        if isinstance(d, int):
            static *= d
        elif isinstance(d, str) and d:
            symbols.append(d)
        else:
            return None
    return static, tuple(sorted(symbols))


def _through_reshape(span: _Span, src: list[Dim], dst: list[Dim]) -> _Span | None:
    """The narrowest axes of ``dst`` holding exactly the class dims and everything after them.

    The prefix is not compared: a reshape keeps the element count, so it follows from the rest
    (and it often holds the symbolic batch that shape inference renames).
    """
    classes, suffix = _product(src[span.start:span.stop]), _product(src[span.stop:])
    if classes is None or suffix is None:
        return None
    best: _Span | None = None
    for stop in range(len(dst), -1, -1):
        if _product(dst[stop:]) != suffix:
            continue
        for start in range(stop - 1, -1, -1):
            if _product(dst[start:stop]) == classes and (best is None or stop - start < best.stop - best.start):
                best = _Span(start, stop, len(dst))
    return best


def _through_transpose(span: _Span, node: onnx.NodeProto) -> _Span | None:
    perm = attr_ints(node, "perm", list(range(span.rank))[::-1])
    where = [perm.index(a) for a in range(span.start, span.stop)]
    if where != list(range(where[0], where[0] + len(where))):
        return None  # the class axes no longer sit together in order
    return _Span(where[0], where[-1] + 1, len(perm))


def _follow(span: _Span, node: onnx.NodeProto, info: Mapping[str, TensorInfo]) -> _Span | None:
    """The class span after ``node`` (one of SHAPE_OPS or VALUE_PRESERVING); None when it cannot tell."""
    if node.op_type in VALUE_PRESERVING:
        return span
    if node.op_type == "Transpose":
        return _through_transpose(span, node)
    src, dst = info.get(node.input[0]), info.get(node.output[0])
    if src is None or dst is None or src.shape is None or dst.shape is None:
        return None
    return _through_reshape(span, src.shape, dst.shape)


# ------------------------------------------------------------------------------------------------
# finding the activation


def _rank(info: Mapping[str, TensorInfo], name: str) -> int | None:
    ti = info.get(name)
    return None if ti is None or ti.shape is None else len(ti.shape)


def _activation_span(node: onnx.NodeProto, opset: int, info: Mapping[str, TensorInfo]) -> _Span | int:
    """Classes in the activation's input: a span when the rank is known, else the raw (negative) axis.

    Softmax/LogSoftmax from opset 13 normalise one axis (default -1); before 13 they flatten the input
    to 2-D at ``axis`` (default 1) and normalise over every axis from there, so the span runs to the end,
    less trailing dims known to be 1.
    """
    rank = _rank(info, node.input[0])
    axis = attr_int(node, "axis", -1 if opset >= 13 else 1)
    if rank is None:
        return axis
    axis = _normalise(axis, rank)
    if opset >= 13:
        return _Span(axis, axis + 1, rank)
    shape = info[node.input[0]].shape or []
    stop = rank
    while stop > axis + 1 and shape[stop - 1] == 1:
        stop -= 1
    return _Span(axis, stop, rank)


_ACTIVATIONS = {"Softmax": OutputKind.PROBS, "LogSoftmax": OutputKind.LOG_PROBS, "Sigmoid": OutputKind.SIGMOID}


def _is_float_cast(node: onnx.NodeProto) -> bool:
    return node.op_type != "Cast" or attr_int(node, "to", 0) in FLOAT_TYPES


def _walk_back(output: str, producers: Mapping[str, onnx.NodeProto]) -> tuple[onnx.NodeProto | None, list[onnx.NodeProto]]:
    """The trailing activation feeding ``output`` through data-moving ops, and those ops in forward order."""
    chain: list[onnx.NodeProto] = []
    cur = output
    while (node := producers.get(cur)) is not None and node.domain in ("", "ai.onnx"):
        if node.op_type in _ACTIVATIONS:
            return node, chain[::-1]
        if node.op_type not in SHAPE_OPS | VALUE_PRESERVING or not _is_float_cast(node):
            break
        chain.append(node)
        cur = node.input[0]
    return None, []


def _legacy_softmax(
    act: onnx.NodeProto, chain: list[onnx.NodeProto], producers: Mapping[str, onnx.NodeProto],
    info: Mapping[str, TensorInfo], out_rank: int | None,
) -> tuple[str, _Span | int, list[onnx.NodeProto]] | None:
    """A pre-13 Softmax as onnx's version converter rewrites it: ``Flatten(x, k) → Softmax(-1) → Reshape(Shape(x))``.

    The three nodes normalise ``x`` over axes ``[k, rank)``, so the logits are ``x`` itself and the class span
    is known from ``k`` even where shape inference loses the flattened tensor's shape (Paddle exports).
    Returns ``(logits, span or raw axis, the chain after the Reshape)``, or None for any other pattern.
    ``out_rank`` (the graph output's) stands in for x's rank when only value-preserving ops follow.
    """
    flat = producers.get(act.input[0])
    if flat is None or flat.op_type != "Flatten" or attr_int(act, "axis", -1) not in (-1, 1) or not chain:
        return None
    back = chain[0]
    shape_of = producers.get(back.input[1]) if back.op_type == "Reshape" and len(back.input) > 1 else None
    if shape_of is None or shape_of.op_type != "Shape" or shape_of.input[0] != flat.input[0]:
        return None
    x = flat.input[0]
    axis = attr_int(flat, "axis", 1)
    rank = _rank(info, x) or _rank(info, back.output[0])
    if rank is None and all(n.op_type in VALUE_PRESERVING for n in chain[1:]):
        rank = out_rank  # the Reshape restores x's shape, and nothing after it moves data
    if rank is None:
        return (x, axis, chain[1:]) if axis < 0 else None
    axis = _normalise(axis, rank)
    shape = (info[x].shape if x in info and info[x].shape is not None else None) or []
    stop = rank
    while shape and stop > axis + 1 and shape[stop - 1] == 1:
        stop -= 1
    return x, _Span(axis, stop, rank), chain[1:]


def _semantics_of(output: str, producers: Mapping[str, onnx.NodeProto], opset: int,
                  info: Mapping[str, TensorInfo]) -> OutputSemantics:
    rank = _rank(info, output)
    act, chain = _walk_back(output, producers)
    if act is None:
        return OutputSemantics(output, OutputKind.LOGITS, output, default_class_axis(rank), rank,
                               default_class_axis(rank))
    kind = _ACTIVATIONS[act.op_type]
    path = tuple(n.output[0] for n in chain)
    logits = act.input[0]
    if kind is OutputKind.SIGMOID:  # elementwise: no axis to follow, the rank rule applies to the output
        return OutputSemantics(output, kind, logits, default_class_axis(rank), rank,
                               default_class_axis(_rank(info, logits)), path=path)
    legacy = _legacy_softmax(act, chain, producers, info, rank) if opset >= 13 else None
    if legacy is not None:
        logits, start, chain = legacy
        path = tuple(n.output[0] for n in chain)
    else:
        start = _activation_span(act, opset, info)
    if isinstance(start, int):  # rank unknown: only value-preserving ops keep the raw axis meaningful
        if all(n.op_type in VALUE_PRESERVING for n in chain):
            return OutputSemantics(output, kind, logits, start, rank, start, path=path)
        return OutputSemantics(output, kind, logits, None, rank, start, path=path,
                               note=f"rank of {act.input[0]!r} unknown; cannot follow the class axis")
    span: _Span | None = start
    for node in chain:
        span = _follow(span, node, info) if span is not None else None
        if span is None:
            return OutputSemantics(output, kind, logits, None, rank, start.start, start.stop - start.start, path,
                                   note=f"class axis lost at {node.op_type} {node.name or node.output[0]!r}")
    assert span is not None
    if span.stop - span.start > 1 and span.stop != span.rank:
        return OutputSemantics(output, kind, logits, None, rank, start.start, start.stop - start.start, path,
                               note="classes span several axes that are not the trailing ones")
    return OutputSemantics(output, kind, logits, span.start, span.rank, start.start, span.stop - span.start, path)


def output_semantics(
    model: onnx.ModelProto,
    *,
    class_axes: Mapping[str, int] | None = None,
    info: Mapping[str, TensorInfo] | None = None,
) -> dict[str, OutputSemantics]:
    """Semantics of every graph output, in output order.

    Args:
        model: the model (any opset; Softmax's default axis follows the model's opset).
        class_axes: output name → class axis in the output's axes, overriding what the graph says
            (e.g. ``{"scores": 1}`` for a channels-first ``[N, C, L]`` output without activation).
        info: tensor shapes from :func:`~onnxprune.training.grad.context.collect_tensor_info`, when the caller
            already has them (saves a shape inference).

    Raises:
        BadInputError: an override names no output or an axis out of range.

    Example:
        >>> output_semantics(model)["probs"].class_axis  # doctest: +SKIP
        2
    """
    info = info if info is not None else collect_tensor_info(model)
    producers = {o: n for n in model.graph.node for o in n.output if o}
    opset = default_opset(model)
    names = [o.name for o in model.graph.output]
    unknown = sorted(set(class_axes or {}) - set(names))
    if unknown:
        raise BadInputError(f"class axis given for {unknown}, which are not outputs (outputs: {names})",
                            field="class_axis")
    result: dict[str, OutputSemantics] = {}
    for name in names:
        sem = _semantics_of(name, producers, opset, info)
        result[name] = with_class_axis(sem, class_axes[name]) if class_axes and name in class_axes else sem
    return result


def with_class_axis(sem: OutputSemantics, axis: int) -> OutputSemantics:
    """``sem`` with the class axis set by a caller (one axis)."""
    return replace(sem, class_axis=_normalise(axis, sem.rank), class_span=1, note="set by caller")


# ------------------------------------------------------------------------------------------------
# language models: token logits and cache outputs

#: Name prefix of the key/value cache outputs every LM exporter writes (``present.0.key``, ``present_key_values``).
CACHE_PREFIX = "present"


def cache_outputs(model: onnx.ModelProto) -> tuple[str, ...]:
    """Outputs that are generation state, not task outputs: a KV cache.

    Named ``present*`` (torch.onnx, optimum and onnxruntime-genai all do), or a Concat that appends to a graph
    input (the past). Losses and distillation leave them alone.
    """
    inputs = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output if o}
    found = []
    for out in model.graph.output:
        node = producers.get(out.name)
        appends = node is not None and node.op_type == "Concat" and any(i in inputs for i in node.input)
        if out.name.startswith(CACHE_PREFIX) or appends:
            found.append(out.name)
    return tuple(found)


def vocabularies(model: onnx.ModelProto) -> frozenset[int]:
    """Row counts of the token embeddings: initializer tables that a Gather indexes with an integer graph input.

    The ids may pass through data-moving ops first (GPT-2 views ``input_ids`` as ``[-1, T]``).
    """
    tables = {t.name: int(t.dims[0]) for t in model.graph.initializer if len(t.dims) == 2}
    int_inputs = {i.name for i in model.graph.input if i.type.tensor_type.elem_type in _INT_TYPES}
    producers = {o: n for n in model.graph.node for o in n.output if o}

    def from_ids(name: str) -> bool:
        while name not in int_inputs:
            node = producers.get(name)
            if node is None or node.op_type not in SHAPE_OPS | VALUE_PRESERVING:
                return False
            name = node.input[0]
        return True

    return frozenset(tables[n.input[0]] for n in model.graph.node
                     if n.op_type == "Gather" and len(n.input) == 2 and n.input[0] in tables and from_ids(n.input[1]))


def is_token_logits(sem: OutputSemantics, info: Mapping[str, TensorInfo], vocab: frozenset[int]) -> bool:
    """A raw ``[N, T, V]`` output whose V is a token vocabulary: an LM's next-token scores, categorical over V.

    Such outputs have no trailing Softmax, yet distillation must compare distributions over the last axis
    (KL per position), not regress the raw scores.
    """
    ti = info.get(sem.output)
    shape = ti.shape if ti is not None else None
    return (sem.kind is OutputKind.LOGITS and shape is not None and len(shape) == 3 and sem.class_axis == 2
            and isinstance(shape[2], int) and shape[2] in vocab)


_INT_TYPES = frozenset({onnx.TensorProto.INT64, onnx.TensorProto.INT32})


# ------------------------------------------------------------------------------------------------
# logits in the output's layout


def view_name(sem: OutputSemantics) -> str:
    """The tensor :func:`add_logits_views` gives for ``sem``: its logits laid out like the output."""
    return f"{VIEW_PREFIX}{sem.path[-1]}" if sem.path else sem.logits


def add_logits_views(graph: onnx.GraphProto, sems: Iterable[OutputSemantics]) -> dict[str, str]:
    """Append, for each output, its logits in the output's layout; return output → that tensor.

    The ops between the activation and the output are replayed on the logits (copies reading the logits
    instead of the activation), so ``view[..., c, ...]`` lines up with ``output[..., c, ...]`` and labels
    or teacher values shaped like the output fit. With no such ops the view is the logits tensor itself.
    Views already in the graph are reused, so calling this twice adds nothing.

    Raises:
        BadInputError: a path tensor of ``sems`` is not produced by ``graph`` (semantics of another model).
    """
    producers = {o: n for n in graph.node for o in n.output if o}
    views: dict[str, str] = {}
    for sem in sems:
        cur = sem.logits
        for tensor in sem.path:
            node = producers.get(tensor)
            if node is None:
                raise BadInputError(f"output {sem.output!r}: tensor {tensor!r} is not in this graph", field="model")
            new = f"{VIEW_PREFIX}{tensor}"
            if new not in producers:
                copy = onnx.NodeProto()
                copy.CopyFrom(node)
                copy.input[0] = cur
                del copy.output[:]
                copy.output.append(new)
                copy.name = new
                graph.node.append(copy)
                producers[new] = copy
            cur = new
        views[sem.output] = cur
    return views


def logits_model(model: onnx.ModelProto, sems: Iterable[OutputSemantics]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """Copy of ``model`` with each output's logits view (:func:`add_logits_views`) as an extra graph output.

    Lets an inference session return the values a loss reads (teacher logits, held-out evaluation)
    without running the loss graph.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    sems = list(sems)
    views = add_logits_views(out.graph, sems)
    present = {o.name for o in out.graph.output}
    extra = [v for v in dict.fromkeys(views.values()) if v not in present]
    info = collect_tensor_info(out) if extra else {}
    for view in extra:
        ti = info.get(view)
        out.graph.output.append(helper.make_tensor_value_info(view, ti.dtype if ti else onnx.TensorProto.FLOAT, None))
    return out, views


def as_logits(values: np.ndarray, sem: OutputSemantics) -> np.ndarray:
    """Output values turned into logits with the same activation result (when only outputs are at hand).

    Probabilities become log-probabilities (Softmax of them gives the probabilities back), Sigmoid
    probabilities their log-odds; clipping keeps saturated values finite, so prefer the real logits.
    """
    x = np.asarray(values, np.float64)
    tiny = np.finfo(np.float32).tiny
    if sem.kind is OutputKind.PROBS:
        return np.log(np.clip(x, tiny, None)).astype(values.dtype)
    if sem.kind is OutputKind.SIGMOID:
        p = np.clip(x, 1e-7, 1 - 1e-7)
        return (np.log(p) - np.log1p(-p)).astype(values.dtype)
    return np.asarray(values)
