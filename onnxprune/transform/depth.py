"""Depth pruning: find residual blocks ``y = x + f(x)``, rank them, and remove the least important.

A residual block is an ``Add`` (or two-input ``Sum``) of a tensor ``x`` and a branch ``f(x)`` computed
from it, with ``x``, ``f(x)`` and ``y`` of one shape, a branch whose nodes feed nothing but the
branch and the ``Add``, and at least one weighted layer (Conv, Gemm, MatMul, Einsum with a constant
weight) in the branch: an Add of weightless arithmetic (the tanh-GELU's ``x + 0.044715·x³``) is part
of a layer, not a layer. Removing it means ``y = x``: every reader of ``y`` reads ``x`` and the branch
goes away (ResNet basic/bottleneck blocks, MobileNetV2 inverted residuals, ConvNeXt blocks, and a
transformer's attention and MLP sub-blocks, each on its own).

Importance (lower is removed first):

* ``ratio`` (default): ‖f(x)‖ / ‖x‖ over calibration inputs (random inputs when none are given): a
  branch that adds little to its stream changes little when it goes;
* ``fidelity``: 1 − cosine similarity between the model's outputs with and without the block.

Finding and removal work on a graphsurgeon graph; measuring runs onnxruntime through
:mod:`onnxprune.runtime`.
"""

from __future__ import annotations

import logging
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "add": self.add, "skip": self.skip, "branch": self.branch, "kind": self.kind,
            "nodes": len(self.nodes), "params": self.params, "importance": self.importance,
        }


@dataclass
class DepthResult:
    """What :func:`prune_depth` did: the model without the removed blocks and every candidate's score."""

    model: onnx.ModelProto
    removed: list[ResidualBlock]
    candidates: list[ResidualBlock]
    method: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "removed": [b.to_dict() for b in self.removed],
            "candidates": [b.to_dict() for b in self.candidates],
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
    dims = [shapes.get(n) for n in names]
    return all(d is not None for d in dims) and all(d == dims[0] for d in dims) and "?" not in dims[0]


def _kind(nodes: list[gs.Node]) -> str:
    ops = {n.op for n in nodes}
    if "Softmax" in ops:
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


def _block_at(node: gs.Node, shapes: Mapping[str, list[int | str]], graph_outputs: set[int]) -> ResidualBlock | None:
    """The residual block ending at ``node`` (an Add of x and f(x)), or None."""
    if node.op not in RESIDUAL_OPS or len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    a, b = node.inputs
    if not all(isinstance(t, gs.Variable) and t.name for t in (a, b)) or a is b:
        return None
    if not _same_shape(shapes, a.name, b.name, node.outputs[0].name):
        return None
    for skip, branch in ((a, b), (b, a)):
        up = _ancestors(branch)
        if _reads(up, skip):
            region_ids = up & _descendants(skip)
            if not region_ids:
                continue
            nodes = [n for n in _nodes_by_id(branch, region_ids)]
            if not _self_contained(nodes, region_ids, node, graph_outputs) or not _has_weighted_layer(nodes):
                return None
            return ResidualBlock(node.name, skip.name, branch.name, node.outputs[0].name,
                                 [n.name for n in nodes], _kind(nodes), _params(nodes))
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


def _self_contained(nodes: list[gs.Node], ids: set[int], add: gs.Node, graph_outputs: set[int]) -> bool:
    """Every value the branch makes is read only inside it or by the Add, and none is a graph output."""
    for n in nodes:
        for out in n.outputs:
            if id(out) in graph_outputs:
                return False
            if any(id(c) not in ids and c is not add for c in out.outputs):
                return False
    return True


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
    outputs = {id(t) for t in graph.outputs}
    blocks = []
    for node in graph.nodes:
        block = _block_at(node, shapes, outputs)
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
    """1 − cosine similarity of all outputs (flattened together) with each block removed alone."""
    from onnxprune.runtime.session import make_session

    with make_session(model, device) as sess:
        reference = sess.run(feeds)
    ref = np.concatenate([np.ravel(reference[k]).astype(np.float64) for k in sorted(reference)])
    scores: dict[str, float] = {}
    for block in blocks:
        graph = gs.import_onnx(model)
        remove_blocks(graph, [block])
        with make_session(export_graph(graph, model, check=False), device) as sess:
            out = sess.run(feeds)
        cand = np.concatenate([np.ravel(out[k]).astype(np.float64) for k in sorted(out)])
        denom = float(np.linalg.norm(ref) * np.linalg.norm(cand))
        scores[block.add] = 1.0 - (float(ref @ cand) / denom if denom > 0 else 0.0)
    return scores


# --- removal -------------------------------------------------------------------------------------


def remove_blocks(graph: gs.Graph, blocks: list[ResidualBlock]) -> None:
    """Bypass each block in place: readers of its output read its skip input; the branch is cleaned up.

    Raises:
        PlanError: a block's Add or skip tensor is not in ``graph`` (e.g. already removed with another block).
    """
    tensors = graph.tensors()
    nodes = {n.name: n for n in graph.nodes}
    bypassed: dict[str, gs.Tensor] = {}  # a removed block's output → the tensor now read instead
    for block in blocks:
        add = nodes.get(block.add)
        skip = bypassed.get(block.skip, tensors.get(block.skip))
        if add is None or skip is None or not add.outputs:
            raise PlanError(f"residual block {block.add} is no longer in the graph")
        y = add.outputs[0]
        if any(t is y for t in graph.outputs):
            add.op = "Identity"
            add.inputs.clear()
            add.inputs.append(skip)
            add.attrs.clear()
            continue
        for consumer in list(y.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is y:
                    consumer.inputs[i] = skip
        add.outputs.clear()
        bypassed[block.output] = skip
    graph.cleanup().toposort()


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
    log.info("removed residual blocks %s", ", ".join(b.add for b in chosen))
    return DepthResult(model=export_graph(graph, model, check=False), removed=chosen, candidates=blocks, method=method)
