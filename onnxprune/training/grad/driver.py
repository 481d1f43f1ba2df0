"""Reverse-mode differentiation of an ONNX graph into standard ONNX ops.

Current onnxruntime wheels ship no gradient kernels, so the backward pass is written with the same
default-domain ops the forward uses, and the training graph runs on any stock onnxruntime build. The
driver walks the graph backwards and asks a :class:`~onnxprune.training.grad.context.VJPRegistry` for one
rule per op; rules only emit nodes through a :class:`~onnxprune.training.grad.context.GradContext`, the
driver decides what is differentiated and wires the results.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.errors import BadInputError, UnsupportedOpError
from onnxprune.io.limits import default_opset
from onnxprune.training.grad.context import (
    FLOAT_TYPES,
    GradContext,
    TensorInfo,
    VJPRegistry,
    collect_tensor_info,
    constant_node_value,
    node_inputs,
)
from onnxprune.training.grad.memory import plan_recompute, prune_dead, recompute_cheap
from onnxprune.training.grad.rules import default_registry

log = logging.getLogger(__name__)

#: The backward graph needs ReduceSum-with-axes-input (13), ScatterElements reduction (16) and
#: LayerNormalization (17); older models are converted up to this opset first.
MIN_OPSET = 17


def upgrade_opset(model: onnx.ModelProto, minimum: int = MIN_OPSET) -> onnx.ModelProto:
    """Return ``model`` at opset ``minimum`` or above (the backward graph needs recent ops).

    Raises:
        UnsupportedOpError: when the onnx version converter cannot convert the model.
    """
    if default_opset(model) >= minimum:
        return model
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, minimum)
    except Exception as e:  # the converter raises bare RuntimeErrors
        raise UnsupportedOpError(
            f"cannot convert the model from opset {default_opset(model)} to {minimum} for training: {e}"
        ) from e


@dataclass(frozen=True)
class GradientResult:
    """A model whose outputs are the loss followed by one gradient per differentiated tensor."""

    model: onnx.ModelProto
    loss: str
    grads: dict[str, str]  # wrt tensor → gradient output name
    missing: tuple[str, ...]  # requested tensors with no path to the loss


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = constant_node_value(node)
            if value is not None:
                values[node.output[0]] = value
    return values


def _differentiable(
    graph: onnx.GraphProto, wrt: Sequence[str], info: dict[str, TensorInfo], non_diff: frozenset[str]
) -> set[str]:
    """Float tensors reachable from ``wrt`` through ops that carry gradients."""
    reach = set(wrt)
    for node in graph.node:
        if node.op_type in non_diff or not any(i in reach for i in node_inputs(node)):
            continue
        for o in node.output:
            ti = info.get(o)
            if o and (ti is None or ti.dtype in FLOAT_TYPES):
                reach.add(o)
    return reach


def _needed(graph: onnx.GraphProto, loss: str, reach: set[str]) -> tuple[set[str], list[onnx.NodeProto]]:
    """Tensors on a path to ``loss`` among ``reach``, and the nodes to differentiate (reverse order)."""
    need = {loss}
    active: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if not any(o in need for o in node.output if o):
            continue
        ins = [i for i in node_inputs(node) if i in reach]
        if ins:
            active.append(node)
            need.update(ins)
    return need, active


def build_gradients(
    model: onnx.ModelProto,
    loss: str,
    wrt: Sequence[str],
    *,
    registry: VJPRegistry | None = None,
    recompute: bool = True,
) -> GradientResult:
    """Append the backward pass of ``loss`` w.r.t. ``wrt`` to a copy of ``model``.

    ``loss`` must be a scalar float tensor of the graph; ``wrt`` are graph inputs or initializers.
    The result's outputs are ``loss`` followed by one ``<name>__grad`` output per tensor that
    reaches the loss (``missing`` lists the others). ``registry`` defaults to
    :func:`~onnxprune.training.grad.rules.default_registry`. Nodes that reach no output are dropped, and
    with ``recompute`` the backward re-runs chains of cheap elementwise ops from the nearest expensive
    op's output instead of keeping every link alive (:mod:`~onnxprune.training.grad.memory`): the same
    values, a fraction of the activation memory.

    Raises:
        UnsupportedOpError: an op on a path from ``wrt`` to ``loss`` has no VJP rule (names op and node).
        BadInputError: ``loss`` or a ``wrt`` name is not in the graph.

    Example:
        >>> res = build_gradients(model_with_loss, "loss", ["fc.weight"])  # doctest: +SKIP
        >>> res.grads["fc.weight"]
        'fc.weight__grad'
    """
    reg = registry if registry is not None else default_registry()
    wrt = list(dict.fromkeys(wrt))
    model = upgrade_opset(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    info = collect_tensor_info(out)
    names = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    names |= {o for n in graph.node for o in n.output}
    for w in wrt:
        if w not in names:
            raise BadInputError(f"cannot differentiate w.r.t. {w!r}: no such input or initializer")
    if loss not in names:
        raise BadInputError(f"loss tensor {loss!r} is not produced by the graph")
    ctx = GradContext(
        info=info,
        constants=_constants(graph),
        opset=default_opset(out),
        taken=names | {vi.name for vi in graph.value_info},
    )
    reach = _differentiable(graph, wrt, info, reg.non_differentiable)
    need, active = _needed(graph, loss, reach)
    ones = ctx.emit("ConstantOfShape", [ctx.shape_of(loss)], value=helper.make_tensor("v", ctx.dtype(loss), [1], [1]))
    # ones that depend on the loss's value: onnxruntime then computes the loss before the backward and
    # frees what only the loss reads, instead of keeping it (the logits' log-softmaxes) to the step's end
    grads: dict[str, list[str]] = {loss: [ctx.emit("Where", [ctx.emit("IsNaN", [loss]), ones, ones])]}
    for node in active:
        gouts = [_total(ctx, grads.get(o, [])) if o else None for o in node.output]
        if all(g is None for g in gouts):
            continue
        rule = reg.get(node.op_type, node.domain)
        if rule is None:
            raise UnsupportedOpError(
                f"no gradient rule for op {node.op_type!r} (node {node.name!r}); it lies on the path from "
                f"the trained parameters to the loss",
                op_type=node.op_type,
                node=node.name,
            )
        gins = rule(ctx, node, gouts)
        for name, g in zip(node.input, gins):
            if g is not None and name and name in reach and name in need:
                grads.setdefault(name, []).append(g)
    result: dict[str, str] = {}
    missing: list[str] = []
    outputs = [helper.make_tensor_value_info(loss, ctx.dtype(loss), ctx.shape(loss))]
    for w in wrt:
        total = _total(ctx, grads.get(w, [])) if w != loss else None
        if total is None:
            missing.append(w)
            continue
        gname = f"{w}__grad"
        ctx.nodes.append(helper.make_node("Identity", [total], [gname], name=gname))
        result[w] = gname
        outputs.append(helper.make_tensor_value_info(gname, ctx.dtype(w), ctx.shape(w)))
    if missing:
        log.info("no gradient reaches %d tensor(s): %s", len(missing), ", ".join(missing[:8]))
    wanted = [o.name for o in outputs]
    alive = prune_dead(list(graph.node) + ctx.nodes, wanted)
    emitted = {id(n) for n in ctx.nodes}
    forward = [n for n in alive if id(n) not in emitted]
    backward = [n for n in alive if id(n) in emitted]
    if recompute:
        sources = {i.name for i in graph.input} | {t.name for t in graph.initializer}
        plan = plan_recompute(forward, sources | set(ctx.constants), info=ctx.info)
        backward = recompute_cheap(ctx, backward, plan)
    nodes = prune_dead(forward + backward, wanted)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in nodes for i in node_inputs(n)}
    graph.initializer.extend(t for t in ctx.initializers if t.name in used)
    del graph.output[:]
    graph.output.extend(outputs)
    return GradientResult(out, loss, result, tuple(missing))


def _total(ctx: GradContext, parts: list[str]) -> str | None:
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    total = ctx.emit("Sum", parts)
    parts[:] = [total]  # later readers of the same tensor reuse the sum
    return total
