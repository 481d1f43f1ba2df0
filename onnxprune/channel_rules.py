"""Per-op channel propagation rules for :mod:`onnxprune.groups`.

Each rule reads the :class:`~onnxprune.groups.ChannelMap` of a node's inputs and either sets the
maps of its outputs (recording the weights to slice and the fixups a cut needs) or blocks the ids it
cannot follow, always with a reason. An op without a rule blocks its inputs (the driver's policy).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.groups import Analyzer, ChannelMap, RuleRegistry
from onnxprune.index_mapping import FIXED, ConcatMapping, RepeatMapping, SliceMapping

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
        grouped_conv(az, node, xm, w_t, group)
        return
    az.site(w_t, 0, ids, node, "out")
    if b_t is not None:
        az.site(b_t, 0, ids, node, "param")
    az.set_map(node.outputs[0], ChannelMap(1, ids))


def grouped_conv(az: Analyzer, node: gs.Node, xm: ChannelMap | None, w_t: gs.Tensor, group: int) -> None:
    """Grouped (not depthwise) Conv: its output channels stay; its inputs are blocked (issue 3 extends)."""
    reason = f"grouped Conv {node.name} (group={group}) is not pruned across groups"
    if xm is not None:
        az.block(xm.ids, reason)
    ids = az.new_ids(int(az.const(w_t).shape[0]), node)
    az.block(ids, reason)


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
        reason = f"grouped ConvTranspose {node.name} (group={group}) is not pruned"
        az.block_inputs(node, reason)
        return
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
    a_t, b_t = node.inputs
    b = az.const(b_t)
    if b is None or b.ndim != 2 or az.map(b_t) is not None:
        az.block_inputs(node, f"MatMul {node.name} multiplies two computed tensors")
        return
    am, rank = az.map(a_t), az.rank(a_t)
    if am is not None and (rank is None or am.axis != rank - 1):
        az.block(am.ids, f"MatMul {node.name} reads features on another axis")
        am = None
    if am is not None:
        az.site(b_t, 0, am.ids, node, "in")
    ids = az.new_ids(int(b.shape[1]), node)
    az.site(b_t, 1, ids, node, "out")
    out_rank = az.rank(node.outputs[0]) or rank
    if out_rank is None:
        az.block(ids, f"MatMul {node.name} output rank unknown")
        return
    az.set_map(node.outputs[0], ChannelMap(out_rank - 1, ids))


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
    """LayerNormalization over axes that do not hold the channels passes them through."""
    xm, rank = az.map(_first(node)), az.rank(_first(node))
    if xm is None:
        return
    axis = int(node.attrs.get("axis", -1))
    axis = axis + rank if rank is not None and axis < 0 else axis
    if rank is None or xm.axis >= axis:
        az.block(xm.ids, f"LayerNormalization {node.name} normalizes over the channel axis")
        return
    az.set_map(node.outputs[0], xm)


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
        if dim == len(ids) and az.const(t) is not None:
            az.site(t, local, ids, node, "param")
        else:
            az.block(ids, f"{node.op} {node.name} combines them with {t.name}, which has no prunable channels")
    az.set_map(out, ChannelMap(axis, ids))


def reduce(az: Analyzer, node: gs.Node) -> None:
    xm, rank = az.map(_first(node)), az.rank(_first(node))
    if xm is None:
        return
    axes = _ints(az, node, 1, "axes")
    if axes is None or rank is None:
        az.block(xm.ids, f"{node.op} {node.name} reduces over unknown axes")
        return
    axes = sorted(a + rank if a < 0 else a for a in axes)
    if xm.axis in axes or not axes:
        az.block(xm.ids, f"{node.op} {node.name} reduces over the channel axis")
        return
    keep = int(node.attrs.get("keepdims", 1))
    axis = xm.axis if keep else xm.axis - sum(1 for a in axes if a < xm.axis)
    az.set_map(node.outputs[0], ChannelMap(axis, xm.ids))


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
    sizes = _ints(az, node, 1, "split")
    n_out = len(node.outputs)
    total = len(xm.ids)
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


def slice_(az: Analyzer, node: gs.Node) -> None:
    xm, dims = az.map(_first(node)), az.shape(_first(node))
    if xm is None:
        return
    starts, ends = az.const(_opt(node, 1)), az.const(_opt(node, 2))
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
    start, stop, _ = slice(int(starts[k]), int(ends[k]), step).indices(len(xm.ids))
    if step != 1:
        az.block(xm.ids, f"Slice {node.name} strides over the channel axis")
        return
    out_ids = SliceMapping(start, stop).apply(xm.ids)
    az.fixup(node, "slice", [xm.ids, out_ids], index=k, start=start)
    az.set_map(node.outputs[0], ChannelMap(xm.axis, out_ids))


def flatten(az: Analyzer, node: gs.Node) -> None:
    xm, dims = az.map(_first(node)), az.shape(_first(node))
    if xm is None:
        return
    axis = int(node.attrs.get("axis", 1))
    rank = len(dims) if dims is not None else None
    axis = axis + rank if rank is not None and axis < 0 else axis
    if dims is None or xm.axis < axis or not _static(dims[axis:]):
        az.block(xm.ids, f"Flatten {node.name} needs static shapes after the channel axis (pass --shape)")
        return
    inner = int(np.prod(dims[xm.axis + 1 :], dtype=np.int64))
    outer = int(np.prod(dims[axis : xm.axis], dtype=np.int64))
    ids = np.tile(RepeatMapping(inner).apply(xm.ids), outer)
    az.set_map(node.outputs[0], ChannelMap(1, ids))


def reshape(az: Analyzer, node: gs.Node) -> None:
    """Reshapes that keep the channel axis or merge it with the dims after it (flatten style)."""
    xm, dims = az.map(_first(node)), az.shape(_first(node))
    if xm is None:
        return
    target = az.const(node.inputs[1])
    out_dims = az.shape(node.outputs[0])
    if target is None or dims is None or out_dims is None or not _static(dims) or not _static(out_dims):
        az.block(xm.ids, f"Reshape {node.name} needs a constant target and static shapes (pass --shape)")
        return
    c = xm.axis
    pre = int(np.prod(dims[:c], dtype=np.int64))
    for o in range(len(out_dims)):
        if int(np.prod(out_dims[:o], dtype=np.int64)) != pre:
            continue
        for j in range(c + 1, len(dims) + 1):
            inner = int(np.prod(dims[c + 1 : j], dtype=np.int64))
            if out_dims[o] == len(xm.ids) * inner:
                ids = RepeatMapping(inner).apply(xm.ids)
                value = int(target.reshape(-1)[o]) if o < target.size else -1
                if value > 0:
                    az.fixup(node, "reshape", [ids], index=o)
                az.set_map(node.outputs[0], ChannelMap(o, ids))
                return
    az.block(xm.ids, f"Reshape {node.name} splits or reorders the channel axis")


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
    xm, rank = az.map(_first(node)), az.rank(_first(node))
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
