"""Channel-preserving ops: activations, broadcasting arithmetic, pooling, reductions, Resize, Pad."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.analysis.analyzer import Analyzer
from onnxprune.analysis.core import ChannelMap, FixupKind, SiteRole
from onnxprune.analysis.graph import optional_input, producer
from onnxprune.analysis.rules._common import (
    first_input,
    int_list,
    is_static,
    runtime_ints,
)
from onnxprune.analysis.shape_reads import shape_source

UNARY = (
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Gelu", "Mish", "ThresholdedRelu", "Neg", "Abs", "Exp", "Log", "Sqrt",
    "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Identity", "Dropout", "Cast", "Clip",
    "Shrink", "IsNaN", "IsInf", "Not", "CastLike",
)


POOLS = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")


BROADCAST = ("Add", "Sub", "Mul", "Div", "Pow", "PRelu", "Max", "Min", "Sum", "Mean", "Where",
             "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Mod")


REDUCE = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")


NO_CHANNELS = ("Shape", "Size", "Constant", "ConstantOfShape", "Range", "NonZero", "EyeLike", "RandomNormalLike",
               "RandomUniformLike")


def unary(az: Analyzer, node: gs.Node) -> None:
    xm = az.map(first_input(node))
    if xm is None:
        return
    for t in node.inputs[1:]:
        if not Analyzer.present(t):
            continue
        dims = az.shape(t)
        if az.map(t) is not None or dims is None or not is_static(dims) or int(np.prod(dims, dtype=np.int64)) != 1:
            az.block(xm.ids, f"{node.op} {node.name} has a non-scalar extra input {t.name}")
            return
    if node.op == "Cast" and int(node.attrs.get("to", 1)) not in (1, 10, 11, 16):
        az.block(xm.ids, f"Cast {node.name} to a non-float type")
        return
    az.set_map(node.outputs[0], xm)


def pool(az: Analyzer, node: gs.Node) -> None:
    xm = az.map(first_input(node))
    if xm is None:
        return
    if xm.axis != 1:
        az.block(xm.ids, f"{node.op} {node.name} pools with channels on axis {xm.axis}")
        return
    az.set_map(node.outputs[0], xm)
    if len(node.outputs) > 1 and node.outputs[1].outputs:
        az.block(xm.ids, f"{node.op} {node.name} indices output is used")


def no_channels(az: Analyzer, node: gs.Node) -> None:
    """Shape-like ops read a tensor's size, not its values; their outputs carry no channels."""


def broadcast(az: Analyzer, node: gs.Node) -> None:
    """Elementwise ops: mapped inputs are coupled; per-channel constants are sliced; the rest broadcast."""
    out = node.outputs[0]
    inputs = [t for t in node.inputs if Analyzer.present(t)]
    ranks = [az.rank(t) for t in inputs]
    out_rank = az.rank(out) or (max(r for r in ranks if r is not None) if any(r is not None for r in ranks) else None)
    mapped = [(t, az.map(t), r) for t, r in zip(inputs, ranks) if az.map(t) is not None]
    if not mapped:
        return
    if out_rank is None or any(r is None for _, _, r in mapped):
        for _, m, _ in mapped:
            az.block(m.ids, f"{node.op} {node.name}: ranks unknown")
        return
    axes = {out_rank - r + m.axis for _, m, r in mapped}
    if len(axes) > 1:
        mapped = _broadcast_axis(az, node, mapped, out_rank)
        if not mapped:
            return
        axes = {out_rank - mapped[0][2] + mapped[0][1].axis}
    axis = axes.pop()
    ids = mapped[0][1].ids
    for _, m, _ in mapped[1:]:
        if len(m.ids) != len(ids):
            az.block(ids, f"{node.op} {node.name} broadcasts a channel tensor")
            az.block(m.ids, f"{node.op} {node.name} broadcasts a channel tensor")
            return
        ids = az.couple(ids, m.ids, f"{node.op} {node.name} couples them with unprunable channels")
    for t, r in zip(inputs, ranks):
        if az.map(t) is not None:
            continue
        if r is None:
            az.block(ids, f"{node.op} {node.name}: shape of {t.name} unknown")
            return
        local = axis - (out_rank - r)
        if local < 0:
            continue
        dim = az.shape(t)[local]
        if dim == 1:
            continue
        source = _param_source(az, t, local, node, ids) if dim == len(ids) else None
        sources = [source] if source is not None else _computed_params(az, t, local, ids) if dim == len(ids) else None
        if sources:
            for const, const_axis, reader in sources:
                az.site(const, const_axis, ids, reader, SiteRole.PARAM)
        else:
            az.block(ids, f"{node.op} {node.name} combines them with {t.name}, which has no prunable channels")
    az.set_map(out, ChannelMap(axis, ids))


def _broadcast_axis(
    az: Analyzer, node: gs.Node, mapped: list[tuple[gs.Tensor, ChannelMap, int]], out_rank: int
) -> list[tuple[gs.Tensor, ChannelMap, int]]:
    """Channels on different axes: keep the inputs of one axis that every other input broadcasts over
    (size 1 there: rotary cos/sin tables [1, 1, T, d] times heads [B, H, T, d]) and block the others,
    whose channels would meet unprunable positions. All are blocked when no axis broadcasts."""
    for _, first, r0 in mapped:
        axis = out_rank - r0 + first.axis
        others = [(t, m, r) for t, m, r in mapped if out_rank - r + m.axis != axis]
        if all(axis - (out_rank - r) < 0 or az.shape(t)[axis - (out_rank - r)] == 1 for t, _, r in others):
            for t, m, _ in others:
                az.block(m.ids, f"{node.op} {node.name} combines them with channels of another axis")
            return [item for item in mapped if item not in others]
    for _, m, _ in mapped:
        az.block(m.ids, f"{node.op} {node.name} combines channels on different axes")
    return []


def _param_source(
    az: Analyzer, t: gs.Tensor, axis: int, node: gs.Node, ids: np.ndarray
) -> tuple[gs.Tensor, int, gs.Node] | None:
    """The constant behind a per-channel operand: itself, or the data of an Expand/Cast/Identity (a class
    token expanded to the batch). Returns (constant, its channel axis, the node reading it); an Expand
    whose target shape names the channel count gets a fixup for it."""
    if az.const(t) is not None:
        return t, axis, node
    src = producer(t)
    rank = az.rank(t)
    if src is None or rank is None or src.op not in ("Expand", "Cast", "Identity") or len(src.outputs[0].outputs) != 1:
        return None
    inner = src.inputs[0]
    inner_rank, dims = az.rank(inner), az.shape(inner)
    if inner_rank is None or dims is None or az.map(inner) is not None:
        return None
    local = axis - (rank - inner_rank)
    if local < 0 or dims[local] != az.shape(t)[axis]:
        return None
    entry = None
    if src.op == "Expand":
        target = az.shape(src.inputs[1])
        if target is None or not isinstance(target[0], int):
            return None
        pos = axis - (rank - target[0])
        entry = shape_source(az, src, 1, pos) if pos >= 0 else None
        if pos >= 0 and (entry is None or entry.of is not None):
            computed = az.folded.get(src.inputs[1].name)
            if computed is None or int(computed.reshape(-1)[pos]) != 1:
                return None
            entry = None  # computed at runtime, but from constants only (Shape reads are checked apart): 1 broadcasts
    found = _param_source(az, inner, local, src, ids)
    if found is not None and entry is not None and entry.value > 1:
        az.fixup(entry.owner, FixupKind.SHAPE_VALUE, [ids], input=entry.input, position=entry.position)
    return found


def _computed_params(
    az: Analyzer, t: gs.Tensor, axis: int, ids: np.ndarray, depth: int = 4
) -> list[tuple[gs.Tensor, int, gs.Node]] | None:
    """A per-channel operand computed elementwise from per-channel constants and tensors without channels
    (size 1 on the channel axis: a normalisation's per-position inverse std): flax/jax2tf's
    ``inv_std · scale``, Keras' ``γ · inv_std`` and ``β − mean · γ · inv_std``. Returns the constants as
    ``_param_source`` does, all of them to slice; None when anything else enters."""
    src, rank = producer(t), az.rank(t)
    if depth == 0 or src is None or rank is None or az.map(t) is not None or src.op not in UNARY + BROADCAST:
        return None
    found: list[tuple[gs.Tensor, int, gs.Node]] = []
    for x in src.inputs:
        if not Analyzer.present(x):
            continue
        r, dims = az.rank(x), az.shape(x)
        if r is None or dims is None or az.map(x) is not None:
            return None
        local = axis - (rank - r)
        if local < 0 or dims[local] == 1:
            continue
        if dims[local] != len(ids):
            return None
        direct = _param_source(az, x, local, src, ids)
        inner = [direct] if direct is not None else _computed_params(az, x, local, ids, depth - 1)
        if inner is None:
            return None
        found.extend(inner)
    return found or None


def reduce(az: Analyzer, node: gs.Node) -> None:
    xm, rank = az.map(first_input(node)), az.rank(first_input(node))
    if xm is None:
        return
    axes = int_list(az, node, 1, "axes")
    if axes is None or rank is None:
        az.block(xm.ids, f"{node.op} {node.name} reduces over unknown axes")
        return
    axes = sorted(a + rank if a < 0 else a for a in axes)
    if axes == [xm.axis] and _is_norm_statistic(node):
        az.approximate(xm.ids, f"{node.op} {node.name} is a normalisation statistic over the channel axis "
                               "(LayerNorm, RMSNorm, GRN): a cut changes it")
        return  # a per-position scalar: no channels
    if xm.axis in axes or not axes:
        az.block(xm.ids, f"{node.op} {node.name} reduces over the channel axis")
        return
    keep = int(node.attrs.get("keepdims", 1))
    axis = xm.axis if keep else xm.axis - sum(1 for a in axes if a < xm.axis)
    az.set_map(node.outputs[0], ChannelMap(axis, xm.ids))


STATISTICS = ("ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2")


STAT_HOPS = 8


#: Ops that only reshape or broadcast a statistic back over its positions (jax2tf's keepdims=0 sum, then
#: Reshape to ``[N, 1]`` and BroadcastTo): the walk passes them without counting a step.
STAT_RESHAPES = ("Reshape", "Expand", "Unsqueeze", "Squeeze", "Identity")


def _upstream(t: gs.Tensor, hops: int) -> set[int]:
    """ids of ``t`` and the computed tensors it comes from through ``hops`` elementwise ops or reductions."""
    found, frontier = {id(t)}, [t]
    for _ in range(hops):
        ops = [producer(x) for x in frontier]
        frontier = [x for op in ops if op is not None and op.op in UNARY + BROADCAST + STATISTICS
                    for x in op.inputs if isinstance(x, gs.Variable)]
        found.update(id(x) for x in frontier)
    return found


def _is_norm_statistic(node: gs.Node) -> bool:
    """Whether a reduction over the channel axis is a normalisation's statistic: within a few
    elementwise steps its value meets a tensor computed from the same source (LayerNorm ``x - mean(x)``,
    ``d / sqrt(mean(d²))``, flax's ``mean(x²) - mean(x)²`` applied to ``x - mean(x)``; RMSNorm; GRN
    ``Gx / mean(Gx)``; the ``ReduceSum · 1/n`` forms; jax2tf's ``keepdims=0`` sum brought back to ``[N, 1]``
    by Reshape/BroadcastTo, which the walk passes for free). A softmax (a sum of ``Exp``) and other uses (a
    CBAM map fed to a Conv) are not."""
    x = node.inputs[0]
    if node.op not in STATISTICS:
        return False
    src = producer(x)
    if src is not None and src.op == "Exp":
        return False
    sources = _upstream(x, 3)
    seen, chain, tensors = set(), {id(node.outputs[0])}, [node.outputs[0]]
    for _ in range(STAT_HOPS):
        tensors = _through_reshapes(tensors, chain)
        users = [u for t in tensors for u in t.outputs if u.op in UNARY + BROADCAST and id(u) not in seen]
        for u in users:
            others = [t for t in u.inputs if isinstance(t, gs.Variable) and id(t) not in chain]
            if any(_upstream(t, 1) & sources for t in others):
                return True
            seen.add(id(u))
        tensors = [t for u in users for t in u.outputs]
        chain.update(id(t) for t in tensors)
    return False


def _through_reshapes(tensors: list[gs.Tensor], chain: set[int]) -> list[gs.Tensor]:
    """``tensors`` and what Reshape/Expand/Unsqueeze/Squeeze make of them (their data input), added to ``chain``."""
    found, frontier = list(tensors), list(tensors)
    while frontier:
        frontier = [o for t in frontier for u in t.outputs if u.op in STAT_RESHAPES and u.inputs[0] is t
                    for o in u.outputs if id(o) not in chain]
        chain.update(id(t) for t in frontier)
        found.extend(frontier)
    return found


def softmax(az: Analyzer, node: gs.Node) -> None:
    xm, rank = az.map(first_input(node)), az.rank(first_input(node))
    if xm is None:
        return
    axis = int(node.attrs.get("axis", -1))
    if rank is None or (axis + rank if axis < 0 else axis) == xm.axis:
        az.block(xm.ids, f"{node.op} {node.name} normalizes over the channel axis")
        return
    az.set_map(node.outputs[0], xm)


def resize(az: Analyzer, node: gs.Node) -> None:
    xm = az.map(first_input(node))
    if xm is None:
        return
    scales = az.const(optional_input(node, 2)) if node.op == "Resize" else az.const(optional_input(node, 1))
    sizes = az.const(optional_input(node, 3)) if node.op == "Resize" else None
    if scales is not None and scales.size and float(scales.reshape(-1)[xm.axis]) == 1.0:
        az.set_map(node.outputs[0], xm)
    elif sizes is not None and sizes.size and int(sizes.reshape(-1)[xm.axis]) == len(xm.ids):
        az.fixup(node, FixupKind.RESIZE_SIZES, [xm.ids], axis=xm.axis)
        az.set_map(node.outputs[0], xm)
    else:
        az.block(xm.ids, f"{node.op} {node.name} may rescale the channel axis")


def pad(az: Analyzer, node: gs.Node) -> None:
    xm, rank = az.map(first_input(node)), az.rank(first_input(node))
    if xm is None:
        return
    pads = runtime_ints(az, node, 1)  # Swin's window padding is computed from the spatial dims: folded
    axes = int_list(az, node, 3, "__none__")
    if pads is None or rank is None:
        az.block(xm.ids, f"Pad {node.name} pads are computed at runtime from unknown shapes (pass --shape)")
        return
    pads = pads.reshape(-1).tolist()
    axes = list(range(rank)) if axes is None else [a + rank if a < 0 else a for a in axes]
    n = len(axes)
    for k, a in enumerate(axes):
        if a == xm.axis and (pads[k] != 0 or pads[k + n] != 0):
            az.block(xm.ids, f"Pad {node.name} pads the channel axis")
            return
    az.set_map(node.outputs[0], xm)
