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
)
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


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Explicit inputs plus outer-scope names read inside subgraphs (If/Loop/Scan bodies)."""
    names = [i for i in node.input if i]
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for sub in graphs:
            defined = {i.name for i in sub.input} | {t.name for t in sub.initializer}
            for n in sub.node:
                names += [i for i in node_inputs(n) if i and i not in defined]
                defined.update(n.output)
    return names


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
) -> GradientResult:
    """Append the backward pass of ``loss`` w.r.t. ``wrt`` to a copy of ``model``.

    ``loss`` must be a scalar float tensor of the graph; ``wrt`` are graph inputs or initializers.
    The result's outputs are ``loss`` followed by one ``<name>__grad`` output per tensor that
    reaches the loss (``missing`` lists the others). ``registry`` defaults to
    :func:`~onnxprune.training.grad.rules.default_registry`.

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
    grads: dict[str, list[str]] = {loss: [ctx.emit("ConstantOfShape", [ctx.shape_of(loss)],
                                                   value=helper.make_tensor("v", ctx.dtype(loss), [1], [1]))]}
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
    graph.node.extend(ctx.nodes)
    graph.initializer.extend(ctx.initializers)
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
