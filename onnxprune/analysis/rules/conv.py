"""Conv and ConvTranspose: output channels start groups; input channels (per group) are consumers."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.analysis.analyzer import Analyzer
from onnxprune.analysis.core import ChannelMap, FixupKind, SiteRole
from onnxprune.analysis.graph import optional_input
from onnxprune.analysis.index_mapping import (
    FIXED,
    GroupedMapping,
)


def conv(az: Analyzer, node: gs.Node) -> None:
    x, w_t, b_t = node.inputs[0], node.inputs[1], optional_input(node, 2)
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
            az.site(w_t, 1, xm.ids, node, SiteRole.IN)
        ids = az.new_ids(cout, node)
    elif group == cin and cout % cin == 0:
        in_ids = xm.ids if xm is not None else np.full(cin, FIXED, np.int64)
        ids = np.repeat(in_ids, cout // cin)
        az.fixup(node, FixupKind.CONV_GROUP, [in_ids])
    else:
        if xm is not None:
            az.site(w_t, 1, _even_per_group(az, node, xm.ids, group), node, SiteRole.IN)
        ids = GroupedMapping(group).tile(az.new_ids(cout // group, node))
    az.site(w_t, 0, ids, node, SiteRole.OUT)
    if b_t is not None:
        az.site(b_t, 0, ids, node, SiteRole.PARAM)
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
    x, w_t, b_t = node.inputs[0], node.inputs[1], optional_input(node, 2)
    xm, w = az.map(x), az.const(w_t)
    if w is None or (xm is not None and xm.axis != 1):
        az.block_inputs(node, f"ConvTranspose {node.name}: computed weights or channels off axis 1")
        return
    group = int(node.attrs.get("group", 1))
    cin, cout = int(w.shape[0]), int(w.shape[1]) * group
    if group == 1:
        if xm is not None:
            az.site(w_t, 0, xm.ids, node, SiteRole.IN)
        ids = az.new_ids(cout, node)
        az.site(w_t, 1, ids, node, SiteRole.OUT)
    elif group == cin and w.shape[1] == 1:
        ids = xm.ids if xm is not None else np.full(cin, FIXED, np.int64)
        az.site(w_t, 0, ids, node, SiteRole.OUT)
        az.fixup(node, FixupKind.CONV_GROUP, [ids])
    else:
        if xm is not None:
            block = _even_per_group(az, node, xm.ids, group)
            az.site(w_t, 0, GroupedMapping(group).tile(block), node, SiteRole.IN)
        per_group = az.new_ids(int(w.shape[1]), node)
        az.site(w_t, 1, per_group, node, SiteRole.OUT)
        ids = GroupedMapping(group).tile(per_group)
    if b_t is not None:
        az.site(b_t, 0, ids, node, SiteRole.PARAM)
    az.set_map(node.outputs[0], ChannelMap(1, ids))
