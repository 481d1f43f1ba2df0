"""Per-op channel propagation rules for :mod:`onnxprune.groups`.

Each rule reads the :class:`~onnxprune.groups.ChannelMap` of a node's inputs and either sets the
maps of its outputs (recording the weights to slice and the fixups a cut needs) or blocks the ids it
cannot follow, always with a reason. An op without a rule blocks its inputs (the driver's policy).

Beyond plain CNNs: grouped convolution couples channel j of every group (each group loses the same
offsets); Reshape splits put ids on one new axis and couple the others (attention heads, channel
shuffle, fused Q/K/V) and update the target entry, even when it is computed at runtime; MatMul of two
computed tensors couples heads on batch axes and contracted features; LayerNormalization over the
channels (fused, or decomposed into ReduceMean/Sub/Pow/Sqrt/Div) couples γ/β across the residual
stream; Gather from a constant table is an embedding producer; recurrent and control-flow ops block.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.groups import Analyzer, ChannelMap, RuleRegistry
from onnxprune.index_mapping import (
    FIXED,
    ConcatMapping,
    GroupedMapping,
    RepeatMapping,
    SliceMapping,
    SplitAxisMapping,
)
from onnxprune.shape_flow import producer as _producer
from onnxprune.shape_flow import shape_source

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
RECURRENT = ("LSTM", "GRU", "RNN")
CONTROL_FLOW = ("If", "Loop", "Scan")


def default_registry() -> RuleRegistry:
    """A fresh registry holding every built-in rule (a new object each call: tests can extend their own)."""
    reg = RuleRegistry()
    reg.register("Conv")(conv)
    reg.register("ConvTranspose")(conv_transpose)
    reg.register("Gemm")(gemm)
    reg.register("MatMul")(matmul)
    reg.register("BatchNormalization", "InstanceNormalization")(batch_norm)
    reg.register(*UNARY)(unary)
    reg.register(*POOLS)(pool)
    reg.register(*BROADCAST)(broadcast)
    reg.register(*REDUCE)(reduce)
    reg.register(*NO_CHANNELS)(no_channels)
    reg.register("Concat")(concat)
    reg.register("Split")(split)
    reg.register("Slice")(slice_)
    reg.register("Flatten")(flatten)
    reg.register("Reshape")(reshape)
    reg.register("Transpose")(transpose)
    reg.register("Squeeze")(squeeze)
    reg.register("Unsqueeze")(unsqueeze)
    reg.register("Softmax", "LogSoftmax", "Hardmax")(softmax)
    reg.register("Resize", "Upsample")(resize)
    reg.register("Pad")(pad)
    reg.register("LayerNormalization")(layer_norm)
    reg.register("Gather")(gather)
    reg.register("Expand")(expand)
    reg.register("Tile")(tile)
    reg.register(*RECURRENT)(recurrent)
    reg.register(*CONTROL_FLOW)(control_flow)
    return reg


def _first(node: gs.Node) -> gs.Tensor:
    return node.inputs[0]


def _opt(node: gs.Node, i: int) -> gs.Tensor | None:
    if len(node.inputs) > i and Analyzer.present(node.inputs[i]):
        return node.inputs[i]
    return None


def _ints(az: Analyzer, node: gs.Node, i: int, attr: str) -> list[int] | None:
    """An axes-like list given as input ``i`` (newer opsets) or attribute ``attr`` (older ones)."""
    t = _opt(node, i)
    if t is not None:
        v = az.const(t)
        return None if v is None else [int(x) for x in v.reshape(-1)]
    value = node.attrs.get(attr)
    return None if value is None else [int(x) for x in value]


def _static(dims: list[int | str] | None) -> bool:
    return dims is not None and all(isinstance(d, int) and d > 0 for d in dims)


# --- producers and consumers -----------------------------------------------------------


def conv(az: Analyzer, node: gs.Node) -> None:
    x, w_t, b_t = node.inputs[0], node.inputs[1], _opt(node, 2)
    xm, w = az.map(x), az.const(w_t)
    if w is None:
        az.block_inputs(node, f"Conv {node.name} weights are computed at runtime")
        return
    if xm is not None and xm.axis != 1:
        az.block(xm.ids, f"Conv {node.name} reads channels on axis {xm.axis}")
        xm = None
    group = int(node.attrs.get("group", 1))
    cout, cin = int(w.shape[0]), int(w.shape[1]) * group
    if group == 1:
        if xm is not None:
            az.site(w_t, 1, xm.ids, node, "in")
        ids = az.new_ids(cout, node)
    elif group == cin and cout % cin == 0:
        in_ids = xm.ids if xm is not None else np.full(cin, FIXED, np.int64)
        ids = np.repeat(in_ids, cout // cin)
        az.fixup(node, "conv_group", [in_ids])
    else:
        if xm is not None:
            az.site(w_t, 1, _even_per_group(az, node, xm.ids, group), node, "in")
        ids = GroupedMapping(group).tile(az.new_ids(cout // group, node))
    az.site(w_t, 0, ids, node, "out")
    if b_t is not None:
        az.site(b_t, 0, ids, node, "param")
    az.set_map(node.outputs[0], ChannelMap(1, ids))


def _even_per_group(az: Analyzer, node: gs.Node, ids: np.ndarray, group: int) -> np.ndarray:
    """Couple a grouped op's input blocks offset by offset; returns the ids of one block (all alike now).

    Each group then loses the same number of channels at the same offsets, so the group count stays
    and the weight's per-group input axis is sliced once for all groups.
    """
    blocks = GroupedMapping(group).blocks(ids)
    first = blocks[0]
    for other in blocks[1:]:
        first = az.couple(first, other, f"{node.op} {node.name} (group={group}) ties its groups to unprunable channels")
    return first


def conv_transpose(az: Analyzer, node: gs.Node) -> None:
    x, w_t, b_t = node.inputs[0], node.inputs[1], _opt(node, 2)
    xm, w = az.map(x), az.const(w_t)
    if w is None or (xm is not None and xm.axis != 1):
        az.block_inputs(node, f"ConvTranspose {node.name}: computed weights or channels off axis 1")
        return
    group = int(node.attrs.get("group", 1))
    cin, cout = int(w.shape[0]), int(w.shape[1]) * group
    if group == 1:
        if xm is not None:
            az.site(w_t, 0, xm.ids, node, "in")
        ids = az.new_ids(cout, node)
        az.site(w_t, 1, ids, node, "out")
    elif group == cin and w.shape[1] == 1:
        ids = xm.ids if xm is not None else np.full(cin, FIXED, np.int64)
        az.site(w_t, 0, ids, node, "out")
        az.fixup(node, "conv_group", [ids])
    else:
        if xm is not None:
            block = _even_per_group(az, node, xm.ids, group)
            az.site(w_t, 0, GroupedMapping(group).tile(block), node, "in")
        per_group = az.new_ids(int(w.shape[1]), node)
        az.site(w_t, 1, per_group, node, "out")
        ids = GroupedMapping(group).tile(per_group)
    if b_t is not None:
        az.site(b_t, 0, ids, node, "param")
    az.set_map(node.outputs[0], ChannelMap(1, ids))


def gemm(az: Analyzer, node: gs.Node) -> None:
    a_t, b_t, c_t = node.inputs[0], node.inputs[1], _opt(node, 2)
    am, b = az.map(a_t), az.const(b_t)
    if b is None:
        az.block_inputs(node, f"Gemm {node.name} weights are computed at runtime")
        return
    trans_a, trans_b = int(node.attrs.get("transA", 0)), int(node.attrs.get("transB", 0))
    if am is not None and am.axis != (0 if trans_a else 1):
        az.block(am.ids, f"Gemm {node.name} reads features on another axis")
        am = None
    if am is not None:
        az.site(b_t, 1 if trans_b else 0, am.ids, node, "in")
    n = int(b.shape[0 if trans_b else 1])
    ids = az.new_ids(n, node)
    az.site(b_t, 0 if trans_b else 1, ids, node, "out")
    if c_t is not None:
        c = az.const(c_t)
        if c is None:
            az.block(ids, f"Gemm {node.name} adds a computed C")
        elif c.ndim >= 1 and c.shape[-1] == n and n > 1:
            az.site(c_t, c.ndim - 1, ids, node, "param")
    az.set_map(node.outputs[0], ChannelMap(1, ids))


def matmul(az: Analyzer, node: gs.Node) -> None:
    """MatMul with a constant right operand is a producer (its columns) and a consumer (its rows).

    A constant of rank > 2 (batched weights) is sliced on its last two axes. Two computed operands
    (attention scores and context) are handled by :func:`batched_matmul`.
    """
    a_t, b_t = node.inputs
    b = az.const(b_t)
    if b is None or az.map(b_t) is not None:
        batched_matmul(az, node)
        return
    if b.ndim < 2:
        az.block_inputs(node, f"MatMul {node.name} has a 1-D weight")
        return
    am, rank = az.map(a_t), az.rank(a_t)
    if am is not None and (rank is None or am.axis != rank - 1):
        az.block(am.ids, f"MatMul {node.name} reads features on another axis")
        am = None
    if am is not None:
        az.site(b_t, b.ndim - 2, am.ids, node, "in")
    ids = az.new_ids(int(b.shape[-1]), node)
    az.site(b_t, b.ndim - 1, ids, node, "out")
    out_rank = az.rank(node.outputs[0]) or (max(rank, b.ndim) if rank is not None else None)
    if out_rank is None:
        az.block(ids, f"MatMul {node.name} output rank unknown")
        return
    az.set_map(node.outputs[0], ChannelMap(out_rank - 1, ids))


def batched_matmul(az: Analyzer, node: gs.Node) -> None:
    """MatMul of two computed tensors [.., M, K] @ [.., K, N] (attention): channels may sit on a batch
    axis (heads: coupled between the operands), on M or N (passed to the output), or on K on both
    sides (contracted: coupled, the output carries none of them)."""
    a_t, b_t = node.inputs
    am, bm = az.map(a_t), az.map(b_t)
    if am is None and bm is None:
        return
    ra, rb, ro = az.rank(a_t), az.rank(b_t), az.rank(node.outputs[0])
    maps = [m for m in (am, bm) if m is not None]
    if ra is None or rb is None or ro is None or ra < 2 or rb < 2:
        for m in maps:
            az.block(m.ids, f"MatMul {node.name}: operand ranks unknown or 1-D")
        return
    out: dict[int, np.ndarray] = {}
    contracted: list[ChannelMap] = []
    for m, r, inner, outer, row_axis in ((am, ra, ra - 1, ra - 2, ro - 2), (bm, rb, rb - 2, rb - 1, ro - 1)):
        if m is None:
            continue
        if m.axis == inner:
            contracted.append(m)
        elif m.axis == outer:
            out[row_axis] = m.ids
        else:
            axis = ro - r + m.axis
            out[axis] = az.couple(out[axis], m.ids, f"MatMul {node.name} couples heads with unprunable ones") \
                if axis in out and len(out[axis]) == len(m.ids) else m.ids
    if contracted:
        if len(contracted) == 2 and len(am.ids) == len(bm.ids):
            az.couple(am.ids, bm.ids, f"MatMul {node.name} contracts them with unprunable features")
        else:
            for m in contracted:
                az.block(m.ids, f"MatMul {node.name} contracts them with a computed operand that has none")
    if not _batch_dims_agree(az, node, out, ro):
        return
    if len(out) > 1:
        for ids in out.values():
            az.block(ids, f"MatMul {node.name} would carry channels on two axes")
        return
    if out:
        axis, ids = next(iter(out.items()))
        az.set_map(node.outputs[0], ChannelMap(axis, ids))


def _batch_dims_agree(az: Analyzer, node: gs.Node, out: dict[int, np.ndarray], ro: int) -> bool:
    """A batch-axis channel map needs the other operand to have it too, or to broadcast (size 1)."""
    ok = True
    for axis, ids in out.items():
        if axis >= ro - 2:
            continue
        for t in node.inputs:
            m, dims = az.map(t), az.shape(t)
            local = axis - (ro - len(dims)) if dims is not None else -1
            if m is not None and m.axis == local:
                continue
            if dims is None or (local >= 0 and dims[local] != 1):
                az.block(ids, f"MatMul {node.name} pairs them with {t.name}, which has no prunable channels")
                ok = False
    return ok


def batch_norm(az: Analyzer, node: gs.Node) -> None:
    xm = az.map(_first(node))
    if xm is None:
        return
    if xm.axis != 1:
        az.block(xm.ids, f"{node.op} {node.name} normalizes axis 1, channels are on axis {xm.axis}")
        return
    for i, t in enumerate(node.inputs[1:], start=1):
        az.site(t, 0, xm.ids, node, "stat" if i >= 3 else "param")
        if az.const(t) is None and Analyzer.present(t):
            az.block(xm.ids, f"{node.op} {node.name} has computed parameters")
    az.set_map(node.outputs[0], xm)


def layer_norm(az: Analyzer, node: gs.Node) -> None:
    """LayerNormalization: over axes without the channels it passes them through; over the channel axis
    alone (a transformer's residual stream) it couples its scale and bias and passes them too. Removing
    channels there changes the statistics, so that width is prunable but never exactly."""
    xm, rank = az.map(_first(node)), az.rank(_first(node))
    if xm is None:
        return
    axis = int(node.attrs.get("axis", -1))
    axis = axis + rank if rank is not None and axis < 0 else axis
    if rank is None:
        az.block(xm.ids, f"LayerNormalization {node.name}: rank unknown")
        return
    if xm.axis < axis:
        az.set_map(node.outputs[0], xm)
        return
    if not (xm.axis == axis == rank - 1):
        az.block(xm.ids, f"LayerNormalization {node.name} normalizes the channels together with other axes")
        return
    for t in node.inputs[1:3]:
        if not Analyzer.present(t):
            continue
        if az.const(t) is None or az.const(t).size != len(xm.ids):
            az.block(xm.ids, f"LayerNormalization {node.name} has computed or non-per-channel {t.name}")
            return
        az.site(t, az.const(t).ndim - 1, xm.ids, node, "param")
    az.set_map(node.outputs[0], xm)
    for extra in node.outputs[1:]:
        if extra.outputs:
            az.block(xm.ids, f"LayerNormalization {node.name} mean/inv-std outputs are used")


# --- channel-preserving ops ------------------------------------------------------------


def unary(az: Analyzer, node: gs.Node) -> None:
    xm = az.map(_first(node))
    if xm is None:
        return
    for t in node.inputs[1:]:
        if not Analyzer.present(t):
            continue
        dims = az.shape(t)
        if az.map(t) is not None or dims is None or not _static(dims) or int(np.prod(dims, dtype=np.int64)) != 1:
            az.block(xm.ids, f"{node.op} {node.name} has a non-scalar extra input {t.name}")
            return
    if node.op == "Cast" and int(node.attrs.get("to", 1)) not in (1, 10, 11, 16):
        az.block(xm.ids, f"Cast {node.name} to a non-float type")
        return
    az.set_map(node.outputs[0], xm)


def pool(az: Analyzer, node: gs.Node) -> None:
    xm = az.map(_first(node))
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
        for _, m, _ in mapped:
            az.block(m.ids, f"{node.op} {node.name} combines channels on different axes")
        return
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
        if source is not None:
            az.site(source[0], source[1], ids, source[2], "param")
        else:
            az.block(ids, f"{node.op} {node.name} combines them with {t.name}, which has no prunable channels")
    az.set_map(out, ChannelMap(axis, ids))


def _param_source(
    az: Analyzer, t: gs.Tensor, axis: int, node: gs.Node, ids: np.ndarray
) -> tuple[gs.Tensor, int, gs.Node] | None:
    """The constant behind a per-channel operand: itself, or the data of an Expand/Cast/Identity (a class
    token expanded to the batch). Returns (constant, its channel axis, the node reading it); an Expand
    whose target shape names the channel count gets a fixup for it."""
    if az.const(t) is not None:
        return t, axis, node
    src = _producer(t)
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
        az.fixup(entry.owner, "shape_value", [ids], input=entry.input, position=entry.position)
    return found


def reduce(az: Analyzer, node: gs.Node) -> None:
    xm, rank = az.map(_first(node)), az.rank(_first(node))
    if xm is None:
        return
    axes = _ints(az, node, 1, "axes")
    if axes is None or rank is None:
        az.block(xm.ids, f"{node.op} {node.name} reduces over unknown axes")
        return
    axes = sorted(a + rank if a < 0 else a for a in axes)
    if axes == [xm.axis] and _is_norm_statistic(az, node):
        return  # a LayerNorm/RMSNorm mean or variance: a per-token scalar, no channels
    if xm.axis in axes or not axes:
        az.block(xm.ids, f"{node.op} {node.name} reduces over the channel axis")
        return
    keep = int(node.attrs.get("keepdims", 1))
    axis = xm.axis if keep else xm.axis - sum(1 for a in axes if a < xm.axis)
    az.set_map(node.outputs[0], ChannelMap(axis, xm.ids))


def _is_norm_statistic(az: Analyzer, node: gs.Node) -> bool:
    """Whether a ReduceMean over the channel axis is the mean or variance of a decomposed LayerNorm
    (``x - mean(x)``, ``mean((x - m)^2)``) or RMSNorm (``mean(x^2)``), with the dims kept."""
    if node.op != "ReduceMean" or int(node.attrs.get("keepdims", 1)) != 1:
        return False
    x = node.inputs[0]
    if any(c.op == "Sub" and c.inputs[0] is x and c.inputs[1] is node.outputs[0] for c in node.outputs[0].outputs):
        return True
    sq = _producer(x)
    if sq is None:
        return False
    if sq.op == "Pow":
        exponent = az.const(sq.inputs[1])
        return exponent is not None and exponent.size == 1 and float(exponent.reshape(-1)[0]) == 2.0
    return sq.op == "Mul" and sq.inputs[0] is sq.inputs[1]


def softmax(az: Analyzer, node: gs.Node) -> None:
    xm, rank = az.map(_first(node)), az.rank(_first(node))
    if xm is None:
        return
    axis = int(node.attrs.get("axis", -1))
    if rank is None or (axis + rank if axis < 0 else axis) == xm.axis:
        az.block(xm.ids, f"{node.op} {node.name} normalizes over the channel axis")
        return
    az.set_map(node.outputs[0], xm)


def resize(az: Analyzer, node: gs.Node) -> None:
    xm = az.map(_first(node))
    if xm is None:
        return
    scales = az.const(_opt(node, 2)) if node.op == "Resize" else az.const(_opt(node, 1))
    sizes = az.const(_opt(node, 3)) if node.op == "Resize" else None
    if scales is not None and scales.size and float(scales.reshape(-1)[xm.axis]) == 1.0:
        az.set_map(node.outputs[0], xm)
    elif sizes is not None and sizes.size and int(sizes.reshape(-1)[xm.axis]) == len(xm.ids):
        az.fixup(node, "resize_sizes", [xm.ids], axis=xm.axis)
        az.set_map(node.outputs[0], xm)
    else:
        az.block(xm.ids, f"{node.op} {node.name} may rescale the channel axis")


def pad(az: Analyzer, node: gs.Node) -> None:
    xm, rank = az.map(_first(node)), az.rank(_first(node))
    if xm is None:
        return
    pads = az.const(_opt(node, 1))
    axes = _ints(az, node, 3, "__none__")
    if pads is None or rank is None:
        az.block(xm.ids, f"Pad {node.name} pads are computed at runtime")
        return
    pads = pads.reshape(-1).tolist()
    axes = list(range(rank)) if axes is None else [a + rank if a < 0 else a for a in axes]
    n = len(axes)
    for k, a in enumerate(axes):
        if a == xm.axis and (pads[k] != 0 or pads[k + n] != 0):
            az.block(xm.ids, f"Pad {node.name} pads the channel axis")
            return
    az.set_map(node.outputs[0], xm)


# --- index-remapping ops ---------------------------------------------------------------


def concat(az: Analyzer, node: gs.Node) -> None:
    maps = [az.map(t) for t in node.inputs]
    if all(m is None for m in maps):
        return
    rank = az.rank(node.outputs[0]) or next(az.rank(t) for t, m in zip(node.inputs, maps) if m is not None)
    axis = int(node.attrs.get("axis", 0))
    axis = axis + rank if rank is not None and axis < 0 else axis
    if any(m is not None and m.axis != axis for m in maps):
        broadcast(az, node)
        return
    sizes: list[int] = []
    for t, m in zip(node.inputs, maps):
        dims = az.shape(t)
        size = len(m.ids) if m is not None else (dims[axis] if dims is not None else None)
        if not isinstance(size, int):
            for mm in maps:
                if mm is not None:
                    az.block(mm.ids, f"Concat {node.name}: size of {t.name} unknown")
            return
        sizes.append(size)
    ids = ConcatMapping(tuple(sizes)).apply([m.ids if m is not None else None for m in maps])
    az.set_map(node.outputs[0], ChannelMap(axis, ids))


def split(az: Analyzer, node: gs.Node) -> None:
    xm, rank = az.map(_first(node)), az.rank(_first(node))
    if xm is None:
        return
    axis = int(node.attrs.get("axis", 0))
    axis = axis + rank if rank is not None and axis < 0 else axis
    if axis != xm.axis:
        for out in node.outputs:
            az.set_map(out, xm)
        return
    computed = _runtime_ints(az, node, 1)
    sizes = [int(v) for v in computed.reshape(-1)] if computed is not None else _ints(az, node, 1, "split")
    n_out = len(node.outputs)
    total = len(xm.ids)
    if sizes is None and _opt(node, 1) is not None:
        az.block(xm.ids, f"Split {node.name} sizes are computed at runtime")
        return
    az.pinned.add((node.name, 1, -1))
    if sizes is None:
        if total % n_out:
            az.block(xm.ids, f"Split {node.name}: uneven implicit split")
            return
        sizes = [total // n_out] * n_out
    parts, start = [], 0
    for out, size in zip(node.outputs, sizes):
        part = SliceMapping(start, start + size).apply(xm.ids)
        parts.append(part)
        az.set_map(out, ChannelMap(axis, part))
        start += size
    az.fixup(node, "split", parts)


def _runtime_ints(az: Analyzer, node: gs.Node, i: int) -> np.ndarray | None:
    """A constant input, or one computed from shapes whose value folding found (``x.chunk(2)`` bounds)."""
    t = _opt(node, i)
    if t is None:
        return None
    value = az.const(t)
    return value if value is not None else az.folded.get(t.name)


def slice_(az: Analyzer, node: gs.Node) -> None:
    """Slice: channels kept ``start:stop`` on the channel axis. Bounds computed from shapes (PyTorch's
    ``chunk``) are read from folding and become constants when the cut changes them."""
    xm, dims = az.map(_first(node)), az.shape(_first(node))
    if xm is None:
        return
    starts, ends = _runtime_ints(az, node, 1), _runtime_ints(az, node, 2)
    axes_t, steps_t = _opt(node, 3), _opt(node, 4)
    axes = az.const(axes_t) if axes_t is not None else None
    steps = az.const(steps_t) if steps_t is not None else None
    if starts is None or ends is None or (axes_t is not None and axes is None) or (steps_t is not None and steps is None):
        az.block(xm.ids, f"Slice {node.name} bounds are computed at runtime")
        return
    rank = len(dims) if dims is not None else None
    axes_l = list(range(len(starts))) if axes is None else [int(a) + (rank or 0) if a < 0 else int(a) for a in axes]
    if xm.axis not in axes_l:
        az.set_map(node.outputs[0], xm)
        return
    k = axes_l.index(xm.axis)
    step = 1 if steps is None else int(steps.reshape(-1)[k])
    start, stop, _ = slice(int(starts.reshape(-1)[k]), int(ends.reshape(-1)[k]), step).indices(len(xm.ids))
    if step != 1:
        az.block(xm.ids, f"Slice {node.name} strides over the channel axis")
        return
    out_ids = SliceMapping(start, stop).apply(xm.ids)
    az.fixup(node, "slice", [xm.ids, out_ids], index=k, start=start, starts=starts.reshape(-1).copy(),
             ends=ends.reshape(-1).copy())
    az.pinned.update({(node.name, 1, -1), (node.name, 2, -1)})
    az.set_map(node.outputs[0], ChannelMap(xm.axis, out_ids))


def flatten(az: Analyzer, node: gs.Node) -> None:
    """Flatten to 2-D: channels before ``axis`` land on output axis 0 (the opset-13 Softmax rewrite of
    attention scores), channels after it on axis 1 (a CNN head); each owns a block of positions."""
    xm, dims = az.map(_first(node)), az.shape(_first(node))
    if xm is None:
        return
    axis = int(node.attrs.get("axis", 1))
    rank = len(dims) if dims is not None else None
    axis = axis + rank if rank is not None and axis < 0 else axis
    if dims is None:
        az.block(xm.ids, f"Flatten {node.name}: input shape unknown")
        return
    lo, hi = (0, axis) if xm.axis < axis else (axis, len(dims))
    if not _static(dims[lo:hi]):
        az.block(xm.ids, f"Flatten {node.name} needs static shapes around the channel axis (pass --shape)")
        return
    inner = int(np.prod(dims[xm.axis + 1 : hi], dtype=np.int64))
    outer = int(np.prod(dims[lo : xm.axis], dtype=np.int64))
    ids = np.tile(RepeatMapping(inner).apply(xm.ids), outer)
    az.set_map(node.outputs[0], ChannelMap(0 if xm.axis < axis else 1, ids))


def reshape(az: Analyzer, node: gs.Node) -> None:
    """Reshapes that keep the channel axis, merge it with the dims after it (flatten style), or split it
    into several axes (attention heads, channel shuffle: see :func:`_reshape_split`)."""
    xm, dims = az.map(_first(node)), az.shape(_first(node))
    if xm is None:
        return
    out_dims = az.shape(node.outputs[0])
    if dims is None or out_dims is None or not _static(dims) or not _static(out_dims):
        az.block(xm.ids, f"Reshape {node.name} needs static shapes (pass --shape)")
        return
    c, n = xm.axis, len(xm.ids)
    pre = int(np.prod(dims[:c], dtype=np.int64))
    post = int(np.prod(dims[c + 1 :], dtype=np.int64))
    starts = [o for o in range(len(out_dims)) if int(np.prod(out_dims[:o], dtype=np.int64)) == pre]
    for o in starts:
        for j in range(c + 1, len(dims) + 1):
            inner = int(np.prod(dims[c + 1 : j], dtype=np.int64))
            if out_dims[o] == n * inner:
                ids = RepeatMapping(inner).apply(xm.ids)
                if _shape_fixup(az, node, o, ids, same_axis=(o == c and inner == 1)):
                    az.set_map(node.outputs[0], ChannelMap(o, ids))
                return
    merged = _merge_with_outer(dims, out_dims, c)
    if merged is not None:  # per-head dims merged back: [.., h, d] -> [.., h*d]
        o, outer = merged
        ids = np.tile(xm.ids, outer)
        if _shape_fixup(az, node, o, ids, same_axis=False):
            az.set_map(node.outputs[0], ChannelMap(o, ids))
        return
    for o in starts:
        for e in range(o + 2, len(out_dims) + 1):
            sizes = [int(d) for d in out_dims[o:e]]
            if int(np.prod(sizes)) == n and int(np.prod(out_dims[e:], dtype=np.int64)) == post:
                _reshape_split(az, node, xm, o, tuple(sizes))
                return
    az.block(xm.ids, f"Reshape {node.name} reorders the channel axis in a way the analysis does not follow")


def _merge_with_outer(dims: list[int], out_dims: list[int], c: int) -> tuple[int, int] | None:
    """(output axis, outer count) when the last-axis channels merge with the non-batch axes just before
    them ([B, T, h, d] → [B, T, h*d]); the batch axis is never merged (its size is not known)."""
    if c != len(dims) - 1:
        return None
    for a in range(c - 1, 0, -1):
        pre = int(np.prod(dims[:a], dtype=np.int64))
        size = int(np.prod(dims[a:], dtype=np.int64))
        for o in range(1, len(out_dims)):
            if int(np.prod(out_dims[:o], dtype=np.int64)) == pre and o == len(out_dims) - 1 and out_dims[o] == size:
                return o, int(np.prod(dims[a:c], dtype=np.int64))
    return None


def _reshape_split(az: Analyzer, node: gs.Node, xm: ChannelMap, o: int, sizes: tuple[int, ...]) -> None:
    """Split the channel axis into ``sizes`` (output axes ``o..``). The ids go on one new axis and are
    coupled along the others: the head axis for attention ([3,] heads, head_dim: whole heads are
    pruned), the inner axis for a channel shuffle (every shuffle group loses the same offsets)."""
    mapping = SplitAxisMapping(sizes)
    per_dim = az.options.heads == "dims"
    k = len(sizes) - 1 if per_dim or _is_shuffle(node, o, len(sizes)) else len(sizes) - 2
    stacks = _stack_axes(az, node.outputs[0], o, len(sizes))
    while k in stacks and k + 1 < len(sizes):
        k += 1
    if k in stacks:
        az.block(xm.ids, f"Reshape {node.name} splits them into axes that are later indexed")
        return
    ids = mapping.ids_on(xm.ids, k)
    if ids is None:
        cols = mapping.ties(xm.ids, k)
        ids = cols[0]
        for col in cols[1:]:
            ids = az.couple(ids, col, f"Reshape {node.name} splits them into axes shared with unprunable channels")
    if _shape_fixup(az, node, o + k, ids, same_axis=False):
        az.set_map(node.outputs[0], ChannelMap(o + k, ids))


STACK_LOOKAHEAD = 6


def _stack_axes(az: Analyzer, t: gs.Tensor, o: int, count: int) -> set[int]:
    """Which of the new axes ``o..o+count`` are later taken apart (Gather/Split/Slice on them), like the
    q/k/v axis of a fused projection ([.., 3, D]): the ids must not live there.

    Follows the tensor through Transpose/Unsqueeze (moving the axes) a few steps ahead.
    """
    stacks: set[int] = set()
    frontier = [(t, {o + k: k for k in range(count)}, 0)]
    while frontier:
        tensor, axes, depth = frontier.pop()
        if depth > STACK_LOOKAHEAD:
            continue
        for user in tensor.outputs:
            if not user.inputs or user.inputs[0] is not tensor:
                continue
            if user.op == "Transpose" and user.attrs.get("perm") is not None:
                perm = list(user.attrs["perm"])
                frontier.append((user.outputs[0], {perm.index(a): k for a, k in axes.items()}, depth + 1))
            elif user.op == "Unsqueeze":
                inserted = _ints(az, user, 1, "axes")
                rank = az.rank(user.outputs[0])
                if inserted is None or rank is None:
                    continue
                inserted = sorted(a + rank if a < 0 else a for a in inserted)
                kept = [i for i in range(rank) if i not in inserted]
                frontier.append((user.outputs[0], {kept[a]: k for a, k in axes.items()}, depth + 1))
            elif user.op == "Squeeze":
                removed = _ints(az, user, 1, "axes")
                rank = az.rank(tensor)
                if removed is None or rank is None:
                    continue
                removed = [a + rank if a < 0 else a for a in removed]
                moved = {a - sum(1 for r in removed if r < a): k for a, k in axes.items() if a not in removed}
                frontier.append((user.outputs[0], moved, depth + 1))
            elif user.op in ("Gather", "Split"):
                rank = az.rank(tensor)
                axis = int(user.attrs.get("axis", 0))
                axis = axis + rank if rank is not None and axis < 0 else axis
                if axis in axes:
                    stacks.add(axes[axis])
            elif user.op == "Slice":
                sliced = _ints(az, user, 3, "__none__")
                rank = az.rank(tensor)
                if sliced is not None and rank is not None:
                    stacks.update(axes[a + rank if a < 0 else a] for a in sliced if (a + rank if a < 0 else a) in axes)
    return stacks


def _is_shuffle(node: gs.Node, o: int, count: int) -> bool:
    """A Reshape whose only consumer is a Transpose permuting just the new axes (ShuffleNet's shuffle)."""
    users = node.outputs[0].outputs
    if len(users) != 1 or users[0].op != "Transpose" or users[0].attrs.get("perm") is None:
        return False
    perm = list(users[0].attrs["perm"])
    inside = range(o, o + count)
    return all(perm[i] == i for i in range(len(perm)) if i not in inside) and any(perm[i] != i for i in inside)


def _shape_fixup(az: Analyzer, node: gs.Node, index: int, ids: np.ndarray, *, same_axis: bool) -> bool:
    """Record the edit of a Reshape target's entry ``index`` (which counts ``ids``); block if impossible.

    The entry may be a constant, or an element of a Concat of constants and runtime dims (Paddle,
    TorchScript); 0 (copy) is fine where the input's own channel axis is copied, -1 always is, and a
    runtime dim is fine when it reads a tensor whose axis carries exactly these channels.
    """
    src = shape_source(az, node, 1, index)
    if src is None:
        az.block(ids, f"Reshape {node.name} gets its channel count from a shape computation the analysis cannot follow")
        return False
    if src.of is not None:
        m = az.map(src.of)
        if m is None or m.axis != src.dim or az.proportion(m.ids, ids) != src.divisor:
            if src.piece is None:
                az.block(ids, f"Reshape {node.name} takes its channel count from the shape of {src.of.name}")
                return False
            # timm-style merge reshape(B, N, C) with C read from the residual stream: pin it to the kept count
            az.fixup(src.piece[0], "shape_pin", [ids], input=src.piece[1])
            az.pinned.add((node.name, 1, index))
    elif src.value > 0:
        az.fixup(src.owner, "shape_value", [ids], input=src.input, position=src.position)
    elif src.value == 0 and not same_axis:
        az.block(ids, f"Reshape {node.name} copies (0) a dim that the channels do not own")
        return False
    return True


def transpose(az: Analyzer, node: gs.Node) -> None:
    xm, rank = az.map(_first(node)), az.rank(_first(node))
    if xm is None:
        return
    perm = node.attrs.get("perm")
    perm = list(perm) if perm is not None else (list(range(rank))[::-1] if rank is not None else None)
    if perm is None:
        az.block(xm.ids, f"Transpose {node.name}: rank unknown")
        return
    az.set_map(node.outputs[0], ChannelMap(perm.index(xm.axis), xm.ids))


def squeeze(az: Analyzer, node: gs.Node) -> None:
    xm, rank = az.map(_first(node)), az.rank(_first(node))
    if xm is None:
        return
    axes = _ints(az, node, 1, "axes")
    if axes is None or rank is None:
        az.block(xm.ids, f"Squeeze {node.name} axes unknown")
        return
    axes = [a + rank if a < 0 else a for a in axes]
    if xm.axis in axes:
        az.block(xm.ids, f"Squeeze {node.name} removes the channel axis")
        return
    az.set_map(node.outputs[0], ChannelMap(xm.axis - sum(1 for a in axes if a < xm.axis), xm.ids))


def unsqueeze(az: Analyzer, node: gs.Node) -> None:
    xm, rank = az.map(_first(node)), az.rank(_first(node))
    if xm is None:
        return
    axes = _ints(az, node, 1, "axes")
    if axes is None or rank is None:
        az.block(xm.ids, f"Unsqueeze {node.name} axes unknown")
        return
    out_rank = rank + len(axes)
    axes = {a + out_rank if a < 0 else a for a in axes}
    remaining = [i for i in range(out_rank) if i not in axes]
    az.set_map(node.outputs[0], ChannelMap(remaining[xm.axis], xm.ids))


def gather(az: Analyzer, node: gs.Node) -> None:
    """Gather passes channels that are not on the gathered axis; Gather from a constant float table
    [V, D] on axis 0 is an embedding lookup, a producer of D channels."""
    xm, rank = az.map(_first(node)), az.rank(_first(node))
    table = az.const(_first(node))
    if (table is not None and table.ndim == 2 and np.issubdtype(table.dtype, np.floating) and table.shape[1] > 1
            and int(node.attrs.get("axis", 0)) == 0 and az.map(node.inputs[1]) is None):
        out_rank = az.rank(node.outputs[0])
        if out_rank is None:
            return
        ids = az.new_ids(int(table.shape[1]), node)
        az.site(_first(node), 1, ids, node, "out")
        az.set_map(node.outputs[0], ChannelMap(out_rank - 1, ids))
        return
    if az.map(node.inputs[1]) is not None:
        az.block(az.map(node.inputs[1]).ids, f"Gather {node.name} uses channel values as indices")
    if xm is None:
        return
    axis = int(node.attrs.get("axis", 0))
    axis = axis + rank if rank is not None and axis < 0 else axis
    idx_rank = az.rank(node.inputs[1])
    if rank is None or idx_rank is None or axis == xm.axis:
        az.block(xm.ids, f"Gather {node.name} indexes the channel axis")
        return
    out_axis = xm.axis if xm.axis < axis else xm.axis + idx_rank - 1
    az.set_map(node.outputs[0], ChannelMap(out_axis, xm.ids))


def expand(az: Analyzer, node: gs.Node) -> None:
    """Expand broadcasts other axes; the channel axis keeps its size (it may move right as rank grows)."""
    xm, rank, out_rank = az.map(_first(node)), az.rank(_first(node)), az.rank(node.outputs[0])
    if xm is None:
        return
    out_dims = az.shape(node.outputs[0])
    if rank is None or out_rank is None or out_dims is None or out_dims[xm.axis + out_rank - rank] != len(xm.ids):
        az.block(xm.ids, f"Expand {node.name}: output shape unknown")
        return
    az.set_map(node.outputs[0], ChannelMap(xm.axis + out_rank - rank, xm.ids))


def tile(az: Analyzer, node: gs.Node) -> None:
    xm = az.map(_first(node))
    if xm is None:
        return
    repeats = az.const(_opt(node, 1))
    if repeats is None or int(repeats.reshape(-1)[xm.axis]) != 1:
        az.block(xm.ids, f"Tile {node.name} repeats the channel axis")
        return
    az.set_map(node.outputs[0], xm)


def recurrent(az: Analyzer, node: gs.Node) -> None:
    """LSTM/GRU/RNN pack every gate's hidden units into one weight: not pruned, their inputs blocked."""
    az.block_inputs(node, f"{node.op} {node.name} not understood: recurrent layers are not pruned (gates pack the hidden units)")


def control_flow(az: Analyzer, node: gs.Node) -> None:
    """If/Loop/Scan bodies are not analyzed: every channel tensor they read (inputs or outer scope) stays."""
    az.block_inputs(node, f"{node.op} {node.name} not understood: control-flow bodies are not analyzed")
