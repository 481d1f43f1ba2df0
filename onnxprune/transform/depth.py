"""Depth pruning: find residual blocks ``y = x + f(x)``, rank them, and remove the least important.

A residual block is an ``Add`` (or two-input ``Sum``) of a tensor ``x`` and a branch ``f(x)`` computed
from it, with ``x``, ``f(x)`` and ``y`` of one shape, a branch whose nodes feed nothing but the
branch and the ``Add``, and at least one weighted layer (Conv, Gemm, MatMul, Einsum with a constant
weight) in the branch: an Add of weightless arithmetic (the tanh-GELU's ``x + 0.044715·x³``) is part
of a layer, not a layer. Removing it means ``y = x``: every reader of ``y`` reads ``x`` and the branch
goes away (ResNet basic/bottleneck blocks, MobileNetV2 inverted residuals, ConvNeXt blocks, and a
transformer's attention and MLP sub-blocks, each on its own).

Decoder LMs: the unit is the residual block, so one decoder layer is two blocks (attention, MLP) and
``--depth 2`` may take both of one layer (ShortGPT's layer removal) or one of each of two layers
(finer, and what the importance prefers). A block may own a KV cache: graph inputs only its branch
reads (``past_key_values.{i}.*``) and the graph outputs it writes from them (``present.{i}.*``); they go
with it, and the cache IO left is renumbered ``0..L-1`` in layer order (onnxruntime-genai and optimum
count layers that way); :attr:`DepthResult.cache_io` lists every change. onnxruntime-genai's builder
fuses the residual Add into ``SkipSimplifiedLayerNormalization`` (``SkipLayerNormalization``): its
``input + skip`` with the sum as output 3 is the join, and the branch reads the stream through the
previous join's normalised output 0. Removing such a block turns the join into the plain norm of its
input (``SimplifiedLayerNormalization``, ``LayerNormalization``) and its sum into the input.

Importance (lower is removed first):

* ``ratio`` (default): ‖f(x)‖ / ‖x‖ over calibration inputs (random inputs when none are given): a
  branch that adds little to its stream changes little when it goes;
* ``fidelity``: 1 − cosine similarity between the model's outputs with and without the block.

Finding and removal work on a graphsurgeon graph; measuring runs onnxruntime through
:mod:`onnxprune.runtime`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.errors import BadInputError, PlanError
from onnxprune.io.export import export_graph

log = logging.getLogger(__name__)

METHODS = ("ratio", "fidelity")
RESIDUAL_OPS = ("Add", "Sum")
SKIP_NORMS = {"SkipSimplifiedLayerNormalization": ("SimplifiedLayerNormalization", 3),
              "SkipLayerNormalization": ("LayerNormalization", 4)}
"""A fused residual join → (the plain norm that remains without the branch, how many inputs it may have
without a bias: input, skip, gamma [, beta])."""
SUM_OUTPUT = 3
"""The skip norms' output that is ``input + skip``: the residual stream."""
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum")


@dataclass
class ResidualBlock:
    """One removable block: ``output = skip + branch`` where ``branch`` is computed by ``nodes`` from ``skip``."""

    add: str
    skip: str
    branch: str
    output: str
    nodes: list[str]
    kind: str
    params: int
    importance: float | None = None
    cache: list[str] = field(default_factory=list)
    """Graph inputs only the branch reads and the graph outputs it writes (a KV cache): removed with it."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "add": self.add, "skip": self.skip, "branch": self.branch, "kind": self.kind,
            "nodes": len(self.nodes), "params": self.params, "importance": self.importance, "cache": self.cache,
        }


@dataclass
class DepthResult:
    """What :func:`prune_depth` did: the model without the removed blocks and every candidate's score."""

    model: onnx.ModelProto
    removed: list[ResidualBlock]
    candidates: list[ResidualBlock]
    method: str
    notes: list[str] = field(default_factory=list)
    cache_io: dict[str, str | None] = field(default_factory=dict)
    """Cache graph IO that changed: original name → its new name (renumbered), or None (removed)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "removed": [b.to_dict() for b in self.removed],
            "candidates": [b.to_dict() for b in self.candidates],
            "cache_io": self.cache_io,
        }


# --- finding blocks ------------------------------------------------------------------------------


def _producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if t.inputs else None


def _ancestors(t: gs.Tensor) -> set[int]:
    """ids of the nodes ``t`` depends on."""
    seen: set[int] = set()
    stack = [t]
    while stack:
        node = _producer(stack.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        stack.extend(node.inputs)
    return seen


def _descendants(t: gs.Tensor) -> set[int]:
    """ids of the nodes that read ``t``, directly or not."""
    seen: set[int] = set()
    stack = list(t.outputs)
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for out in node.outputs:
            stack.extend(out.outputs)
    return seen


def _same_shape(shapes: Mapping[str, list[int | str]], *names: str) -> bool:
    """Whether the tensors have one shape. Shape inference names the same runtime dim differently in places
    (``unk__33`` and ``unk__35`` for the sequence) and a run fills some dims with stand-ins, so a symbolic dim
    matches any dim but a concrete 1 off the batch axis (which could broadcast)."""
    dims = [d for d in (shapes.get(n) for n in names) if d is not None and "?" not in d]
    if len(dims) != len(names) or len({len(d) for d in dims}) != 1:
        return False
    return all(_dims_match(axis, a, b) for d in dims[1:] for axis, (a, b) in enumerate(zip(dims[0], d)))


def _dims_match(axis: int, a: int | str, b: int | str) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    known = a if isinstance(a, int) else b
    return not isinstance(known, int) or known != 1 or axis == 0


def _kind(nodes: list[gs.Node]) -> str:
    ops = {n.op for n in nodes}
    if ops & {"Softmax", "GroupQueryAttention", "MultiHeadAttention", "Attention"}:
        return "attention"
    if ops & {"Conv", "ConvTranspose"}:
        return "conv"
    if ops & {"MatMul", "Gemm", "Einsum"}:
        return "mlp"
    return "other"


def _params(nodes: list[gs.Node]) -> int:
    seen: set[str] = set()
    total = 0
    for n in nodes:
        for t in n.inputs:
            if isinstance(t, gs.Constant) and t.name not in seen and np.issubdtype(np.asarray(t.values).dtype, np.floating):
                seen.add(t.name)
                total += int(np.asarray(t.values).size)
    return total


def _is_constant(t: gs.Tensor) -> bool:
    """An initializer, or the output of a ``Constant`` node (models that were not normalised)."""
    src = _producer(t)
    return isinstance(t, gs.Constant) or (src is not None and src.op == "Constant")


def _has_weighted_layer(nodes: list[gs.Node]) -> bool:
    """Whether a branch holds a layer with a constant weight: only such a branch is a depth block."""
    return any(n.op in WEIGHTED_OPS and any(_is_constant(t) for t in n.inputs) for n in nodes)


def _join(node: gs.Node) -> tuple[gs.Tensor, gs.Tensor, gs.Tensor] | None:
    """(a, b, the stream after the join) when ``node`` may join a residual block: an Add/Sum of two, or a skip
    norm without a bias whose statistics outputs are unused (its sum output 3, else output 0 for a final norm)."""
    if node.op in RESIDUAL_OPS:
        if len(node.inputs) != 2 or len(node.outputs) != 1:
            return None
        return node.inputs[0], node.inputs[1], node.outputs[0]
    if node.op not in SKIP_NORMS or len(node.inputs) > SKIP_NORMS[node.op][1] or len(node.inputs) < 3:
        return None
    if any(out.name and k not in (0, SUM_OUTPUT) for k, out in enumerate(node.outputs)):
        return None
    total = node.outputs[SUM_OUTPUT] if len(node.outputs) > SUM_OUTPUT and node.outputs[SUM_OUTPUT].name else None
    return node.inputs[0], node.inputs[1], total or node.outputs[0]


def _stream_views(skip: gs.Tensor) -> list[gs.Tensor]:
    """The tensors a branch may read its stream ``skip`` through: itself, and a skip norm's normalised output
    when ``skip`` is that norm's sum (onnxruntime-genai's builder)."""
    src = _producer(skip)
    if src is None or src.op not in SKIP_NORMS:
        return [skip]
    return [skip, *(t for t in src.outputs if t.name and t is not skip)]


def _block_at(node: gs.Node, shapes: Mapping[str, list[int | str]], graph_io: set[int]) -> ResidualBlock | None:
    """The residual block ending at ``node`` (a join of x and f(x)), or None."""
    joined = _join(node)
    if joined is None:
        return None
    a, b, y = joined
    if not all(isinstance(t, gs.Variable) and t.name for t in (a, b)) or a is b:
        return None
    if not _same_shape(shapes, a.name, b.name, y.name):
        return None
    for skip, branch in ((a, b), (b, a)):
        up = _ancestors(branch)
        views = _stream_views(skip)
        if any(_reads(up, t) for t in views):
            region_ids = up & set().union(*(_descendants(t) for t in views))
            if not region_ids:
                continue
            nodes = [n for n in _nodes_by_id(branch, region_ids)]
            cache = _branch_cache(nodes, region_ids, node, graph_io)
            if cache is None or not _has_weighted_layer(nodes):
                return None
            return ResidualBlock(node.name, skip.name, branch.name, y.name, [n.name for n in nodes], _kind(nodes),
                                 _params(nodes), cache=cache)
    return None


def _reads(up: set[int], skip: gs.Tensor) -> bool:
    """Whether a node the branch depends on reads ``skip``."""
    return any(id(consumer) in up for consumer in skip.outputs)


def _nodes_by_id(branch: gs.Tensor, ids: set[int]) -> list[gs.Node]:
    out: dict[int, gs.Node] = {}
    stack = [branch]
    while stack:
        node = _producer(stack.pop())
        if node is None or id(node) in out or id(node) not in ids:
            continue
        out[id(node)] = node
        stack.extend(node.inputs)
    return list(out.values())


def _branch_cache(nodes: list[gs.Node], ids: set[int], join: gs.Node, graph_io: set[int]) -> list[str] | None:
    """The graph IO the branch owns (a KV cache: inputs only it reads, outputs written from them), or None when
    the branch is not self-contained: a value it makes is read outside it (other than by the join) or is
    another graph output. A cache input may also be read by ``Shape`` outside (dynamo reads lengths there)."""
    past = {id(t): t.name for n in nodes for t in n.inputs if id(t) in graph_io and not t.inputs
            and isinstance(t, gs.Variable) and all(id(c) in ids or c.op == "Shape" for c in t.outputs)}
    present: list[str] = []
    for n in nodes:
        for out in n.outputs:
            if any(id(c) not in ids and c is not join for c in out.outputs):
                return None
            if id(out) in graph_io:
                if not any(id(t) in past for t in n.inputs):
                    return None
                present.append(out.name)
    return [*sorted(past.values() if present else []), *sorted(set(present))]


def find_residual_blocks(graph: gs.Graph, shapes: Mapping[str, list[int | str]]) -> list[ResidualBlock]:
    """Every removable residual block of ``graph``, in graph order.

    Args:
        graph: the model as imported by graphsurgeon.
        shapes: tensor name → shape (``model.static_shapes``); blocks whose shapes are unknown are skipped.

    Example:
        >>> blocks = find_residual_blocks(gs.import_onnx(model), static_shapes(model, None))
        >>> [b.add for b in blocks]
        ['block1.add', 'block2.add']
    """
    from onnxprune.analysis.shape_values import complete_shapes

    shapes = complete_shapes(graph, dict(shapes))
    graph.toposort()
    graph_io = {id(t) for t in (*graph.inputs, *graph.outputs)}
    blocks = []
    for node in graph.nodes:
        block = _block_at(node, shapes, graph_io)
        if block is not None:
            blocks.append(block)
    return blocks


# --- importance ----------------------------------------------------------------------------------


def ratio_importance(
    model: onnx.ModelProto, blocks: list[ResidualBlock], batches: Iterable[Mapping[str, np.ndarray]], device: str = "cpu"
) -> dict[str, float]:
    """‖f(x)‖ / ‖x‖ per block (keyed by its Add), accumulated over ``batches``."""
    from onnxprune.runtime.capture import iter_capture

    names = sorted({b.skip for b in blocks} | {b.branch for b in blocks})
    sq = dict.fromkeys(names, 0.0)
    for values in iter_capture(model, names, batches, device=device):
        for name in names:
            sq[name] += float(np.sum(np.square(values[name].astype(np.float64))))
    return {b.add: float(np.sqrt(sq[b.branch]) / max(np.sqrt(sq[b.skip]), 1e-12)) for b in blocks}


def fidelity_importance(
    model: onnx.ModelProto, blocks: list[ResidualBlock], feeds: Mapping[str, np.ndarray], device: str = "cpu"
) -> dict[str, float]:
    """1 − cosine similarity of all outputs (flattened together) with each block removed alone; a block's own
    cache outputs go with it, so the outputs that remain are compared."""
    from onnxprune.runtime.session import make_session

    with make_session(model, device) as sess:
        reference = sess.run(feeds)
    scores: dict[str, float] = {}
    for block in blocks:
        graph = gs.import_onnx(model)
        remove_blocks(graph, [block])
        with make_session(export_graph(graph, model, check=False), device) as sess:
            out = sess.run({k: v for k, v in feeds.items() if k not in block.cache})
        ref = np.concatenate([np.ravel(reference[k]).astype(np.float64) for k in sorted(out)])
        cand = np.concatenate([np.ravel(out[k]).astype(np.float64) for k in sorted(out)])
        denom = float(np.linalg.norm(ref) * np.linalg.norm(cand))
        scores[block.add] = 1.0 - (float(ref @ cand) / denom if denom > 0 else 0.0)
    return scores


# --- removal -------------------------------------------------------------------------------------


def remove_blocks(graph: gs.Graph, blocks: list[ResidualBlock]) -> None:
    """Bypass each block in place: readers of its output read its skip input (a skip norm becomes the plain norm
    of it); the branch is cleaned up and the graph IO it owned (its KV cache) dropped.

    Raises:
        PlanError: a block's join or skip tensor is not in ``graph`` (e.g. already removed with another block).
    """
    tensors = graph.tensors()
    nodes = {n.name: n for n in graph.nodes}
    bypassed: dict[str, gs.Tensor] = {}  # a removed block's output → the tensor now read instead
    for block in blocks:
        join = nodes.get(block.add)
        skip = bypassed.get(block.skip, tensors.get(block.skip))
        if join is None or skip is None or not join.outputs:
            raise PlanError(f"residual block {block.add} is no longer in the graph")
        y = tensors[block.output]
        if join.op in SKIP_NORMS:
            _to_plain_norm(join, skip)
        elif join.op in RESIDUAL_OPS:
            join.outputs.clear()
        if y.inputs and y.inputs[0] is join:
            continue  # a final skip norm: its normalised output now normalises the stream alone
        _read_instead(graph, y, skip)
        bypassed[block.output] = skip
    owned = {name for block in blocks for name in block.cache}
    _reread_shapes(graph, owned)
    graph.outputs = [t for t in graph.outputs if t.name not in owned]
    graph.cleanup().toposort()
    graph.inputs = [t for t in graph.inputs if t.name not in owned]


def _to_plain_norm(join: gs.Node, skip: gs.Tensor) -> None:
    """A skip norm without its branch: the plain norm of ``skip`` (its gamma [, beta] kept), output 0 only."""
    plain = SKIP_NORMS[join.op][0]
    params, normed = list(join.inputs[2:]), join.outputs[0]
    join.inputs.clear()
    join.inputs.extend([skip, *params])
    join.outputs.clear()
    join.outputs.append(normed)
    join.op, join.domain = plain, ""
    join.attrs = {"axis": -1, "epsilon": float(join.attrs.get("epsilon", 1e-5))}


def _read_instead(graph: gs.Graph, y: gs.Tensor, skip: gs.Tensor) -> None:
    """Every reader of ``y`` reads ``skip``; a graph output ``y`` becomes an Identity of it."""
    if y is skip:
        return
    for consumer in list(y.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is y:
                consumer.inputs[i] = skip
    if any(t is y for t in graph.outputs):
        y.inputs.clear()
        graph.nodes.append(gs.Node("Identity", f"{y.name}_bypass", inputs=[skip], outputs=[y]))


_NUMBERED = re.compile(r"^(\D*?)(\d+)(\D*)$")


def _family(name: str) -> tuple[str, str] | None:
    """``past_key_values.3.key`` → (``past_key_values.``, ``.key``): the layers' copies of one cache tensor."""
    m = _NUMBERED.match(name)
    return m.group(1, 3) if m else None


def _fixed_dims(t: gs.Tensor) -> list[int | None]:
    return [d if isinstance(d, int) else None for d in t.shape or []]


def _reread_shapes(graph: gs.Graph, owned: set[str]) -> None:
    """``Shape`` reads of a removed cache input (dynamo's exports take the past length from one layer's cache)
    read a kept layer's copy instead: every layer's cache has one length.

    Raises:
        PlanError: no input of the same family and fixed dims is kept.
    """
    kept = [t for t in graph.inputs if t.name not in owned]
    for t in graph.inputs:
        readers = [n for n in t.outputs if n.op == "Shape"] if t.name in owned else []
        if not readers:
            continue
        family = _family(t.name)
        twin = next((k for k in kept if family is not None and _family(k.name) == family
                     and _fixed_dims(k) == _fixed_dims(t)), None)
        if twin is None:
            raise PlanError(f"cache input {t.name} is read by {readers[0].name} (Shape) outside its block and no "
                            "other layer's cache of its shape is kept")
        for node in readers:
            node.inputs[0] = twin


def renumber_cache(graph: gs.Graph, removed: Iterable[str]) -> dict[str, str]:
    """Rename the cache IO left after ``removed`` went so that each family (``past_key_values.%d.key``, …)
    counts 0..L-1 again, in the old order: generators (onnxruntime-genai, optimum) loop over layers by
    number. Returns old name → new name for the tensors renamed."""
    families = {f for f in map(_family, removed) if f is not None}
    renamed: dict[str, str] = {}
    for io in (graph.inputs, graph.outputs):
        for pre, post in families:
            members = sorted(((int(m.group(2)), t) for t in io
                              if (m := _NUMBERED.match(t.name)) and m.group(1, 3) == (pre, post)), key=lambda e: e[0])
            for rank, (_, t) in enumerate(members):
                new = f"{pre}{rank}{post}"
                if t.name != new:
                    renamed[t.name] = new
                    t.name = new
    return renamed


def select(blocks: list[ResidualBlock], scores: Mapping[str, float], k: int) -> list[ResidualBlock]:
    """The ``k`` lowest-scoring blocks whose branches do not overlap (a block inside a removed one goes with it).

    Raises:
        PlanError: fewer than ``k`` disjoint blocks exist.
    """
    chosen: list[ResidualBlock] = []
    taken: set[str] = set()
    for block in sorted(blocks, key=lambda b: (scores[b.add], b.add)):
        own = set(block.nodes) | {block.add}
        if own & taken:
            continue
        chosen.append(block)
        taken |= own
        if len(chosen) == k:
            return chosen
    raise PlanError(f"--depth {k}: the model has only {len(chosen)} removable residual blocks"
                    + ("" if blocks else " (none found: y = x + f(x) with equal shapes)"))


def prune_depth(
    model: onnx.ModelProto,
    k: int,
    shapes: Mapping[str, list[int | str]],
    *,
    calib: str | None = None,
    samples: int = 16,
    input_shapes: dict[str, list[int]] | None = None,
    method: str = "ratio",
    device: str = "cpu",
    seed: int = 0,
) -> DepthResult:
    """Remove the ``k`` least important residual blocks of ``model`` (which is not changed).

    Args:
        model: the loaded, normalised model.
        k: how many blocks to remove.
        shapes: tensor shapes (``model.static_shapes``).
        calib: ``.npz`` file, directory, or None/``random`` for random inputs.
        samples: how many calibration samples to use.
        input_shapes: ``--shape`` values for symbolic inputs.
        method: ``ratio`` (‖f(x)‖/‖x‖) or ``fidelity`` (output change when removed alone).
        device: ``auto|cuda|cpu``.
        seed: for random inputs.

    Raises:
        BadInputError: unknown method or unreadable calibration data.
        PlanError: fewer than ``k`` removable blocks.

    Example:
        >>> result = prune_depth(model, 2, static_shapes(model, None))
        >>> [b.add for b in result.removed]
    """
    from onnxprune import data

    if method not in METHODS:
        raise BadInputError(f"unknown depth importance {method!r}; choose one of {', '.join(METHODS)}", field="depth")
    graph = gs.import_onnx(model)
    blocks = find_residual_blocks(graph, shapes)
    if k > len(blocks):
        select(blocks, {b.add: 0.0 for b in blocks}, k)  # raises with the count
    inputs = data.model_inputs(model)
    source = data.open_data(calib or "random", inputs, limit=samples, shapes=input_shapes, seed=seed)
    fixed_batch = any(s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0 for s in inputs)
    batch = 1 if fixed_batch and source.is_random else min(samples, 8)
    if method == "ratio":
        scores = ratio_importance(model, blocks, source.batches(batch), device)
    else:
        scores = fidelity_importance(model, blocks, next(iter(source.batches(batch))), device)
    for b in blocks:
        b.importance = scores[b.add]
    chosen = select(blocks, scores, k)
    remove_blocks(graph, chosen)
    removed_io = [name for b in chosen for name in b.cache]
    cache_io: dict[str, str | None] = {**dict.fromkeys(removed_io), **renumber_cache(graph, removed_io)}
    log.info("removed residual blocks %s", ", ".join(b.add for b in chosen))
    return DepthResult(model=export_graph(graph, model, check=False), removed=chosen, candidates=blocks, method=method,
                       notes=_cache_notes(cache_io), cache_io=cache_io)


def _cache_notes(cache_io: Mapping[str, str | None]) -> list[str]:
    """The report's lines on the cache IO that went with the removed blocks and the IO renumbered."""
    gone = [old for old, new in cache_io.items() if new is None]
    moved = sorted(f"{old} -> {new}" for old, new in cache_io.items() if new is not None)
    return ([f"cache IO removed with its blocks: {', '.join(gone)}"] if gone else []) + \
           ([f"cache IO renumbered: {', '.join(moved)}"] if moved else [])


def original_io(pruned: onnx.ModelProto, original: onnx.ModelProto, cache_io: Mapping[str, str | None]
                ) -> onnx.ModelProto:
    """A copy of a depth-pruned model that reads feeds made for the original: renumbered IO takes its old
    names back and removed cache inputs are declared again (read by nothing); removed outputs stay gone.

    For measuring and fine-tuning on the original's data only (:func:`depth_io` undoes it): a generator
    feeds the pruned model its own cache.
    """
    if not cache_io:
        return pruned
    out = _renamed_io(pruned, {new: old for old, new in cache_io.items() if new is not None}, set())
    out.graph.input.extend(vi for vi in original.graph.input if vi.name in cache_io and cache_io[vi.name] is None)
    return out


def without_removed_outputs(original: onnx.ModelProto, cache_io: Mapping[str, str | None]) -> onnx.ModelProto:
    """The original without the cache outputs ``--depth`` removed: a teacher whose outputs pair with
    :func:`original_io`'s."""
    gone = {old for old, new in cache_io.items() if new is None}
    if not gone & {o.name for o in original.graph.output}:
        return original
    out = onnx.ModelProto()
    out.CopyFrom(original)
    kept = [o for o in out.graph.output if o.name not in gone]
    del out.graph.output[:]
    out.graph.output.extend(kept)
    return out


def depth_io(model: onnx.ModelProto, cache_io: Mapping[str, str | None]) -> onnx.ModelProto:
    """The inverse of :func:`original_io`: the IO names ``--depth`` left, the removed cache inputs dropped."""
    if not cache_io:
        return model
    return _renamed_io(model, {old: new for old, new in cache_io.items() if new is not None},
                       {old for old, new in cache_io.items() if new is None})


def _renamed_io(model: onnx.ModelProto, names: Mapping[str, str], drop: set[str]) -> onnx.ModelProto:
    graph = gs.import_onnx(model)
    for t in (*graph.inputs, *graph.outputs):
        t.name = names.get(t.name, t.name)
    graph.inputs = [t for t in graph.inputs if t.name not in drop]
    return export_graph(graph, model, check=False)
