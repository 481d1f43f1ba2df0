"""Index-remapping ops: Concat, Split, Slice, Flatten, Reshape, Transpose, Squeeze, Gather, Expand, Tile."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.analysis.analyzer import Analyzer
from onnxprune.analysis.core import ChannelMap, FixupKind, SiteRole
from onnxprune.analysis.graph import optional_input
from onnxprune.analysis.index_mapping import (
    ConcatMapping,
    GroupedMapping,
    RepeatMapping,
    SliceMapping,
    SplitAxisMapping,
)
from onnxprune.analysis.rules._common import (
    first_input,
    int_list,
    is_static,
    runtime_ints,
)
from onnxprune.analysis.rules.elementwise import broadcast
from onnxprune.analysis.shape_reads import shape_source


def concat(az: Analyzer, node: gs.Node) -> None:
    maps = [az.map(t) for t in node.inputs]
    if all(m is None for m in maps):
        return
    rank = az.rank(node.outputs[0]) or next(az.rank(t) for t, m in zip(node.inputs, maps) if m is not None)
    axis = int(node.attrs.get("axis", 0))
    axis = axis + rank if rank is not None and axis < 0 else axis
    if any(m is not None and m.axis != axis for m in maps):
        _cache_input_maps(az, node, maps)
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


def _cache_input_maps(az: Analyzer, node: gs.Node, maps: list[ChannelMap | None]) -> None:
    """A KV cache's past (a graph input, see ``graph.find_cache_io``) concatenated with the new keys on
    the sequence axis carries the same heads: give it their map, so that it shrinks with them."""
    mapped = next(m for m in maps if m is not None)
    for t, m in zip(node.inputs, maps):
        dims = az.shape(t)
        if m is None and t.name in az.cache_io and dims is not None and len(dims) > mapped.axis \
                and dims[mapped.axis] == len(mapped.ids):
            az.set_map(t, ChannelMap(mapped.axis, mapped.ids.copy()))


def split(az: Analyzer, node: gs.Node) -> None:
    xm, rank = az.map(first_input(node)), az.rank(first_input(node))
    if xm is None:
        return
    axis = int(node.attrs.get("axis", 0))
    axis = axis + rank if rank is not None and axis < 0 else axis
    if axis != xm.axis:
        for out in node.outputs:
            az.set_map(out, xm)
        return
    computed = runtime_ints(az, node, 1)
    sizes = [int(v) for v in computed.reshape(-1)] if computed is not None else int_list(az, node, 1, "split")
    n_out = len(node.outputs)
    total = len(xm.ids)
    if sizes is None and optional_input(node, 1) is not None:
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
    az.fixup(node, FixupKind.SPLIT, parts)


def slice_(az: Analyzer, node: gs.Node) -> None:
    """Slice: channels kept ``start:stop`` on the channel axis. Bounds computed from shapes (PyTorch's
    ``chunk``) are read from folding and become constants when the cut changes them."""
    xm, dims = az.map(first_input(node)), az.shape(first_input(node))
    if xm is None:
        return
    starts, ends = runtime_ints(az, node, 1), runtime_ints(az, node, 2)
    axes_t, steps_t = optional_input(node, 3), optional_input(node, 4)
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
    az.fixup(node, FixupKind.SLICE, [xm.ids, out_ids], index=k, start=start, starts=starts.reshape(-1).copy(),
             ends=ends.reshape(-1).copy())
    az.pinned.update({(node.name, 1, -1), (node.name, 2, -1)})
    az.set_map(node.outputs[0], ChannelMap(xm.axis, out_ids))


def flatten(az: Analyzer, node: gs.Node) -> None:
    """Flatten to 2-D: channels before ``axis`` land on output axis 0 (the opset-13 Softmax rewrite of
    attention scores), channels after it on axis 1 (a CNN head); each owns a block of positions."""
    xm, dims = az.map(first_input(node)), az.shape(first_input(node))
    if xm is None:
        return
    axis = int(node.attrs.get("axis", 1))
    rank = len(dims) if dims is not None else None
    axis = axis + rank if rank is not None and axis < 0 else axis
    if dims is None:
        az.block(xm.ids, f"Flatten {node.name}: input shape unknown")
        return
    lo, hi = (0, axis) if xm.axis < axis else (axis, len(dims))
    if not is_static(dims[lo:hi]):
        az.block(xm.ids, f"Flatten {node.name} needs static shapes around the channel axis (pass --shape)")
        return
    inner = int(np.prod(dims[xm.axis + 1 : hi], dtype=np.int64))
    outer = int(np.prod(dims[lo : xm.axis], dtype=np.int64))
    ids = np.tile(RepeatMapping(inner).apply(xm.ids), outer)
    az.set_map(node.outputs[0], ChannelMap(0 if xm.axis < axis else 1, ids))


def reshape(az: Analyzer, node: gs.Node) -> None:
    """Reshapes that keep the channel axis, merge it with the dims after it (flatten style), or split it
    into several axes (attention heads, channel shuffle: see :func:`_reshape_split`)."""
    xm, dims = az.map(first_input(node)), az.shape(first_input(node))
    if xm is None:
        return
    out_dims = az.shape(node.outputs[0])
    if dims is None or out_dims is None or not is_static(dims) or not is_static(out_dims):
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
    if _unflatten(az, node, xm, dims, out_dims):
        return
    for o in starts:
        for e in range(o + 2, len(out_dims) + 1):
            sizes = [int(d) for d in out_dims[o:e]]
            if int(np.prod(sizes)) == n and int(np.prod(out_dims[e:], dtype=np.int64)) == post:
                _reshape_split(az, node, xm, o, tuple(sizes))
                return
    if _group_blocks(az, node, xm, dims, out_dims):
        return
    az.block(xm.ids, f"Reshape {node.name} reorders the channel axis in a way the analysis does not follow")


def _group_blocks(az: Analyzer, node: gs.Node, xm: ChannelMap, dims: list[int], out_dims: list[int]) -> bool:
    """GroupNorm exported as InstanceNormalization (torch): ``[N, C, *S] → [N, G, C/G·prod(S)]`` makes each
    block of C/G consecutive channels one position of the group axis (they are coupled: only whole groups
    go), and ``[N, G, K] → [N, C, *S]`` spreads the groups back. False when ``node`` is neither."""
    c, n = xm.axis, len(xm.ids)
    if list(out_dims[:c]) != list(dims[:c]):
        return False
    tail = int(np.prod(dims[c + 1 :], dtype=np.int64))
    if len(out_dims) == c + 2 and n % out_dims[c] == 0 and out_dims[c + 1] == n // out_dims[c] * tail:
        blocks = np.stack(GroupedMapping(int(out_dims[c])).blocks(xm.ids))
        ids = blocks[:, 0]
        for col in blocks[:, 1:].T:
            ids = az.couple(ids, col, f"Reshape {node.name} groups them with unprunable channels")
        ok = _shape_fixup(az, node, c, ids, same_axis=False)
    elif len(dims) == c + 2 and out_dims[c] % n == 0 and dims[c + 1] * n == out_dims[c] * int(
            np.prod(out_dims[c + 1 :], dtype=np.int64)):
        ids = RepeatMapping(int(out_dims[c]) // n).apply(xm.ids)
        ok = _shape_fixup(az, node, c, ids, same_axis=False)
    else:
        return False
    if ok:
        az.set_map(node.outputs[0], ChannelMap(c, ids))
    return True


def _unflatten(az: Analyzer, node: gs.Node, xm: ChannelMap, dims: list[int], out_dims: list[int]) -> bool:
    """Channels that own blocks of ``S`` consecutive positions on the last axis (a flatten-style merge, such as
    GroupNorm(1, C) exported as ``[N, 1, C·S]``) spread back to ``[.., C, *S]``: one position per channel."""
    a, n = xm.axis, len(xm.ids)
    if a != len(dims) - 1:
        return False
    pre = int(np.prod(dims[:a], dtype=np.int64))
    for o in range(len(out_dims) - 1):
        inner = int(np.prod(out_dims[o + 1 :], dtype=np.int64))
        if int(np.prod(out_dims[:o], dtype=np.int64)) == pre and out_dims[o] * inner == n and inner > 1:
            blocks = xm.ids.reshape(out_dims[o], inner)
            if not np.all(blocks == blocks[:, :1]):
                continue  # a size-1 axis before the channels (batch 1): the next start is theirs
            if _shape_fixup(az, node, o, blocks[:, 0].copy(), same_axis=False):
                az.set_map(node.outputs[0], ChannelMap(o, blocks[:, 0].copy()))
            return True
    return False


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
                inserted = int_list(az, user, 1, "axes")
                rank = az.rank(user.outputs[0])
                if inserted is None or rank is None:
                    continue
                inserted = sorted(a + rank if a < 0 else a for a in inserted)
                kept = [i for i in range(rank) if i not in inserted]
                frontier.append((user.outputs[0], {kept[a]: k for a, k in axes.items()}, depth + 1))
            elif user.op == "Squeeze":
                removed = int_list(az, user, 1, "axes")
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
                sliced = int_list(az, user, 3, "__none__")
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
        follows = m is not None and m.axis == src.dim and (
            az.proportion(m.ids, ids) == src.divisor if src.multiplier == 1
            else src.divisor == 1 and az.proportion(ids, m.ids) == src.multiplier)
        if not follows:
            if src.piece is None:
                az.block(ids, f"Reshape {node.name} takes its channel count from the shape of {src.of.name}")
                return False
            # timm-style merge reshape(B, N, C) with C read from the residual stream: pin it to the kept count,
            # also when only the stream is cut (the runtime read would then give the stream's kept count)
            read = [m.ids] if m is not None else []
            az.fixup(src.piece[0], FixupKind.SHAPE_PIN, [ids, *read], input=src.piece[1])
            az.pinned.add((node.name, 1, index))
    elif src.value > 0:
        az.fixup(src.owner, FixupKind.SHAPE_VALUE, [ids], input=src.input, position=src.position)
    elif src.value == 0 and not same_axis:
        az.block(ids, f"Reshape {node.name} copies (0) a dim that the channels do not own")
        return False
    return True


def transpose(az: Analyzer, node: gs.Node) -> None:
    xm, rank = az.map(first_input(node)), az.rank(first_input(node))
    if xm is None:
        return
    perm = node.attrs.get("perm")
    perm = list(perm) if perm is not None else (list(range(rank))[::-1] if rank is not None else None)
    if perm is None:
        az.block(xm.ids, f"Transpose {node.name}: rank unknown")
        return
    az.set_map(node.outputs[0], ChannelMap(perm.index(xm.axis), xm.ids))


def squeeze(az: Analyzer, node: gs.Node) -> None:
    xm, rank = az.map(first_input(node)), az.rank(first_input(node))
    if xm is None:
        return
    axes = int_list(az, node, 1, "axes")
    if axes is None or rank is None:
        az.block(xm.ids, f"Squeeze {node.name} axes unknown")
        return
    axes = [a + rank if a < 0 else a for a in axes]
    if xm.axis in axes:
        az.block(xm.ids, f"Squeeze {node.name} removes the channel axis")
        return
    az.set_map(node.outputs[0], ChannelMap(xm.axis - sum(1 for a in axes if a < xm.axis), xm.ids))


def unsqueeze(az: Analyzer, node: gs.Node) -> None:
    xm, rank = az.map(first_input(node)), az.rank(first_input(node))
    if xm is None:
        return
    axes = int_list(az, node, 1, "axes")
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
    xm, rank = az.map(first_input(node)), az.rank(first_input(node))
    table = az.const(first_input(node))
    if (table is not None and table.ndim == 2 and np.issubdtype(table.dtype, np.floating) and table.shape[1] > 1
            and int(node.attrs.get("axis", 0)) == 0 and az.map(node.inputs[1]) is None):
        out_rank = az.rank(node.outputs[0])
        if out_rank is None:
            return
        ids = az.new_ids(int(table.shape[1]), node)
        az.site(first_input(node), 1, ids, node, SiteRole.OUT)
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
    xm, rank, out_rank = az.map(first_input(node)), az.rank(first_input(node)), az.rank(node.outputs[0])
    if xm is None:
        return
    out_dims = az.shape(node.outputs[0])
    if rank is None or out_rank is None or out_dims is None or out_dims[xm.axis + out_rank - rank] != len(xm.ids):
        az.block(xm.ids, f"Expand {node.name}: output shape unknown")
        return
    if _expand_target_fixup(az, node, xm.ids, xm.axis + out_rank - rank, out_rank):
        az.set_map(node.outputs[0], ChannelMap(xm.axis + out_rank - rank, xm.ids))


def _expand_target_fixup(az: Analyzer, node: gs.Node, ids: np.ndarray, axis: int, out_rank: int) -> bool:
    """The target's entry on the channel axis: 1 or -1 follow the input; a constant count (repeat_kv's
    ``expand(b, kv_heads, n_rep, t, d)`` traced with numbers) is rewritten to the kept count; a count read
    by ``Shape`` is checked by ``check_shape_reads``. Anything else blocks: the cut would broadcast."""
    length = az.shape(node.inputs[1])
    if not length or not isinstance(length[0], int) or axis - (out_rank - length[0]) < 0:
        return True
    pos = axis - (out_rank - length[0])
    entry = shape_source(az, node, 1, pos)
    if entry is not None and entry.of is None and entry.value > 1:
        az.fixup(entry.owner, FixupKind.SHAPE_VALUE, [ids], input=entry.input, position=entry.position)
        return True
    if entry is not None:
        return True
    folded = runtime_ints(az, node, 1)
    if folded is not None and int(folded.reshape(-1)[pos]) in (1, -1):
        return True
    az.block(ids, f"Expand {node.name} gets its channel count from a shape computation the analysis cannot follow")
    return False


def tile(az: Analyzer, node: gs.Node) -> None:
    """Tile: other axes repeat freely; repeating the channel axis r times (``k.repeat(1, r, 1, 1)``, GQA's
    key-value heads as [k0, k1, k0, k1]) repeats the id block, and r counts copies, not channels."""
    xm = az.map(first_input(node))
    if xm is None:
        return
    repeats = runtime_ints(az, node, 1)
    if repeats is None:
        az.block(xm.ids, f"Tile {node.name} repeats are computed at runtime from unknown shapes (pass --shape)")
        return
    times = int(repeats.reshape(-1)[xm.axis])
    az.set_map(node.outputs[0], ChannelMap(xm.axis, np.tile(xm.ids, times)))
